//! Errors of the EROFS library.

use std::io;

use crate::tar::TarError;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can fail in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tar stream is malformed or hostile.
    #[error(transparent)]
    Tar(#[from] TarError),
    /// One entry cannot be represented (names it).
    #[error("entry {path:?}: {kind}")]
    Entry {
        /// The entry's path, lossily decoded ("/" for the root).
        path: String,
        /// What is wrong with it.
        kind: EntryError,
    },
    /// The image is corrupt or hostile.
    #[error(transparent)]
    Corrupt(#[from] CorruptError),
    /// The result would exceed a format or configured limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A builder or reader option is invalid.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The image uses a feature this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Reading a source directory failed, or it changed under the build in a way that would
    /// have read something other than what was walked (see [`fdwalk`]).
    #[error(transparent)]
    Walk(#[from] fdwalk::Error),
    /// The caller's [`crate::builder::Interrupt`] said stop.
    #[error("interrupted by the caller")]
    Interrupted,
    /// A layer given to [`crate::merge`] is unusable: which one (1 = bottom, its device id in
    /// fsmeta), and why.
    #[error("layer {layer}: {source}")]
    Layer {
        /// Position from the bottom, 1-based.
        layer: usize,
        /// What is wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// An entry error.
    pub fn entry(path: &[u8], kind: EntryError) -> Self {
        Error::Entry {
            path: crate::tar::path_for_message(path),
            kind,
        }
    }

    /// Name the layer (1 = bottom) an error came from.
    pub fn in_layer(layer: usize, e: Error) -> Self {
        Error::Layer {
            layer,
            source: Box::new(e),
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Attach an entry path to a bare error (I/O errors while copying an entry's data).
    pub(crate) fn in_entry(self, path: &[u8]) -> Self {
        match self {
            Error::Io { context, source } => Error::Io {
                context: format!("entry {:?}: {context}", String::from_utf8_lossy(path)),
                source,
            },
            e => e,
        }
    }
}

/// Why one entry cannot be represented.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// A hard link names a path that does not exist (yet) in this layer.
    #[error("hard link target {0:?} does not exist in this layer")]
    HardlinkTargetMissing(String),
    /// A hard link names a directory.
    #[error("hard link target {0:?} is a directory")]
    HardlinkToDirectory(String),
    /// A path's parent exists and is not a directory.
    #[error("a parent of this path is not a directory")]
    ParentNotDirectory,
    /// The root entry is not a directory.
    #[error("the root must be a directory")]
    RootNotDirectory,
    /// The inline xattr body exceeds what `i_xattr_icount` can describe.
    #[error("extended attributes too large ({0} bytes)")]
    XattrsTooLarge(usize),
    /// One xattr name or value exceeds the format's limits.
    #[error("extended attribute {0:?} too large")]
    XattrTooLarge(String),
    /// A sparse file in a tar index (its data is not contiguous in the tar).
    #[error("sparse files cannot be indexed in place; use a full image")]
    SparseInIndex,
    /// A file type EROFS cannot hold.
    #[error("unsupported file type")]
    UnsupportedType,
    /// A file changed size while it was being copied.
    #[error("file changed while it was read")]
    ChangedWhileReading,
    /// A budget of [`crate::builder::Limits`] exceeded.
    #[error("{what} ({value}) exceed the limit of {limit}")]
    Limit {
        /// What was counted.
        what: &'static str,
        /// How much there was.
        value: u64,
        /// The limit in force.
        limit: u64,
    },
}

/// Where and how an image is corrupt.
#[derive(Debug, thiserror::Error)]
#[error("corrupt image{}: {kind}", nid.map(|n| format!(" (nid {n})")).unwrap_or_default())]
pub struct CorruptError {
    /// The inode concerned, if any.
    pub nid: Option<u64>,
    /// What is wrong.
    pub kind: CorruptKind,
}

/// What is wrong with a corrupt image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptKind {
    /// No EROFS magic.
    #[error("bad superblock magic {0:#x}")]
    BadMagic(u32),
    /// Superblock checksum mismatch.
    #[error("superblock checksum {stored:#x} does not match computed {computed:#x}")]
    BadChecksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// Block size outside what the kernel accepts.
    #[error("unsupported block size bits {0}")]
    BadBlockSize(u8),
    /// Unknown incompatible features.
    #[error("unsupported incompatible features {0:#x}")]
    UnsupportedFeatures(u32),
    /// Some superblock field is invalid.
    #[error("invalid superblock: {0}")]
    BadSuperblock(&'static str),
    /// A read beyond the end of a device.
    #[error("read of {len} bytes at {offset} is outside device {device} ({size} bytes)")]
    OutOfBounds {
        /// Device id.
        device: u16,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// An inode's format field is invalid.
    #[error("invalid inode format {0:#x}")]
    BadInodeFormat(u16),
    /// An unknown or unsupported data layout.
    #[error("unsupported data layout {0}")]
    BadLayout(u8),
    /// The mode has no valid file type.
    #[error("invalid file mode {0:#o}")]
    BadMode(u16),
    /// Inline data crosses a block boundary.
    #[error("inline data crosses a block boundary")]
    InlineCrossesBlock,
    /// Inline data starts at a block boundary (old kernels refuse it).
    #[error("inline data starts at a block boundary (refused by kernels before 6.x)")]
    InlineAtBlockStart,
    /// The inline layout is used where it cannot apply.
    #[error("invalid inline layout: {0}")]
    BadInline(&'static str),
    /// A directory block is malformed.
    #[error("malformed directory block {block}: {what}")]
    BadDirBlock {
        /// Block index within the directory.
        block: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// Directory entries are not in strictly ascending byte order.
    #[error("directory entries out of order: {prev:?} before {next:?}")]
    DirentOrder {
        /// Earlier name.
        prev: String,
        /// Later name.
        next: String,
    },
    /// An invalid file name in a directory.
    #[error("invalid file name {0:?}")]
    BadName(String),
    /// A size field is impossible.
    #[error("invalid size: {0}")]
    BadSize(&'static str),
    /// An xattr body is malformed.
    #[error("malformed xattrs: {0}")]
    BadXattr(&'static str),
    /// A chunk table is malformed.
    #[error("malformed chunk table: {0}")]
    BadChunk(&'static str),
    /// A nid points outside the metadata.
    #[error("nid {0} out of range")]
    BadNid(u64),
    /// Not a directory where one is required.
    #[error("not a directory")]
    NotDirectory,
    /// A path lookup failed.
    #[error("no such file or directory: {0:?}")]
    NotFound(String),
    /// A reference to an extra device that was not provided.
    #[error("data on device {0}, which was not provided")]
    MissingDevice(u16),
    /// A symlink is too long or malformed.
    #[error("invalid symlink: {0}")]
    BadSymlink(&'static str),
    /// A limit protecting the reader was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(&'static str),
}

impl CorruptKind {
    /// Attach an inode number.
    pub fn at(self, nid: u64) -> CorruptError {
        CorruptError {
            nid: Some(nid),
            kind: self,
        }
    }
}

impl From<CorruptKind> for CorruptError {
    fn from(kind: CorruptKind) -> Self {
        CorruptError { nid: None, kind }
    }
}

impl From<CorruptKind> for Error {
    fn from(kind: CorruptKind) -> Self {
        Error::Corrupt(kind.into())
    }
}
