//! One tracing span per gRPC request: every method runs inside a span named after it, with the
//! snapshot key (or the layer digest) as fields, and ends with one event carrying its duration
//! (`elapsed_ms`) and its status code. The blocking work runs inside the same span (see
//! [`crate::deadline::run`]), so whatever the core logs is tied to the request.

use std::future::Future;
use std::time::Instant;

use snapshotter::Snapshotter;
use tonic::{Code, Status};
use tracing::{Instrument, Span};

/// How a successful request is logged: calls that change state at info, queries at debug
/// (containerd issues Stat, Mounts and List far more often than it changes anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Prepare, View, Commit, Remove, Update, Cleanup, Apply, Diff.
    Change,
    /// Stat, Mounts, List, Usage.
    Query,
}

/// Codes that mean the server failed (logged at error); the others are the request's fault
/// or an expected answer (NotFound, AlreadyExists), logged at debug.
fn server_fault(code: Code) -> bool {
    matches!(code, Code::Internal | Code::Unknown | Code::DataLoss)
}

/// The name of a status code, as metrics label it (`OK`, `NotFound`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Run request `op` in `span`, then log its outcome and duration in that span and report
/// them to the core's observer (the metrics endpoint).
pub async fn traced<T>(
    core: &Snapshotter,
    op: &'static str,
    span: Span,
    method: Method,
    request: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let start = Instant::now();
    let result = request.instrument(span.clone()).await;
    let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
    core.observe_request(op, code_name(code), start.elapsed());
    // Microsecond resolution: most metadata calls take well under a millisecond.
    let elapsed_ms = start.elapsed().as_micros() as f64 / 1000.0;
    let _entered = span.enter();
    match &result {
        Ok(_) if method == Method::Change => {
            tracing::info!(elapsed_ms, code = ?Code::Ok, "request done");
        }
        Ok(_) => tracing::debug!(elapsed_ms, code = ?Code::Ok, "request done"),
        Err(s) if server_fault(s.code()) => {
            tracing::error!(elapsed_ms, code = ?s.code(), error = s.message(), "request failed");
        }
        Err(s) => {
            tracing::debug!(elapsed_ms, code = ?s.code(), error = s.message(), "request refused");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex, OnceLock};

    use containerd_api::containerd::services::snapshots::v1 as pb;
    use containerd_api::containerd::services::snapshots::v1::snapshots_server::Snapshots;
    use snapshotter::mount::SystemMounter;
    use snapshotter::{Config, Snapshotter};
    use tonic::Request;

    use crate::snapshots::SnapshotsService;

    /// Everything the global subscriber wrote (the blocking pool's threads log there too).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn captured() -> &'static Captured {
        static LOG: OnceLock<Captured> = OnceLock::new();
        LOG.get_or_init(|| {
            let log = Captured::default();
            let writer = log.clone();
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .init();
            log
        })
    }

    fn lines_with(needle: &str) -> Vec<String> {
        String::from_utf8_lossy(&captured().0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_work_runs_in_the_request_span() {
        captured();
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            root_path: dir.path().join("root"),
            ..Config::default()
        };
        let core = Snapshotter::open(cfg, Arc::new(SystemMounter::default())).unwrap();
        let span = tracing::info_span!("probe", key = "blocking-span-key");
        super::traced(&core, "probe", span, super::Method::Query, async {
            crate::deadline::run(
                crate::deadline::Budget {
                    deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
                    server_set: true,
                },
                |_| {
                    tracing::info!("inside the blocking closure");
                    Ok(())
                },
            )
            .await
        })
        .await
        .unwrap();
        let lines = lines_with("inside the blocking closure");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("probe{key=") && l.contains("blocking-span-key")),
            "{lines:#?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_request_has_a_span_with_its_key_and_duration() {
        captured();
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            root_path: dir.path().join("root"),
            ..Config::default()
        };
        let core = Snapshotter::open(cfg, Arc::new(SystemMounter::default())).unwrap();
        let svc = SnapshotsService::new(Arc::new(core));
        svc.prepare(Request::new(pb::PrepareSnapshotRequest {
            key: "span-test-key".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
        let err = svc
            .stat(Request::new(pb::StatSnapshotRequest {
                snapshotter: String::new(),
                key: "span-test-missing".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);

        let done = lines_with("prepare{key=span-test-key parent=}");
        let end = done
            .iter()
            .find(|l| l.contains("request done"))
            .unwrap_or_else(|| panic!("no end event in {done:#?}"));
        assert!(end.contains(" INFO "), "{end}");
        assert!(
            end.contains("elapsed_ms=") && end.contains("code=Ok"),
            "{end}"
        );
        let refused = lines_with("stat{key=span-test-missing}");
        assert!(
            refused.iter().any(|l| l.contains("request refused")
                && l.contains("code=NotFound")
                && l.contains("elapsed_ms=")),
            "{refused:#?}"
        );
    }
}
