//! Mounting done by the daemon itself (host mode): layer images read-only at their `fs`
//! directories, and ext4 writable layers.
//!
//! Kernel differences, next to their fallbacks: Linux 6.12+ mounts EROFS straight from a
//! regular file; older kernels answer ENOTBLK and get a read-only loop device (LOOP_CONFIGURE,
//! autoclear, so the device goes away with the mount). The new mount API is used so no option
//! string limit applies.
//!
//! EROFS images are mounted from the file the integrity check read, never reopened by name:
//! file-backed mounts name it as `/proc/self/fd/N` (the kernel resolves that to the open file
//! itself), loop devices are bound from it. A file renamed over the layer's path after the
//! check is not what gets mounted. (The mount table shows `/proc/self/fd/N` as the source of
//! such mounts; the mount point, `snapshots/ID/fs`, names the layer.)

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};

/// An EROFS image to mount: the open file to mount (as checked), and its name for messages.
#[derive(Debug, Clone, Copy)]
pub struct OpenImage<'a> {
    /// The image (a regular file, or a block device such as a dm-verity device).
    pub file: &'a File,
    /// Where it was opened from.
    pub path: &'a Path,
}

/// What the snapshotter needs from the kernel's mount machinery.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    /// Mount an open EROFS image read-only (nodev, nosuid) at `target`: that very file, not
    /// whatever its path names by the time of the mount.
    fn mount_erofs(&self, image: OpenImage<'_>, target: &Path) -> Result<()>;
    /// Mount an open EROFS image with extra devices (a flattened chain: `fsmeta.erofs` and
    /// its layers, bottom first, one `device=` each) read-only at `target`, like
    /// [`Self::mount_erofs`]: the very files (or devices) given, not what their paths name.
    fn mount_erofs_devices(
        &self,
        image: OpenImage<'_>,
        devices: &[OpenImage<'_>],
        target: &Path,
    ) -> Result<()>;
    /// Mount an ext4 image read-write at `target` (size-limited writable layers).
    fn mount_ext4(&self, image: &Path, target: &Path) -> Result<()>;
    /// Detach the mount at `target` (lazily, so a busy mount cannot fail a removal).
    fn unmount(&self, target: &Path) -> Result<()>;
    /// Whether `path` is a mount point.
    fn is_mountpoint(&self, path: &Path) -> Result<bool>;
    /// EROFS mounts made through a loop device so far (the fallback for kernels that cannot
    /// mount EROFS from a file).
    fn loop_mounts(&self) -> u64 {
        0
    }
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
    loop_mounts: AtomicU64,
}

impl SystemMounter {
    /// A mounter that puts every EROFS image on a loop device, as on kernels without
    /// file-backed EROFS (which this one switches to by itself when the kernel says so).
    pub fn with_loop_devices() -> Self {
        SystemMounter {
            force_loop: AtomicBool::new(true),
            loop_mounts: AtomicU64::new(0),
        }
    }
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

fn is_block_device(img: &OpenImage<'_>) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    Ok(img
        .file
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", img.path.display()), e))?
        .file_type()
        .is_block_device())
}

impl SystemMounter {
    /// Kernels without file-backed EROFS: a read-only loop device bound from the open file.
    fn mount_erofs_via_loop(&self, image: OpenImage<'_>, target: &Path) -> Result<()> {
        let dev = erofs_sys::loop_device::attach_fd(image.file.as_fd(), false)
            .map_err(|e| mount_err("attaching a loop device to", image.path, e))?;
        erofs_sys::mount::mount_erofs_fd(dev.file.as_fd(), target, &[]).map_err(|e| {
            mount_err(
                &format!(
                    "mounting {} ({}) on",
                    dev.path.display(),
                    image.path.display()
                ),
                target,
                e,
            )
        })?;
        // Autoclear frees the device when the mount goes; our fd may close now.
        drop(dev);
        self.loop_mounts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A flattened chain on loop devices: the kernel mounts an EROFS image and its devices
    /// either all from regular files (file-backed, Linux 6.12+) or all from block devices, so
    /// every regular file here (a layer, or fsmeta, next to dm-verity devices; or all of
    /// them on kernels without file-backed mounts) gets a read-only loop device bound from
    /// its open file. The image itself is used as it is when it is a block device (fsmeta's
    /// own dm-verity device, which nothing else mounts).
    ///
    /// Every `device=` gets a loop device, block devices included: EROFS claims its
    /// `device=` block devices exclusively with its filesystem type as the holder, while
    /// newer kernels (7.2 in the kernel matrix; 6.1 uses one holder for both) claim a
    /// mounted filesystem's main device with its superblock as the holder. A layer's
    /// dm-verity device that is mounted on its own (a stacked lower, an unpack's parent) so
    /// could not be a `device=` of a flattened chain (EBUSY), nor the reverse. A loop device
    /// over the dm-verity device takes the claim, and every read still goes through
    /// dm-verity.
    fn mount_erofs_devices_via_loop(
        &self,
        image: OpenImage<'_>,
        devices: &[OpenImage<'_>],
        target: &Path,
    ) -> Result<()> {
        let attach = |img: &OpenImage<'_>| -> Result<erofs_sys::loop_device::LoopDevice> {
            erofs_sys::loop_device::attach_fd(img.file.as_fd(), false)
                .map_err(|e| mount_err("attaching a loop device to", img.path, e))
        };
        let main = if is_block_device(&image)? {
            None
        } else {
            Some(attach(&image)?)
        };
        // Held until the mount is made: autoclear frees each device once its mount goes.
        let mut loops = Vec::with_capacity(devices.len());
        for d in devices {
            loops.push(attach(d)?);
        }
        let paths: Vec<PathBuf> = loops
            .iter()
            .map(|l| erofs_sys::mount::fd_path(l.file.as_fd()))
            .collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let source = match &main {
            Some(l) => l.file.as_fd(),
            None => image.file.as_fd(),
        };
        erofs_sys::mount::mount_erofs_fd(source, target, &refs).map_err(|e| {
            mount_err(
                &format!(
                    "mounting {} with {} devices on",
                    image.path.display(),
                    devices.len()
                ),
                target,
                e,
            )
        })?;
        let n = loops.len() + usize::from(main.is_some());
        self.loop_mounts.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The outcome of a file-backed EROFS mount at `target`: `Ok(true)` mounted, `Ok(false)`
    /// the kernel cannot mount EROFS from a file (before Linux 6.12), remembered so that
    /// loop devices are used from now on; other errors say `what` was mounted.
    fn file_backed(
        &self,
        r: std::result::Result<(), erofs_sys::mount::MountError>,
        target: &Path,
        what: impl FnOnce() -> String,
    ) -> Result<bool> {
        match r {
            Ok(()) => Ok(true),
            Err(e) if is_enotblk(&e) => {
                tracing::info!(
                    "kernel cannot mount EROFS from a file (before Linux 6.12); using loop devices"
                );
                self.force_loop.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(mount_err(&what(), target, e)),
        }
    }

    /// Writable ext4 images, through a read-write loop device.
    fn mount_ext4_via_loop(&self, image: &Path, target: &Path) -> Result<()> {
        let dev = erofs_sys::loop_device::attach_rw(image)
            .map_err(|e| mount_err("attaching a loop device to", image, e))?;
        rustix::mount::mount(
            &dev.path,
            target,
            "ext4",
            rustix::mount::MountFlags::NODEV,
            c"",
        )
        .map_err(|e| mount_err(&format!("mounting {} on", dev.path.display()), target, e))?;
        // Autoclear frees the device when the mount goes; our fd may close now.
        drop(dev);
        Ok(())
    }
}

impl Mounter for SystemMounter {
    fn mount_erofs(&self, image: OpenImage<'_>, target: &Path) -> Result<()> {
        if !self.force_loop.load(Ordering::Relaxed) {
            let r = erofs_sys::mount::mount_erofs_fd(image.file.as_fd(), target, &[]);
            if self.file_backed(r, target, || {
                format!("mounting {} on", image.path.display())
            })? {
                return Ok(());
            }
        }
        self.mount_erofs_via_loop(image, target)
    }

    fn mount_erofs_devices(
        &self,
        image: OpenImage<'_>,
        devices: &[OpenImage<'_>],
        target: &Path,
    ) -> Result<()> {
        let mut all_files = !is_block_device(&image)?;
        for d in devices {
            all_files &= !is_block_device(d)?;
        }
        if all_files && !self.force_loop.load(Ordering::Relaxed) {
            // Devices are named `/proc/self/fd/N`: the kernel opens the very file checked.
            let paths: Vec<PathBuf> = devices
                .iter()
                .map(|d| erofs_sys::mount::fd_path(d.file.as_fd()))
                .collect();
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            let r = erofs_sys::mount::mount_erofs_fd(image.file.as_fd(), target, &refs);
            if self.file_backed(r, target, || {
                format!(
                    "mounting {} with {} devices on",
                    image.path.display(),
                    devices.len()
                )
            })? {
                return Ok(());
            }
        }
        self.mount_erofs_devices_via_loop(image, devices, target)
    }

    fn mount_ext4(&self, image: &Path, target: &Path) -> Result<()> {
        self.mount_ext4_via_loop(image, target)
    }

    fn loop_mounts(&self) -> u64 {
        self.loop_mounts.load(Ordering::Relaxed)
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
