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
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
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
