//! Read-only loop devices with autoclear.
//!
//! [`attach`] asks `/dev/loop-control` for a free device
//! (`LOOP_CTL_GET_FREE`), binds the backing file to it with one
//! `LOOP_CONFIGURE` ioctl (read-only, autoclear, optionally direct I/O) and
//! falls back to the older `LOOP_SET_FD` + `LOOP_SET_STATUS64` pair on kernels
//! without `LOOP_CONFIGURE` (before 5.8). When another process takes the same
//! free device between the two steps, the bind fails with `EBUSY` and the
//! whole sequence is retried a bounded number of times.
//!
//! Because the device is configured with `LO_FLAGS_AUTOCLEAR`, the kernel
//! frees it as soon as its last user goes away: once the returned
//! [`LoopDevice`] is dropped (closing its file descriptor) and every
//! filesystem mounted from it is unmounted. [`detach`] (`LOOP_CLR_FD`) is
//! there for explicit cleanup of devices left behind, e.g. after a crash.

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::ioctl::{self, Ioctl, IoctlOutput, Opcode};

/// Path of the loop control device.
pub const LOOP_CONTROL: &str = "/dev/loop-control";

/// How many times [`attach`] retries when the free device it was given is
/// taken by someone else before it could bind it.
pub const MAX_ATTACH_ATTEMPTS: u32 = 32;

// Ioctl numbers from <linux/loop.h>. They are plain numbers, not `_IOW`
// encodings.
const LOOP_SET_FD: Opcode = 0x4C00;
const LOOP_CLR_FD: Opcode = 0x4C01;
const LOOP_SET_STATUS64: Opcode = 0x4C04;
const LOOP_GET_STATUS64: Opcode = 0x4C05;
const LOOP_SET_DIRECT_IO: Opcode = 0x4C08;
const LOOP_CONFIGURE: Opcode = 0x4C0A;
const LOOP_CTL_GET_FREE: Opcode = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    const fn zeroed() -> Self {
        Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// `LOOP_CTL_GET_FREE`: no argument; the free device number is the return
/// value of the ioctl.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument (the kernel ignores the
// pointer, which is null), does not touch user memory, and returns the device
// number as the ioctl's return value, which `output_from_ptr` only converts.
unsafe impl Ioctl for GetFree {
    type Output = u32;

    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }

    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::null_mut()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<u32> {
        u32::try_from(out).map_err(|_| Errno::RANGE)
    }
}

/// Errors from [`attach`] and [`detach`].
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// A file (backing file, loop control or loop device) could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The file that could not be opened.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {path}: {source}")]
    Ioctl {
        /// The ioctl that failed, e.g. `"LOOP_CONFIGURE"`.
        op: &'static str,
        /// The device it was issued on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Every free device handed out by `LOOP_CTL_GET_FREE` was taken by
    /// another process before it could be bound.
    #[error("no free loop device could be bound after {attempts} attempts")]
    Busy {
        /// How many devices were tried.
        attempts: u32,
    },
    /// [`detach`] was called on a loop device that has no backing file.
    #[error("{path} is not bound to a backing file")]
    NotBound {
        /// The loop device.
        path: PathBuf,
    },
}

/// A loop device bound read-only, with autoclear, to a backing file.
///
/// Dropping it closes the file descriptor held on the device; thanks to
/// autoclear the kernel then unbinds and frees the device as soon as nothing
/// else (a mount, another open file descriptor) uses it. Mount the device
/// before dropping this value, or the device is freed right away.
#[derive(Debug)]
pub struct LoopDevice {
    /// Path of the device node, e.g. `/dev/loop3`.
    pub path: PathBuf,
    /// Device number `N` of `/dev/loopN`.
    pub number: u32,
    /// The device, open read-only; it keeps the device bound while open.
    pub file: File,
}

impl LoopDevice {
    /// Path of the device node, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device number `N` of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Directory of the device's attributes in sysfs,
    /// e.g. `/sys/block/loop3`.
    pub fn sysfs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}", self.number))
    }
}

impl AsFd for LoopDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn open_ro(path: &Path) -> Result<File, LoopError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LoopError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Attaches `backing` read-only to a free loop device, with autoclear.
///
/// With `direct_io` the device is asked to bypass the page cache for the
/// backing file (`LO_FLAGS_DIRECT_IO`); the kernel silently keeps buffered
/// I/O where direct I/O is not possible.
pub fn attach(backing: &Path, direct_io: bool) -> Result<LoopDevice, LoopError> {
    let file = open_ro(backing)?;
    // The kernel takes its own reference to the backing file; ours is closed
    // on return.
    attach_fd(file.as_fd(), direct_io)
}

/// Attaches `backing` read-write to a free loop device, with autoclear (for writable ext4
/// images of size-limited snapshots).
pub fn attach_rw(backing: &Path) -> Result<LoopDevice, LoopError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .map_err(|source| LoopError::Open {
            path: backing.to_owned(),
            source,
        })?;
    attach_with(file.as_fd(), false, false)
}

/// Like [`attach`], for an already open backing file.
///
/// The device is read-only whatever the mode `backing` was opened with.
pub fn attach_fd(backing: BorrowedFd<'_>, direct_io: bool) -> Result<LoopDevice, LoopError> {
    attach_with(backing, direct_io, true)
}

fn attach_with(
    backing: BorrowedFd<'_>,
    direct_io: bool,
    read_only: bool,
) -> Result<LoopDevice, LoopError> {
    let control_path = Path::new(LOOP_CONTROL);
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(control_path)
        .map_err(|source| LoopError::Open {
            path: control_path.to_owned(),
            source,
        })?;

    for _ in 0..MAX_ATTACH_ATTEMPTS {
        // SAFETY: `GetFree` describes LOOP_CTL_GET_FREE exactly (no argument,
        // result in the return value), and `control` is /dev/loop-control.
        let number = unsafe { ioctl::ioctl(&control, GetFree) }.map_err(|e| LoopError::Ioctl {
            op: "LOOP_CTL_GET_FREE",
            path: control_path.to_owned(),
            source: e.into(),
        })?;
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let opened = if read_only {
            open_ro(&path)
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|source| LoopError::Open {
                    path: path.clone(),
                    source,
                })
        };
        let device = match opened {
            Ok(device) => device,
            // The node may not exist yet (devtmpfs creates it right after
            // the device is added) or may already be going away again.
            Err(LoopError::Open { source, .. })
                if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e),
        };
        match bind(&device, backing, direct_io, read_only) {
            Ok(()) => {
                return Ok(LoopDevice {
                    path,
                    number,
                    file: device,
                });
            }
            // Someone else bound this device after GET_FREE handed it to us.
            Err((_, Errno::BUSY)) => continue,
            Err((op, errno)) => {
                return Err(LoopError::Ioctl {
                    op,
                    path,
                    source: errno.into(),
                });
            }
        }
    }
    Err(LoopError::Busy {
        attempts: MAX_ATTACH_ATTEMPTS,
    })
}

/// Binds `backing` to the open loop device `device`.
fn bind(
    device: &File,
    backing: BorrowedFd<'_>,
    direct_io: bool,
    read_only: bool,
) -> Result<(), (&'static str, Errno)> {
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = flags;
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
    // `LoopConfig` reproduces exactly (size checked at compile time); the
    // Setter owns it for the duration of the call. The fd inside is
    // `backing`, which is borrowed and therefore open during the call.
    let configured = unsafe {
        ioctl::ioctl(
            device,
            ioctl::Setter::<LOOP_CONFIGURE, LoopConfig>::new(config),
        )
    };
    match configured {
        Ok(()) => Ok(()),
        // Kernels before 5.8 do not know LOOP_CONFIGURE.
        Err(Errno::INVAL | Errno::NOTTY) => bind_legacy(device, backing, direct_io),
        Err(e) => Err(("LOOP_CONFIGURE", e)),
    }
}

/// `LOOP_SET_FD` + `LOOP_SET_STATUS64` (+ `LOOP_SET_DIRECT_IO`).
fn bind_legacy(
    device: &File,
    backing: BorrowedFd<'_>,
    direct_io: bool,
) -> Result<(), (&'static str, Errno)> {
    // SAFETY: LOOP_SET_FD takes the backing file descriptor as its integer
    // argument; `backing` is borrowed, hence open, for the whole call. The
    // device is read-only because `device` was opened read-only.
    unsafe {
        ioctl::ioctl(
            device,
            ioctl::IntegerSetter::<LOOP_SET_FD>::new_usize(backing.as_raw_fd() as usize),
        )
    }
    .map_err(|e| ("LOOP_SET_FD", e))?;

    let mut info = LoopInfo64::zeroed();
    // Only AUTOCLEAR and PARTSCAN can be set here; READ_ONLY came from the
    // open modes above.
    info.lo_flags = LO_FLAGS_AUTOCLEAR;
    // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64`, which
    // `LoopInfo64` reproduces exactly (size checked at compile time) and the
    // Setter owns for the duration of the call.
    let status = unsafe {
        ioctl::ioctl(
            device,
            ioctl::Setter::<LOOP_SET_STATUS64, LoopInfo64>::new(info),
        )
    };
    if let Err(e) = status {
        let _ = clear_fd(device);
        return Err(("LOOP_SET_STATUS64", e));
    }
    if direct_io {
        // Best effort, like LO_FLAGS_DIRECT_IO with LOOP_CONFIGURE.
        // SAFETY: LOOP_SET_DIRECT_IO takes an integer (0 or 1) argument.
        let _ = unsafe {
            ioctl::ioctl(
                device,
                ioctl::IntegerSetter::<LOOP_SET_DIRECT_IO>::new_usize(1),
            )
        };
    }
    Ok(())
}

fn clear_fd(device: &File) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument and touches no user memory.
    unsafe { ioctl::ioctl(device, ioctl::NoArg::<LOOP_CLR_FD>::new()) }
}

/// The file a loop device reads: the device number of its filesystem and its inode number,
/// as `stat` reports them (`st_dev`, `st_ino`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    /// `st_dev` of the backing file.
    pub dev: u64,
    /// `st_ino` of the backing file.
    pub ino: u64,
    /// Whether the device is read-only.
    pub read_only: bool,
    /// Byte offset into the backing file where the device starts.
    pub offset: u64,
    /// Size limit in bytes (0: the whole file).
    pub size_limit: u64,
}

/// What the loop device open as `device` is bound to (`LOOP_GET_STATUS64`);
/// [`LoopError::NotBound`] if nothing. `path` is for messages.
pub fn backing(device: BorrowedFd<'_>, path: &Path) -> Result<Backing, LoopError> {
    // SAFETY: LOOP_GET_STATUS64 is a plain number with no argument encoding; it writes one
    // `struct loop_info64`, which `LoopInfo64` reproduces exactly (size checked at compile
    // time) and the Getter owns for the duration of the call; `device` is borrowed, so open.
    let got = unsafe {
        ioctl::ioctl(
            device,
            ioctl::Getter::<LOOP_GET_STATUS64, LoopInfo64>::new(),
        )
    };
    match got {
        Ok(info) => Ok(Backing {
            dev: info.lo_device,
            ino: info.lo_inode,
            read_only: info.lo_flags & LO_FLAGS_READ_ONLY != 0,
            offset: info.lo_offset,
            size_limit: info.lo_sizelimit,
        }),
        Err(Errno::NXIO) => Err(LoopError::NotBound {
            path: path.to_owned(),
        }),
        Err(e) => Err(LoopError::Ioctl {
            op: "LOOP_GET_STATUS64",
            path: path.to_owned(),
            source: e.into(),
        }),
    }
}

/// Unbinds the loop device at `path` from its backing file (`LOOP_CLR_FD`).
///
/// If the device is still in use (mounted or open elsewhere), the kernel
/// only marks it for autoclear and frees it when the last user goes away.
/// Returns [`LoopError::NotBound`] if the device has no backing file.
pub fn detach(path: &Path) -> Result<(), LoopError> {
    let device = open_ro(path)?;
    clear_fd(&device).map_err(|e| match e {
        Errno::NXIO => LoopError::NotBound {
            path: path.to_owned(),
        },
        e => LoopError::Ioctl {
            op: "LOOP_CLR_FD",
            path: path.to_owned(),
            source: e.into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(number: u32, attr: &str) -> Option<String> {
        std::fs::read_to_string(format!("/sys/block/loop{number}/loop/{attr}"))
            .ok()
            .map(|s| s.trim_end().to_owned())
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// The LOOP_SET_FD + LOOP_SET_STATUS64 path used on kernels without
    /// LOOP_CONFIGURE gives the same read-only, autoclear device.
    #[test]
    fn legacy_bind_is_read_only_and_autoclear() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("img");
        std::fs::write(&backing, vec![1u8; 8192]).unwrap();
        let backing = File::open(&backing).unwrap();
        let control = File::open(LOOP_CONTROL).unwrap();
        // Tests running in parallel may take the free device between GET_FREE and the
        // bind; like `attach_fd`, try the next free one.
        let (number, device) = (0..32)
            .find_map(|_| {
                // SAFETY: as in `attach_fd`.
                let number = unsafe { ioctl::ioctl(&control, GetFree) }.unwrap();
                let device = open_ro(Path::new(&format!("/dev/loop{number}"))).unwrap();
                match bind_legacy(&device, backing.as_fd(), false) {
                    Ok(()) => Some((number, device)),
                    Err((_, Errno::BUSY)) => None,
                    Err(e) => panic!("{e:?}"),
                }
            })
            .expect("no free loop device stayed free");
        assert_eq!(sysfs(number, "autoclear").as_deref(), Some("1"));
        assert_eq!(
            std::fs::read_to_string(format!("/sys/block/loop{number}/ro"))
                .unwrap()
                .trim(),
            "1"
        );
        drop(device);
        let start = std::time::Instant::now();
        while sysfs(number, "backing_file").is_some() {
            assert!(start.elapsed().as_secs() < 5, "loop{number} not freed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// LOOP_GET_STATUS64 names the backing file by its inode, so a device can be checked to
    /// read the very file it should, whatever its path says now.
    #[test]
    fn backing_names_the_bound_file() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let file = File::open(&path).unwrap();
        let dev = attach_fd(file.as_fd(), false).unwrap();
        let b = backing(dev.file.as_fd(), &dev.path).unwrap();
        let md = file.metadata().unwrap();
        assert_eq!((b.dev, b.ino), (md.dev(), md.ino()));
        assert!(b.read_only);
        assert_eq!((b.offset, b.size_limit), (0, 0));
        // A free device is bound to nothing.
        let control = File::open(LOOP_CONTROL).unwrap();
        // SAFETY: as in `attach_fd`.
        let number = unsafe { ioctl::ioctl(&control, GetFree) }.unwrap();
        let free = PathBuf::from(format!("/dev/loop{number}"));
        if let Ok(f) = open_ro(&free) {
            match backing(f.as_fd(), &free) {
                Err(LoopError::NotBound { .. }) => {}
                // Another test took it in between.
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Binding a device someone else bound first fails with EBUSY, the
    /// errno `attach_fd` retries on.
    #[test]
    fn binding_a_taken_device_is_ebusy() {
        if !is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let dev = attach(&path, false).unwrap();
        let backing = File::open(&path).unwrap();
        let again = open_ro(dev.path()).unwrap();
        assert_eq!(
            bind(&again, backing.as_fd(), false, true).unwrap_err(),
            ("LOOP_CONFIGURE", Errno::BUSY)
        );
        assert_eq!(
            bind_legacy(&again, backing.as_fd(), false).unwrap_err(),
            ("LOOP_SET_FD", Errno::BUSY)
        );
    }
}
