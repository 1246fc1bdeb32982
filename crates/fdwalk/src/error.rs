//! Errors of a walk.

use rustix::io::Errno;

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a walk. Paths are the tree's root joined with the entry's relative
/// path (long ones shortened to their start and end).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tree changed under the walk: an entry that was listed is gone, or its name now
    /// holds another inode (a symlink or another file swapped in). Nothing of what the name
    /// now points at was read.
    #[error("{path} changed while it was being read ({what}); is something writing to the tree?")]
    Changed {
        /// The entry.
        path: String,
        /// What was found instead.
        what: &'static str,
    },
    /// An entry is the mount point of another filesystem, which a walk does not enter.
    #[error("{path} is a mount point: the walk does not enter other filesystems")]
    CrossesMount {
        /// The entry.
        path: String,
    },
    /// The root is not a directory (or is a symlink).
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The root.
        path: String,
    },
    /// `/proc/self/fd` is not procfs, so opened entries cannot be reopened safely.
    #[error("/proc/self/fd is not procfs: a tree cannot be walked safely without it")]
    NoProcfs,
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: String, e: Errno) -> Error {
        Error::Io {
            op,
            path,
            source: e.into(),
        }
    }

    /// Whether this is the root (or something under it) not existing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A relative path for a message: hostile trees can nest names kilobytes deep, so long ones
/// keep their start and end only.
pub(crate) fn shorten(p: &[u8]) -> String {
    const KEEP: usize = 200;
    if p.len() <= 2 * KEEP {
        return String::from_utf8_lossy(p).into_owned();
    }
    format!(
        "{}...({} bytes)...{}",
        String::from_utf8_lossy(&p[..KEEP]),
        p.len() - 2 * KEEP,
        String::from_utf8_lossy(&p[p.len() - KEEP..])
    )
}
