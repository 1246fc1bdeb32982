//! Inode flags (`FS_IOC_GETFLAGS`/`FS_IOC_SETFLAGS`), chiefly the immutable
//! flag used to protect committed layer images from modification.
//!
//! This module is safe code on top of [`rustix::fs::ioctl_getflags`] and
//! [`rustix::fs::ioctl_setflags`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;

pub use rustix::fs::IFlags;

/// `FS_IMMUTABLE_FL`.
pub const FS_IMMUTABLE_FL: u32 = 0x10;

const _: () = assert!(IFlags::IMMUTABLE.bits() == FS_IMMUTABLE_FL);

/// Errors from this module.
#[derive(Debug, thiserror::Error)]
pub enum FlagsError {
    /// The filesystem does not support inode flags, or not the one asked for
    /// (`ENOTTY`, `EOPNOTSUPP` or `EINVAL`).
    #[error("inode flags are not supported here: {0}")]
    Unsupported(#[source] io::Error),
    /// The file could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other failure of the named ioctl, e.g. `EPERM` without
    /// `CAP_LINUX_IMMUTABLE`.
    #[error("{op}: {source}")]
    Ioctl {
        /// The ioctl that failed.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn map_errno(op: &'static str, e: Errno) -> FlagsError {
    match e {
        Errno::NOTTY | Errno::OPNOTSUPP | Errno::INVAL => FlagsError::Unsupported(e.into()),
        e => FlagsError::Ioctl {
            op,
            source: e.into(),
        },
    }
}

/// Returns the inode flags of `fd` (`FS_IOC_GETFLAGS`). Bits without a
/// named [`IFlags`] constant (such as fs-verity's) are kept.
pub fn get_flags(fd: impl AsFd) -> Result<IFlags, FlagsError> {
    rustix::fs::ioctl_getflags(fd).map_err(|e| map_errno("FS_IOC_GETFLAGS", e))
}

/// Sets (`on`) or clears the immutable flag of `fd`, leaving the other
/// flags as they are. Returns whether the flag changed.
///
/// `fd` may be open read-only. Needs `CAP_LINUX_IMMUTABLE`.
pub fn set_immutable(fd: impl AsFd, on: bool) -> Result<bool, FlagsError> {
    let fd = fd.as_fd();
    let flags = get_flags(fd)?;
    if flags.contains(IFlags::IMMUTABLE) == on {
        return Ok(false);
    }
    let mut new = flags;
    new.set(IFlags::IMMUTABLE, on);
    rustix::fs::ioctl_setflags(fd, new).map_err(|e| map_errno("FS_IOC_SETFLAGS", e))?;
    Ok(true)
}

/// [`set_immutable`] on the file or directory at `path` (not following a
/// final symlink).
pub fn set_immutable_path(path: &Path, on: bool) -> Result<bool, FlagsError> {
    set_immutable(open_for_flags(path)?, on)
}

fn open_for_flags(path: &Path) -> Result<File, FlagsError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| FlagsError::Open {
            path: path.to_owned(),
            source,
        })
}
