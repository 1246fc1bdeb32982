//! The only place that builds `tonic::Status`: core error kinds to gRPC codes, as
//! containerd's errdefs maps them.

use snapshotter::{Error, ErrorKind};
use tonic::{Code, Status};

/// Map a core error to a status.
pub fn from_core(e: Error) -> Status {
    let code = match e.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    // Logged once, with the code and the duration, where the request ends (crate::request).
    Status::new(code, e.to_string())
}

/// A missing required field.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// A blocking task that panicked or was cancelled.
pub fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("request task failed: {e}"))
}

/// Run `f` on the blocking pool, inside the current (request) span, and map its error.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> snapshotter::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(join_error)?
        .map_err(from_core)
}
