//! The only place that builds `tonic::Status`: core error kinds to gRPC codes, as
//! containerd's errdefs maps them.

use snapshotter::{Error, ErrorKind};
use tonic::{Code, Status};

/// The longest status message sent, in bytes. gRPC carries the message in the
/// `grpc-message` header, percent-encoded (up to three bytes per byte), and clients refuse a
/// header list past their limit (16 KiB in hyper, tonic's client): an error that quotes a
/// caller's field of a few hundred kilobytes (a media type, a digest) would reach the caller
/// as a transport error instead of its code. 2 KiB encodes to at most 6 KiB.
pub const MAX_MESSAGE: usize = 2048;

/// `message`, cut to [`MAX_MESSAGE`] bytes (at a character boundary) with a note of how
/// long it was.
pub fn bounded(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let suffix = format!("… (message truncated, {} bytes)", message.len());
    let mut cut = MAX_MESSAGE - suffix.len();
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &message[..cut])
}

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
    Status::new(code, bounded(e.to_string()))
}

/// A missing required field.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// A blocking task that panicked or was cancelled.
pub fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(bounded(format!("request task failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_at_a_char_boundary() {
        let short = "unsupported media type \"x\"".to_string();
        assert_eq!(bounded(short.clone()), short);
        let at = "a".repeat(MAX_MESSAGE);
        assert_eq!(bounded(at.clone()), at);
        for long in [
            format!("unsupported media type {:?}", "y".repeat(188_481)),
            "🦀".repeat(10_000),
            format!("a{}", "é".repeat(5000)),
        ] {
            let b = bounded(long.clone());
            assert!(b.len() <= MAX_MESSAGE, "{}", b.len());
            assert!(
                b.ends_with(&format!("(message truncated, {} bytes)", long.len())),
                "{}",
                &b[b.len() - 60..]
            );
            let kept = b.split('…').next().unwrap();
            assert!(long.starts_with(kept));
        }
        let s = from_core(Error::invalid_argument("x".repeat(100_000)));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().len() <= MAX_MESSAGE);
    }
}
