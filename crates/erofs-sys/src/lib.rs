//! Thin, safe wrappers around the Linux system calls and ioctls that the
//! EROFS snapshotter needs and that [`rustix`] does not provide.
//!
//! This is the only crate of the workspace that may contain `unsafe` code.
//! Everything it exports is a safe function with typed errors:
//!
//! - [`loop_device`]: attach a file read-only to a free loop device
//!   (`LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE`, falling back to `LOOP_SET_FD` +
//!   `LOOP_SET_STATUS64`), and detach one (`LOOP_CLR_FD`).
//! - [`fsverity`]: enable and measure fs-verity (`FS_IOC_ENABLE_VERITY`,
//!   `FS_IOC_MEASURE_VERITY`), telling "the kernel or filesystem lacks
//!   fs-verity" apart from other failures.
//! - [`flags`]: read inode flags and set or clear `FS_IMMUTABLE_FL`.
//! - [`idmap`]: create user namespaces from ID mappings, parse containerd's
//!   `uidmapping`/`gidmapping` labels, and make idmapped mounts with
//!   `mount_setattr(MOUNT_ATTR_IDMAP)`.
//! - [`mount`]: mount EROFS images and overlayfs with the new mount API
//!   (`fsopen`/`fsconfig`/`fsmount`/`move_mount`), reporting the kernel's
//!   own error messages read from the filesystem context.
//! - [`writeback`]: start writing a file's dirty pages back early
//!   (`sync_file_range`), so a final `fsync` has less left to wait for.
//!
//! Everything here is Linux-only and most of it needs `CAP_SYS_ADMIN`.
//!
//! # Safety
//!
//! The crate root denies `unsafe_code`; only the modules that cannot do
//! without it ([`loop_device`], [`fsverity`], [`idmap`] and [`writeback`]) allow it, and
//! [`flags`] and [`mount`] are fully safe code on top of `rustix`. The rules
//! for the `unsafe` that remains:
//!
//! - Every `unsafe` block or `unsafe impl` carries a `// SAFETY:` comment
//!   saying why it is sound.
//! - Kernel ABI structures are `#[repr(C)]` copies of the UAPI headers with
//!   compile-time assertions on their sizes (and ioctl numbers where they
//!   are computed), so a layout mistake fails the build instead of
//!   corrupting memory.
//! - Pointers handed to the kernel always point to live, properly sized and
//!   initialized Rust values owned by the calling function for the whole
//!   duration of the call; file descriptors are passed as `BorrowedFd`s or
//!   `OwnedFd`s, so they are open for as long as the call uses them.
//! - Typed ioctls go through [`rustix::ioctl`]; raw `libc::syscall` is used
//!   only where `rustix` has no wrapper (`mount_setattr`, `clone3`/`clone`).
//! - No `unsafe` function is exported: callers cannot misuse an invariant
//!   that this crate relies on.
//!
//! The one delicate piece is creating a process in a new user namespace from
//! a possibly multi-threaded process ([`idmap::create_userns`]); its module
//! documentation explains why the approach taken is sound.

#![deny(unsafe_code)]

pub mod flags;
#[allow(unsafe_code)]
pub mod fsverity;
#[allow(unsafe_code)]
pub mod idmap;
#[allow(unsafe_code)]
pub mod loop_device;
pub mod mount;
#[allow(unsafe_code)]
pub mod writeback;
