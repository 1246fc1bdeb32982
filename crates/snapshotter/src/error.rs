//! Errors of the snapshotter core, with the error kinds containerd's errdefs uses.

use std::io;

/// containerd's error classes; the gRPC layer maps each to its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `NotFound`.
    NotFound,
    /// `AlreadyExists`.
    AlreadyExists,
    /// `FailedPrecondition`.
    FailedPrecondition,
    /// `InvalidArgument`.
    InvalidArgument,
    /// `Unimplemented` (the differ uses it to let containerd fall through to the next differ).
    Unimplemented,
    /// `Unavailable`: a dependency (containerd's content service) cannot be reached.
    Unavailable,
    /// `Canceled`: the caller gave up on the request.
    Cancelled,
    /// `DeadlineExceeded`: the request's deadline (the caller's or the server's) passed.
    DeadlineExceeded,
    /// `ResourceExhausted`: the filesystem under the root is full or below its reserve.
    ResourceExhausted,
    /// Anything else.
    Internal,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the snapshotter core.
///
/// [`Error::context`] wraps an error instead of flattening it, so the original (an
/// `io::Error`, an `erofs_image::Error`, a metadata-store error) stays reachable through
/// [`std::error::Error::source`] and [`Error::kind`] stays the kind of the innermost failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A classified failure with its message.
    Kind {
        /// The class.
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
    /// The metadata store is inconsistent (a bad record, a loop in a parent chain).
    Store(String),
    /// The metadata database failed.
    Database(redb::Error),
    /// An I/O error with what was being done.
    Io {
        /// The class: [`ErrorKind::Internal`] unless the caller knows better (a layer blob
        /// that cannot be read is the request's fault, not ours).
        kind: ErrorKind,
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// Building or reading an EROFS image failed.
    Image(erofs_image::Error),
    /// Walking an upper directory failed, or it changed under the walk (see [`fdwalk`]).
    Walk(fdwalk::Error),
    /// An error with what was being done when it happened.
    Context {
        /// What was being done.
        context: String,
        /// The error (its kind is this error's kind).
        source: Box<Error>,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Kind { message, .. } => f.write_str(message),
            Error::Store(m) => write!(f, "metadata store: {m}"),
            Error::Database(e) => write!(f, "metadata store: {e}"),
            Error::Io {
                context, source, ..
            } => write!(f, "{context}: {source}"),
            Error::Image(e) => e.fmt(f),
            Error::Walk(e) => e.fmt(f),
            Error::Context { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

// Written out rather than derived: the source of a `Context` must be the inner `Error`
// itself (so a walk of the chain can downcast it), not the `Box` around it.
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kind { .. } | Error::Store(_) => None,
            Error::Database(e) => Some(e),
            Error::Io { source, .. } => Some(source),
            Error::Image(e) => Some(e),
            Error::Walk(e) => Some(e),
            Error::Context { source, .. } => Some(&**source),
        }
    }
}

macro_rules! ctor {
    ($name:ident, $kind:ident) => {
        #[doc = concat!("An error of kind [`ErrorKind::", stringify!($kind), "`].")]
        pub fn $name(message: impl Into<String>) -> Self {
            Error::Kind {
                kind: ErrorKind::$kind,
                message: message.into(),
            }
        }
    };
}

impl Error {
    ctor!(not_found, NotFound);
    ctor!(already_exists, AlreadyExists);
    ctor!(failed_precondition, FailedPrecondition);
    ctor!(invalid_argument, InvalidArgument);
    ctor!(unimplemented, Unimplemented);
    ctor!(unavailable, Unavailable);
    ctor!(cancelled, Cancelled);
    ctor!(deadline_exceeded, DeadlineExceeded);
    ctor!(resource_exhausted, ResourceExhausted);
    ctor!(internal, Internal);

    /// An I/O error with context, of kind [`ErrorKind::Internal`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::io_as(ErrorKind::Internal, context, source)
    }

    /// An I/O error with context and a kind (e.g. `InvalidArgument` for a corrupt layer
    /// stream).
    pub fn io_as(kind: ErrorKind, context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            kind,
            context: context.into(),
            source,
        }
    }

    /// The containerd error class.
    ///
    /// An I/O or image error carries the class of what is inside it: a core error a reader
    /// handed back as an `io::Error` (a cancelled request, say) keeps its own, and a full
    /// filesystem (ENOSPC, EDQUOT) is [`ErrorKind::ResourceExhausted`] wherever it surfaced.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kind { kind, .. } => *kind,
            Error::Store(_) | Error::Database(_) => ErrorKind::Internal,
            Error::Io { kind, source, .. } => carried_kind(source).unwrap_or(*kind),
            Error::Context { source, .. } => source.kind(),
            Error::Image(e) => carried_kind(e).unwrap_or(match e {
                erofs_image::Error::Tar(_)
                | erofs_image::Error::Entry { .. }
                | erofs_image::Error::Corrupt(_)
                | erofs_image::Error::Unsupported(_)
                | erofs_image::Error::TooLarge(_) => ErrorKind::InvalidArgument,
                erofs_image::Error::Walk(w) => walk_kind(w),
                _ => ErrorKind::Internal,
            }),
            Error::Walk(w) => walk_kind(w),
        }
    }

    /// Say what was being done: the message becomes "what: message", the kind stays, and
    /// this error becomes the [`source`](std::error::Error::source) of the result.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        Error::Context {
            context: what.to_string(),
            source: Box::new(self),
        }
    }
}

/// The class an error chain carries from inside: the first core [`Error`] in it (also inside
/// an `io::Error`, which `source()` would skip), or ResourceExhausted for an `io::Error` of a
/// full filesystem.
fn carried_kind(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(core) = e.downcast_ref::<Error>() {
            return Some(core.kind());
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if is_full(io) {
                return Some(ErrorKind::ResourceExhausted);
            }
            if let Some(inner) = io.get_ref() {
                cur = Some(inner);
                continue;
            }
        }
        cur = e.source();
    }
    None
}

impl Error {
    /// Whether somewhere in this error a write found the filesystem (or a quota) full.
    pub fn is_disk_full(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if is_full(io) {
                    return true;
                }
                if let Some(inner) = io.get_ref() {
                    cur = Some(inner);
                    continue;
                }
            }
            cur = e.source();
        }
        false
    }
}

/// Whether an I/O error says the filesystem (or a quota) is full.
pub fn is_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(n) if n == rustix::io::Errno::NOSPC.raw_os_error() || n == rustix::io::Errno::DQUOT.raw_os_error())
}

impl From<erofs_image::Error> for Error {
    fn from(e: erofs_image::Error) -> Self {
        Error::Image(e)
    }
}

impl From<fdwalk::Error> for Error {
    fn from(e: fdwalk::Error) -> Self {
        Error::Walk(e)
    }
}

/// A tree that changed under the walk, or holds a mount, is the state of the snapshot (its
/// container is still writing, or the host mounted something into it), not our failure.
fn walk_kind(e: &fdwalk::Error) -> ErrorKind {
    match e {
        fdwalk::Error::Changed { .. } | fdwalk::Error::CrossesMount { .. } => {
            ErrorKind::FailedPrecondition
        }
        _ => ErrorKind::Internal,
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Database(e)
    }
}

// redb's specific errors all convert into `redb::Error` with the same message.
macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Database(e.into())
            }
        }
    )*};
}
store_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors of a chain, outermost first.
    fn sources<'a>(
        e: &'a (dyn std::error::Error + 'static),
    ) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
        std::iter::successors(Some(e), |&e| e.source())
    }

    /// The messages of a chain, outermost first.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        sources(e).map(|e| e.to_string()).collect()
    }

    #[test]
    fn context_keeps_kind_message_and_source() {
        let inner = Error::not_found("snapshot \"a\"");
        let e = inner.context("preparing \"b\"").context("request");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "request: preparing \"b\": snapshot \"a\"");
        assert_eq!(
            chain(&e),
            [
                "request: preparing \"b\": snapshot \"a\"",
                "preparing \"b\": snapshot \"a\"",
                "snapshot \"a\"",
            ]
        );
        let root = sources(&e).last().unwrap();
        assert!(matches!(
            root.downcast_ref::<Error>(),
            Some(Error::Kind {
                kind: ErrorKind::NotFound,
                ..
            })
        ));
    }

    #[test]
    fn io_errors_stay_typed_under_context() {
        let io = io::Error::new(io::ErrorKind::PermissionDenied, "denied");
        let e = Error::io_as(ErrorKind::InvalidArgument, "reading the layer", io)
            .context("applying sha256:x");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "applying sha256:x: reading the layer: denied"
        );
        let found = sources(&e)
            .find_map(|e| e.downcast_ref::<io::Error>())
            .expect("the io::Error is in the chain");
        assert_eq!(found.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            Error::io("x", io::Error::other("y")).kind(),
            ErrorKind::Internal
        );
    }

    #[test]
    fn image_errors_are_sources_not_strings() {
        let img = erofs_image::Error::Unsupported("chunked files".into());
        let e = Error::from(img).context("opening layer 3");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.to_string(), "opening layer 3: unsupported: chunked files");
        let found = sources(&e)
            .find_map(|e| e.downcast_ref::<erofs_image::Error>())
            .expect("the erofs_image::Error is in the chain");
        assert!(matches!(found, erofs_image::Error::Unsupported(_)));
    }

    #[test]
    fn database_errors_keep_redb_error() {
        let e = Error::from(redb::StorageError::Corrupted("bad page".into())).context("listing");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(
            e.to_string().starts_with("listing: metadata store: "),
            "{e}"
        );
        assert!(e.to_string().contains("bad page"), "{e}");
        assert!(sources(&e).any(|e| e.downcast_ref::<redb::Error>().is_some()));
    }
}
