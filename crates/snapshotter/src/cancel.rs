//! Cancellation and deadlines of long requests: a token whose owner trips it (the caller gave
//! up) or whose deadline passes, checked by Apply, Compare and Commit's conversion between
//! chunks of input and between entries, so they stop within a chunk's or an entry's work.
//!
//! It knows nothing of where requests come from: the gRPC layer makes one per request (with
//! the earlier of the caller's deadline and the server's maximum) and trips it when the call
//! is dropped. Work that stops this way cleans up after itself as on any other error. The
//! core may add a condition of its own (the free-space reserve) that stops the work too.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{Error, ErrorKind, Result};

/// A condition that stops work when it fails.
type Condition = Arc<Tripwire>;

/// A condition and its first failure, kept: the condition may be rate-limited or pass again
/// later (space freed meanwhile), but work it stopped must be reported as stopped by it, and
/// must not start again.
struct Tripwire {
    test: Box<dyn Fn() -> Result<()> + Send + Sync>,
    tripped: std::sync::OnceLock<(ErrorKind, String)>,
}

/// A request's cancellation token. Clones share the state.
#[derive(Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
    condition: Option<Condition>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.inner.cancelled.load(Ordering::Relaxed))
            .field("deadline", &self.inner.deadline)
            .field("condition", &self.condition.is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    deadline: Option<Instant>,
}

impl Cancel {
    /// A token that only [`cancel`](Self::cancel) trips (callers without a deadline).
    pub fn never() -> Self {
        Cancel::default()
    }

    /// A token that trips at `deadline`, or earlier through [`cancel`](Self::cancel).
    pub fn until(deadline: Instant) -> Self {
        Cancel {
            inner: Arc::new(Inner {
                cancelled: AtomicBool::new(false),
                deadline: Some(deadline),
            }),
            condition: None,
        }
    }

    /// This token (sharing its state) that also trips when `condition` fails, with its
    /// error. The condition is asked at every check: it should be cheap.
    pub fn with_condition(
        &self,
        condition: impl Fn() -> Result<()> + Send + Sync + 'static,
    ) -> Cancel {
        Cancel {
            inner: self.inner.clone(),
            condition: Some(Arc::new(Tripwire {
                test: Box::new(condition),
                tripped: Default::default(),
            })),
        }
    }

    /// The caller gave up: every later check fails with [`ErrorKind::Cancelled`].
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Relaxed);
    }

    /// The deadline, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// Whether the work should stop (cancelled, or past the deadline).
    pub fn is_done(&self) -> bool {
        self.check().is_err()
    }

    /// Ok while the work may go on; Cancelled or DeadlineExceeded once it must stop, or the
    /// condition's error.
    pub fn check(&self) -> Result<()> {
        if self.inner.cancelled.load(Ordering::Relaxed) {
            return Err(Error::cancelled("the request was cancelled"));
        }
        if let Some(d) = self.inner.deadline
            && Instant::now() >= d
        {
            return Err(Error::deadline_exceeded("the request's deadline passed"));
        }
        let Some(c) = &self.condition else {
            return Ok(());
        };
        if let Some((kind, message)) = c.tripped.get() {
            return Err(Error::Kind {
                kind: *kind,
                message: message.clone(),
            });
        }
        (c.test)().inspect_err(|e| {
            let _ = c.tripped.set((e.kind(), e.to_string()));
        })
    }

    /// What to report for `e`, an error of work this token governs: once the token has
    /// tripped, whatever the stopped work failed with (an interrupted build, a stream cut
    /// short) is reported as what stopped it, naming where it stopped.
    pub fn explain(&self, e: Error) -> Error {
        if matches!(
            e.kind(),
            ErrorKind::Cancelled | ErrorKind::DeadlineExceeded | ErrorKind::ResourceExhausted
        ) {
            return e;
        }
        match self.check() {
            Err(stop) => Error::Kind {
                kind: stop.kind(),
                message: format!("{stop} (stopped: {e})"),
            },
            _ => e,
        }
    }

    /// `r`, checking this token before every read: a read after it tripped fails with an
    /// `io::Error` carrying the Cancelled or DeadlineExceeded error (its kind survives the
    /// wrapping, see [`Error::kind`]).
    pub fn reader<R: Read>(&self, r: R) -> CheckedReader<R> {
        CheckedReader {
            inner: r,
            cancel: self.clone(),
        }
    }

    /// The same question for the image builder (asked between entries and chunks of data).
    pub fn interrupt(&self) -> erofs_image::Interrupt {
        let c = self.clone();
        erofs_image::Interrupt::new(move || c.is_done())
    }
}

/// See [`Cancel::reader`].
#[derive(Debug)]
pub struct CheckedReader<R> {
    inner: R,
    cancel: Cancel,
}

impl<R: Read> Read for CheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.cancel.check().map_err(io::Error::other)?;
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn trips_on_cancel_and_on_deadline() {
        let c = Cancel::never();
        assert!(c.check().is_ok());
        let clone = c.clone();
        clone.cancel();
        assert_eq!(c.check().unwrap_err().kind(), ErrorKind::Cancelled);

        let d = Cancel::until(Instant::now() + Duration::from_millis(30));
        assert!(d.check().is_ok());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(d.check().unwrap_err().kind(), ErrorKind::DeadlineExceeded);
    }

    /// A read after the token tripped fails, and the error keeps its class through an
    /// `io::Error` and the core errors wrapped around it.
    #[test]
    fn reader_errors_keep_their_class() {
        let c = Cancel::never();
        let mut r = c.reader(&b"abcdef"[..]);
        let mut buf = [0u8; 3];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        c.cancel();
        let e = r.read(&mut buf).unwrap_err();
        let core = Error::io("reading the layer", e).context("applying sha256:x");
        assert_eq!(core.kind(), ErrorKind::Cancelled);
        let img = Error::from(erofs_image::Error::io(
            "reading the tar",
            io::Error::other(Error::deadline_exceeded("late")),
        ));
        assert_eq!(img.kind(), ErrorKind::DeadlineExceeded);
    }

    #[test]
    fn conditions_trip_the_derived_token_only() {
        let c = Cancel::never();
        let full = c.with_condition(|| Err(Error::resource_exhausted("disk full")));
        assert!(c.check().is_ok());
        assert_eq!(
            full.check().unwrap_err().kind(),
            ErrorKind::ResourceExhausted
        );
        let e = full.explain(Error::from(erofs_image::Error::Interrupted));
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        c.cancel();
        assert_eq!(full.check().unwrap_err().kind(), ErrorKind::Cancelled);
    }

    /// A condition that fails once (a rate-limited free-space watch) keeps the token tripped:
    /// the work it stopped is reported as stopped by it, not as an internal error.
    #[test]
    fn a_tripped_condition_stays_tripped() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let n = calls.clone();
        let c = Cancel::never().with_condition(move || {
            if n.fetch_add(1, Ordering::Relaxed) == 1 {
                Err(Error::resource_exhausted("below the reserve"))
            } else {
                Ok(())
            }
        });
        assert!(c.check().is_ok());
        assert_eq!(c.check().unwrap_err().kind(), ErrorKind::ResourceExhausted);
        let e = c.explain(Error::from(erofs_image::Error::Interrupted));
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
        assert!(e.to_string().contains("below the reserve"), "{e}");
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn explain_reports_the_stop_not_its_symptom() {
        let c = Cancel::never();
        let symptom = Error::from(erofs_image::Error::Interrupted);
        assert_eq!(
            c.explain(Error::invalid_argument("bad")).kind(),
            ErrorKind::InvalidArgument
        );
        c.cancel();
        let e = c.explain(symptom);
        assert_eq!(e.kind(), ErrorKind::Cancelled);
        assert!(e.to_string().contains("interrupted"), "{e}");
    }
}
