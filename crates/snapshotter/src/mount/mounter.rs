//! Mounting done by the daemon itself (host mode): layer images read-only at their `fs`
//! directories, and ext4 writable layers.
//!
//! Kernel differences, next to their fallbacks: Linux 6.12+ mounts EROFS straight from a
//! regular file; older kernels answer ENOTBLK and get a read-only loop device (LOOP_CONFIGURE,
//! autoclear, so the device goes away with the mount). The new mount API is used so no option
//! string limit applies.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// What the snapshotter needs from the kernel's mount machinery.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Mount an EROFS image read-only (nodev, nosuid) at `target`.
    fn mount_erofs(&self, image: &Path, target: &Path) -> Result<()>;
    /// Mount an ext4 image read-write at `target` (size-limited writable layers).
    fn mount_ext4(&self, image: &Path, target: &Path) -> Result<()>;
    /// Detach the mount at `target` (lazily, so a busy mount cannot fail a removal).
    fn unmount(&self, target: &Path) -> Result<()>;
    /// Whether `path` is a mount point.
    fn is_mountpoint(&self, path: &Path) -> Result<bool>;
    /// The mount points at or below `dir`, deepest first (the order to unmount them in).
    /// The kernel's table by default, so mounts made outside the mounter count too.
    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        Ok(super::table::under(dir)
            .map_err(|e| Error::io("reading the mount table", e))?
            .into_iter()
            .map(|m| m.target)
            .collect())
    }
}

/// The real kernel.
#[derive(Debug, Default)]
pub struct SystemMounter {
    force_loop: AtomicBool,
}

fn mount_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

fn is_enotblk(e: &erofs_sys::mount::MountError) -> bool {
    matches!(e, erofs_sys::mount::MountError::Kernel { source, .. } if source.raw_os_error() == Some(libc_enotblk()))
}

const fn libc_enotblk() -> i32 {
    15
}

impl SystemMounter {
    fn mount_via_loop(&self, image: &Path, target: &Path, fstype: &str, ro: bool) -> Result<()> {
        let dev = if ro {
            erofs_sys::loop_device::attach(image, false)
        } else {
            erofs_sys::loop_device::attach_rw(image)
        }
        .map_err(|e| mount_err("attaching a loop device to", image, e))?;
        let flags = if ro {
            rustix::mount::MountFlags::RDONLY
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOSUID
        } else {
            rustix::mount::MountFlags::NODEV
        };
        rustix::mount::mount(&dev.path, target, fstype, flags, c"")
            .map_err(|e| mount_err(&format!("mounting {} on", dev.path.display()), target, e))?;
        // Autoclear frees the device when the mount goes; our fd may close now.
        drop(dev);
        Ok(())
    }
}

impl Mounter for SystemMounter {
    fn mount_erofs(&self, image: &Path, target: &Path) -> Result<()> {
        if !self.force_loop.load(Ordering::Relaxed) {
            match erofs_sys::mount::mount_erofs_file(image, target, &[]) {
                Ok(()) => return Ok(()),
                Err(e) if is_enotblk(&e) => {
                    tracing::info!(
                        "kernel cannot mount EROFS from a file (before Linux 6.12); using loop devices"
                    );
                    self.force_loop.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    return Err(mount_err(
                        &format!("mounting {} on", image.display()),
                        target,
                        e,
                    ));
                }
            }
        }
        self.mount_via_loop(image, target, "erofs", true)
    }

    fn mount_ext4(&self, image: &Path, target: &Path) -> Result<()> {
        self.mount_via_loop(image, target, "ext4", false)
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        match rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(mount_err("unmounting", target, e)),
        }
    }

    fn is_mountpoint(&self, path: &Path) -> Result<bool> {
        let id = |p: &Path| -> Result<u64> {
            let st = rustix::fs::statx(
                rustix::fs::CWD,
                p,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                rustix::fs::StatxFlags::MNT_ID,
            )
            .map_err(|e| Error::io(format!("statx {}", p.display()), e.into()))?;
            Ok(st.stx_mnt_id)
        };
        let parent = path.parent().unwrap_or(path);
        match id(path) {
            Ok(a) => Ok(a != id(parent)?),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
