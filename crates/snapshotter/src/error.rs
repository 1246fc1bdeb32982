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
    /// Anything else.
    Internal,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the snapshotter core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A classified failure with its message.
    #[error("{message}")]
    Kind {
        /// The class.
        kind: ErrorKind,
        /// What happened.
        message: String,
    },
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(String),
    /// An I/O error with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Building or reading an EROFS image failed.
    #[error(transparent)]
    Image(#[from] erofs_image::Error),
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
    ctor!(internal, Internal);

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The containerd error class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kind { kind, .. } => *kind,
            Error::Store(_) | Error::Io { .. } => ErrorKind::Internal,
            Error::Image(e) => match e {
                erofs_image::Error::Tar(_)
                | erofs_image::Error::Entry { .. }
                | erofs_image::Error::Corrupt(_)
                | erofs_image::Error::Unsupported(_)
                | erofs_image::Error::TooLarge(_) => ErrorKind::InvalidArgument,
                _ => ErrorKind::Internal,
            },
        }
    }

    /// Prefix the message with context, keeping the kind.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        Error::Kind {
            kind: self.kind(),
            message: format!("{what}: {self}"),
        }
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Store(e.to_string())
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
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
