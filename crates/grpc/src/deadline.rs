//! Deadlines and cancellation: every request runs with a [`Cancel`] token whose deadline is the
//! earlier of the caller's (`grpc-timeout`) and the server's maximum for its kind
//! (`daemon.heavy_timeout` for Apply, Diff and Commit, `daemon.request_timeout` for the
//! others), and which is tripped when the call is dropped (the client cancelled it, or its
//! deadline passed and tonic dropped it). The core checks the token in its long loops.
//!
//! The reply never waits long past the deadline: a request still running [`GRACE`] after it
//! gets DEADLINE_EXCEEDED while its work, already told to stop, winds down behind it.

use std::time::{Duration, Instant};

use snapshotter::{Cancel, Config};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::status::{from_core, join_error};

/// How long after its deadline a request's reply waits for its work to stop.
pub const GRACE: Duration = Duration::from_secs(2);

/// How heavy a request is: which server-side maximum applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// Apply, Diff (Compare), Commit: `daemon.heavy_timeout`.
    Heavy,
    /// Everything else: `daemon.request_timeout`.
    Light,
}

/// The `grpc-timeout` header (gRPC over HTTP/2: at most 8 digits and a unit H, M, S, m, u, n).
pub fn client_timeout(md: &MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When a request must be done by: now plus the shorter of the caller's timeout and the
/// server's maximum.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// The deadline.
    pub deadline: Instant,
    /// Whether the server's maximum (not the caller's) set it.
    pub server_set: bool,
}

impl Budget {
    /// The budget of a request with metadata `md`, of weight `w`, under `cfg`.
    pub fn of(md: &MetadataMap, w: Weight, cfg: &Config) -> Budget {
        let max = match w {
            Weight::Heavy => cfg.heavy_timeout(),
            Weight::Light => cfg.request_timeout(),
        };
        let (limit, server_set) = match client_timeout(md) {
            Some(c) if c < max => (c, false),
            _ => (max, true),
        };
        Budget {
            deadline: Instant::now() + limit,
            server_set,
        }
    }

    /// A fresh token with this deadline.
    pub fn token(&self) -> Cancel {
        Cancel::until(self.deadline)
    }

    /// The reply for a request that outlived its deadline and grace.
    pub fn exceeded(&self) -> Status {
        Status::deadline_exceeded(if self.server_set {
            "the request ran past the server's maximum (daemon.heavy_timeout / daemon.request_timeout)"
        } else {
            "the request ran past its deadline"
        })
    }
}

/// Trips its token when dropped, unless disarmed: the request's future was dropped.
#[derive(Debug)]
pub struct TripOnDrop(Option<Cancel>);

impl TripOnDrop {
    /// Guard `c`.
    pub fn new(c: &Cancel) -> Self {
        TripOnDrop(Some(c.clone()))
    }
    /// The request finished: nothing to trip.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TripOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            tracing::debug!("request dropped: cancelling its work");
            c.cancel();
        }
    }
}

/// Run `f` on the blocking pool, inside the current (request) span, with a token for
/// `budget` that is tripped if this future is dropped; map its error. Replies at the latest
/// [`GRACE`] after the deadline.
pub async fn run<T: Send + 'static>(
    budget: Budget,
    f: impl FnOnce(&Cancel) -> snapshotter::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let cancel = budget.token();
    let guard = TripOnDrop::new(&cancel);
    let span = tracing::Span::current();
    let token = cancel.clone();
    let task = tokio::task::spawn_blocking(move || span.in_scope(|| f(&token)));
    let r = tokio::select! {
        r = task => r.map_err(join_error)?.map_err(from_core),
        _ = tokio::time::sleep_until((budget.deadline + GRACE).into()) => {
            tracing::warn!("the request's work did not stop within {GRACE:?} of its deadline; replying without it");
            cancel.cancel();
            Err(budget.exceeded())
        }
    };
    guard.disarm();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        m
    }

    #[test]
    fn parses_grpc_timeout() {
        assert_eq!(client_timeout(&md("5S")), Some(Duration::from_secs(5)));
        assert_eq!(client_timeout(&md("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(
            client_timeout(&md("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            client_timeout(&md("99999999n")),
            Some(Duration::from_nanos(99999999))
        );
        for bad in ["5", "S", "123456789S", "5s", "-5S", "5X"] {
            assert_eq!(client_timeout(&md(bad)), None, "{bad}");
        }
        assert_eq!(client_timeout(&MetadataMap::new()), None);
    }

    #[test]
    fn the_shorter_limit_wins() {
        let cfg =
            Config::parse("[daemon]\nheavy_timeout = \"10m\"\nrequest_timeout = \"3s\"").unwrap();
        let now = Instant::now();
        let b = Budget::of(&md("1S"), Weight::Heavy, &cfg);
        assert!(!b.server_set && b.deadline <= now + Duration::from_millis(1100));
        let b = Budget::of(&md("1H"), Weight::Light, &cfg);
        assert!(b.server_set && b.deadline <= Instant::now() + Duration::from_secs(3));
        let b = Budget::of(&MetadataMap::new(), Weight::Heavy, &cfg);
        assert!(b.server_set && b.deadline > now + Duration::from_secs(500));
    }

    /// Work past its deadline stops with DEADLINE_EXCEEDED; work that does not stop gets the
    /// reply anyway, GRACE after the deadline; a dropped request's token is tripped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadlines_and_drops_reach_the_work() {
        let budget = |ms| Budget {
            deadline: Instant::now() + Duration::from_millis(ms),
            server_set: true,
        };
        let r = run(budget(100), |c| -> snapshotter::Result<()> {
            loop {
                c.check()?;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::DeadlineExceeded);

        let t = Instant::now();
        let r: Result<(), _> = run(budget(50), |_| {
            std::thread::sleep(GRACE + Duration::from_secs(1));
            Ok(())
        })
        .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert!(
            t.elapsed() < GRACE + Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );

        let (tx, rx) = std::sync::mpsc::channel();
        let fut = run(budget(60_000), move |c| -> snapshotter::Result<()> {
            let _ = tx.send(c.clone());
            loop {
                c.check()?;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let _ = tokio::time::timeout(Duration::from_millis(100), fut).await;
        let token: Cancel = rx.recv().unwrap();
        assert_eq!(
            token.check().unwrap_err().kind(),
            snapshotter::ErrorKind::Cancelled
        );
    }
}
