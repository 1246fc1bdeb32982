//! ID-mapped mounts: user namespaces built from ID mappings, containerd's
//! mapping labels, and `mount_setattr(MOUNT_ATTR_IDMAP)`.
//!
//! A typical use, for a container whose user namespace maps container ID 0
//! to host ID 100000:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::os::fd::AsFd;
//! use std::path::Path;
//! use erofs_sys::idmap;
//!
//! let uids = idmap::parse_id_mappings("0:100000:65536")?;
//! let gids = idmap::parse_id_mappings("0:100000:65536")?;
//! let userns = idmap::create_userns(&uids, &gids)?;
//! let tree = idmap::idmapped_clone(Path::new("/var/lib/layer"), userns.as_fd())?;
//! idmap::move_mount_to(tree.as_fd(), Path::new("/run/mnt"))?;
//! drop(tree); // an open tree fd keeps the mount busy
//! # Ok(()) }
//! ```
//!
//! # How the user namespace is made
//!
//! A user namespace with given mappings needs a process living in it while
//! its `uid_map` and `gid_map` are written. The calling process cannot
//! `unshare(CLONE_NEWUSER)` itself (it is normally multi-threaded, which
//! `unshare` refuses, and it must keep its own credentials), so
//! [`create_userns`] creates a short-lived helper child with
//! `clone3(CLONE_NEWUSER | CLONE_PIDFD)` (or `clone` where `clone3` is
//! filtered out), writes the maps from the parent (which, as root in the
//! parent namespace, may write any mapping, and `gid_map` without writing
//! `deny` to `setgroups` first), opens `/proc/PID/ns/user`, and then ends
//! and reaps the child.
//!
//! Creating a child with a raw `clone` in a multi-threaded process has the
//! same hazard as `fork`: the child is a copy of one thread, and locks held
//! by other threads (malloc's, stdio's, ...) stay locked forever in it. The
//! child here therefore runs only async-signal-safe code that touches no
//! lock and allocates nothing: `close` of the pipe's write end, one blocking
//! `read` on the pipe's read end, and `_exit`. All signals are blocked
//! around the `clone`, so no inherited signal handler can run in the child
//! either (SIGKILL still ends it). The parent ends the child by closing the
//! write end (the child's `read` returns end-of-file) and, to be sure,
//! SIGKILL through the pidfd; it reaps it with `waitid(P_PIDFD)`. The pidfd
//! makes signalling and reaping immune to PID reuse, and since the child
//! also exits when the parent dies (the pipe's last write end closes), no
//! helper outlives its creator.

use std::ffi::{c_int, c_long};
use std::fs::OpenOptions;
use std::io::{self, PipeReader, PipeWriter, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::mount::{OpenTreeFlags, open_tree};
use rustix::process::{Signal, WaitId, WaitIdOptions, pidfd_send_signal, waitid};

pub use crate::mount::move_mount_to;

/// One ID mapping: `(container_id, host_id, size)`, mapping container IDs
/// `container_id..container_id + size` to host IDs
/// `host_id..host_id + size`.
pub type IdMapping = (u32, u32, u32);

/// Most mappings a user namespace accepts per `uid_map` or `gid_map`
/// (`UID_GID_MAP_MAX_EXTENTS`, Linux 4.15+).
pub const MAX_ID_MAPPINGS: usize = 340;

/// The kernel wants a whole map in a single write of less than a page.
const MAX_MAP_TEXT: usize = 4095;

/// `MOUNT_ATTR_IDMAP`.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` from <linux/mount.h> (`MOUNT_ATTR_SIZE_VER0`).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const _: () = assert!(size_of::<MountAttr>() == 32);

/// The first fields of `struct clone_args` from <linux/sched.h>
/// (`CLONE_ARGS_SIZE_VER0`).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

const _: () = assert!(size_of::<CloneArgs>() == 64);

/// Errors from this module.
#[derive(Debug, thiserror::Error)]
pub enum IdmapError {
    /// An ID mapping is malformed or not acceptable to the kernel.
    #[error("invalid ID mapping {input:?}: {reason}")]
    InvalidMapping {
        /// The offending text or mapping.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The helper process in the new user namespace could not be created.
    #[error("creating a process in a new user namespace: {0}")]
    Spawn(#[source] io::Error),
    /// Writing `/proc/PID/uid_map` or `gid_map` failed.
    #[error("writing {path}: {source}")]
    WriteMap {
        /// The map file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Opening `/proc/PID/ns/user` failed.
    #[error("opening {path}: {source}")]
    OpenNamespace {
        /// The namespace file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The helper process was gone before its namespace had been opened.
    #[error("the user namespace helper process exited early")]
    HelperExited,
    /// `open_tree(OPEN_TREE_CLONE)` failed.
    #[error("open_tree({path}): {source}")]
    OpenTree {
        /// The directory to clone.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `mount_setattr(MOUNT_ATTR_IDMAP)` failed: `EINVAL` if the mount is
    /// attached or its filesystem does not support idmapped mounts, `EPERM`
    /// without `CAP_SYS_ADMIN`, `EBUSY` if it is already idmapped.
    #[error("mount_setattr(MOUNT_ATTR_IDMAP): {0}")]
    SetAttr(#[source] io::Error),
}

fn invalid(input: impl Into<String>, reason: impl Into<String>) -> IdmapError {
    IdmapError::InvalidMapping {
        input: input.into(),
        reason: reason.into(),
    }
}

/// Parses the value of containerd's `containerd.io/snapshot/uidmapping` or
/// `gidmapping` label: `"ctrID:hostID:size"`, several separated by commas.
///
/// The result is validated with [`validate_id_mappings`]. Spaces around
/// entries and fields are tolerated; an empty string is an error.
pub fn parse_id_mappings(s: &str) -> Result<Vec<IdMapping>, IdmapError> {
    if s.trim().is_empty() {
        return Err(invalid(s, "no mapping"));
    }
    let mut maps = Vec::new();
    for entry in s.split(',') {
        if maps.len() == MAX_ID_MAPPINGS {
            return Err(invalid(s, format!("more than {MAX_ID_MAPPINGS} mappings")));
        }
        let fields: Vec<&str> = entry.split(':').map(str::trim).collect();
        let [ctr, host, size] = fields[..] else {
            return Err(invalid(entry, "want containerID:hostID:size"));
        };
        let number = |field: &str| -> Result<u32, IdmapError> {
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(entry, format!("{field:?} is not a decimal number")));
            }
            field
                .parse::<u32>()
                .map_err(|_| invalid(entry, format!("{field} is out of range")))
        };
        maps.push((number(ctr)?, number(host)?, number(size)?));
    }
    validate_id_mappings(&maps)?;
    Ok(maps)
}

/// Checks that `maps` is acceptable to the kernel: between 1 and
/// [`MAX_ID_MAPPINGS`] entries, no empty range, no range running past ID
/// `u32::MAX - 1` (`u32::MAX` is the invalid ID `-1`), and no two ranges
/// overlapping on either the container or the host side.
pub fn validate_id_mappings(maps: &[IdMapping]) -> Result<(), IdmapError> {
    let show = |m: &IdMapping| format!("{}:{}:{}", m.0, m.1, m.2);
    if maps.is_empty() {
        return Err(invalid("", "no mapping"));
    }
    if maps.len() > MAX_ID_MAPPINGS {
        return Err(invalid(
            format!("{} mappings", maps.len()),
            format!("more than {MAX_ID_MAPPINGS} mappings"),
        ));
    }
    for m in maps {
        let (ctr, host, size) = *m;
        if size == 0 {
            return Err(invalid(show(m), "size is 0"));
        }
        if u64::from(ctr) + u64::from(size) > u64::from(u32::MAX) {
            return Err(invalid(show(m), "container range overflows"));
        }
        if u64::from(host) + u64::from(size) > u64::from(u32::MAX) {
            return Err(invalid(show(m), "host range overflows"));
        }
    }
    let overlaps = |a: u32, b: u32, size_a: u32, size_b: u32| {
        u64::from(a) < u64::from(b) + u64::from(size_b)
            && u64::from(b) < u64::from(a) + u64::from(size_a)
    };
    for (i, a) in maps.iter().enumerate() {
        for b in &maps[i + 1..] {
            if overlaps(a.0, b.0, a.2, b.2) {
                return Err(invalid(
                    format!("{},{}", show(a), show(b)),
                    "container ranges overlap",
                ));
            }
            if overlaps(a.1, b.1, a.2, b.2) {
                return Err(invalid(
                    format!("{},{}", show(a), show(b)),
                    "host ranges overlap",
                ));
            }
        }
    }
    Ok(())
}

/// Renders mappings in the format of `/proc/PID/uid_map`.
fn map_text(maps: &[IdMapping]) -> Result<String, IdmapError> {
    validate_id_mappings(maps)?;
    let text: String = maps
        .iter()
        .map(|(ctr, host, size)| format!("{ctr} {host} {size}\n"))
        .collect();
    if text.len() > MAX_MAP_TEXT {
        return Err(invalid(
            format!("{} mappings", maps.len()),
            format!(
                "the map text is {} bytes, over the kernel's {MAX_MAP_TEXT}",
                text.len()
            ),
        ));
    }
    Ok(text)
}

/// Creates a user namespace with the given UID and GID mappings and returns
/// a descriptor of it (an open `/proc/PID/ns/user`), usable with
/// [`mount_setattr_idmap`] or `setns`.
///
/// Needs `CAP_SETUID` and `CAP_SETGID` (in practice: root). See the module
/// documentation for how the namespace is created.
pub fn create_userns(uid_map: &[IdMapping], gid_map: &[IdMapping]) -> Result<OwnedFd, IdmapError> {
    // Everything that allocates happens before the child exists.
    let uid_text = map_text(uid_map)?;
    let gid_text = map_text(gid_map)?;
    let (reader, writer) = io::pipe().map_err(IdmapError::Spawn)?;
    let helper = Helper::spawn(reader, writer).map_err(IdmapError::Spawn)?;

    let proc_dir = PathBuf::from(format!("/proc/{}", helper.pid));
    write_map(&proc_dir.join("uid_map"), &uid_text)?;
    write_map(&proc_dir.join("gid_map"), &gid_text)?;
    let ns_path = proc_dir.join("ns/user");
    let ns = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&ns_path)
        .map_err(|source| IdmapError::OpenNamespace {
            path: ns_path,
            source,
        })?;
    // The paths above name our child only while it is unreaped. Had someone
    // else reaped it (a `waitpid(-1)` elsewhere in the process), its PID
    // could have been reused; make sure it is still our live child.
    if !helper.is_alive() {
        return Err(IdmapError::HelperExited);
    }
    drop(helper);
    Ok(ns.into())
}

fn write_map(path: &Path, text: &str) -> Result<(), IdmapError> {
    let fail = |source| IdmapError::WriteMap {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(fail)?;
    // The kernel takes a map in exactly one write.
    let n = file.write(text.as_bytes()).map_err(fail)?;
    if n != text.len() {
        return Err(fail(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write: {n} of {} bytes", text.len()),
        )));
    }
    Ok(())
}

/// The helper child living in the new user namespace.
struct Helper {
    pid: i32,
    pidfd: OwnedFd,
    /// Write end of the pipe the child waits on; closing it lets the child
    /// exit.
    writer: Option<PipeWriter>,
}

impl Helper {
    fn spawn(reader: PipeReader, writer: PipeWriter) -> io::Result<Self> {
        let read_fd = reader.as_raw_fd();
        let write_fd = writer.as_raw_fd();
        let mut pidfd: c_int = -1;

        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigfillset initializes the set it is given before
        // pthread_sigmask reads it; pthread_sigmask fills `old`. Blocking
        // every signal in this thread is undone right after the clone below.
        let rc = unsafe {
            libc::sigfillset(all.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `pthread_sigmask` succeeded, so it initialized `old`.
        let old = unsafe { old.assume_init() };

        // SAFETY: `clone_newuser` creates a child that is a copy of this
        // thread only (no CLONE_VM, CLONE_THREAD or CLONE_FILES). In the
        // child (return value 0) we immediately call `helper_child`, which
        // never returns and runs only async-signal-safe system calls on two
        // file descriptors it owns in its copy of the descriptor table, so
        // the states of locks, the allocator and other threads' data, which
        // the child's copy may have inconsistent, are never used. `pidfd`
        // lives across the call for the kernel to write the pidfd into.
        let ret = unsafe { clone_newuser(&mut pidfd) };
        if ret == 0 {
            helper_child(read_fd, write_fd);
        }
        let clone_error = io::Error::last_os_error();

        // SAFETY: restores the signal mask saved above; `old` is initialized.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        if ret < 0 {
            return Err(clone_error);
        }
        drop(reader);
        // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor,
        // owned by nobody else, in `pidfd` when the clone succeeded.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        Ok(Self {
            pid: ret as i32,
            pidfd,
            writer: Some(writer),
        })
    }

    /// True while the child has not exited (and not been reaped).
    fn is_alive(&self) -> bool {
        matches!(
            waitid(
                WaitId::PidFd(self.pidfd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
            ),
            Ok(None)
        )
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // EOF on the pipe lets the child exit; SIGKILL makes sure of it.
        drop(self.writer.take());
        let _ = pidfd_send_signal(&self.pidfd, Signal::KILL);
        let _ = waitid(WaitId::PidFd(self.pidfd.as_fd()), WaitIdOptions::EXITED);
    }
}

/// The helper child: waits until the parent closes the pipe, then exits.
/// Only async-signal-safe calls; never returns, never unwinds.
fn helper_child(read_fd: c_int, write_fd: c_int) -> ! {
    // SAFETY: close, read and _exit are async-signal-safe system call
    // wrappers. Both descriptors are valid in the child's copy of the
    // descriptor table, and `byte` is a live one-byte buffer.
    unsafe {
        libc::close(write_fd);
        let mut byte = 0u8;
        libc::read(read_fd, (&raw mut byte).cast(), 1);
        libc::_exit(0)
    }
}

/// Creates a child process in a new user namespace, like `fork` otherwise,
/// storing its pidfd in `pidfd`. Returns the child's PID in the parent, 0
/// in the child, and -1 (with `errno` set) on failure.
///
/// # Safety
///
/// Same contract as `fork` in a multi-threaded process: in the child, the
/// caller must only call async-signal-safe functions and must not return
/// to code that could touch state shared with other threads of the parent.
unsafe fn clone_newuser(pidfd: &mut c_int) -> c_long {
    let flags = (libc::CLONE_NEWUSER | libc::CLONE_PIDFD) as u64;
    let mut args = CloneArgs {
        flags,
        pidfd: std::ptr::from_mut(pidfd) as u64,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        // No stack: the child runs on a copy-on-write copy of ours, as with
        // fork.
        stack: 0,
        stack_size: 0,
        tls: 0,
    };
    // SAFETY: `args` is a valid `struct clone_args` of the size passed,
    // alive across the call; `pidfd` points to a live c_int.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_mut(&mut args),
            size_of::<CloneArgs>(),
        )
    };
    if ret != -1 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return ret;
    }
    // clone3 filtered out (e.g. by an old seccomp profile): plain clone,
    // whose third argument is the parent_tid pointer that CLONE_PIDFD
    // writes the pidfd into on every architecture; s390 swaps the first two.
    let flags = (libc::CLONE_NEWUSER | libc::CLONE_PIDFD | libc::SIGCHLD) as c_long;
    let pidfd_ptr = std::ptr::from_mut(pidfd);
    // SAFETY: same as above: no stack (fork-like), `pidfd_ptr` points to a
    // live c_int, the other pointers are null.
    unsafe {
        #[cfg(target_arch = "s390x")]
        let ret = libc::syscall(
            libc::SYS_clone,
            0 as c_long,
            flags,
            pidfd_ptr,
            0 as c_long,
            0 as c_long,
        );
        #[cfg(not(target_arch = "s390x"))]
        let ret = libc::syscall(
            libc::SYS_clone,
            flags,
            0 as c_long,
            pidfd_ptr,
            0 as c_long,
            0 as c_long,
        );
        ret
    }
}

/// Marks the detached mount tree `tree_fd` (from
/// `open_tree(OPEN_TREE_CLONE)`) as idmapped through the user namespace
/// `userns_fd`, recursively (`mount_setattr` with `MOUNT_ATTR_IDMAP`,
/// `AT_EMPTY_PATH | AT_RECURSIVE`).
///
/// Needs Linux 5.12+ and a filesystem supporting idmapped mounts (ext4,
/// xfs, btrfs, tmpfs since 6.3, overlayfs, ...).
pub fn mount_setattr_idmap(
    tree_fd: BorrowedFd<'_>,
    userns_fd: BorrowedFd<'_>,
) -> Result<(), IdmapError> {
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns_fd.as_raw_fd() as u64,
    };
    let flags = (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as c_long;
    // SAFETY: mount_setattr(dfd, path, flags, attr, size) reads `size` bytes
    // of `attr`, a live `struct mount_attr` of exactly that size, and the
    // NUL-terminated empty path; both descriptors are borrowed, hence open,
    // during the call. Every argument is passed as a full machine word.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree_fd.as_raw_fd() as c_long,
            c"".as_ptr(),
            flags,
            std::ptr::from_mut(&mut attr),
            size_of::<MountAttr>(),
        )
    };
    if ret == -1 {
        return Err(IdmapError::SetAttr(io::Error::last_os_error()));
    }
    Ok(())
}

/// Clones the mount tree at `path` into a detached mount
/// (`open_tree(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)`) and
/// idmaps it through `userns_fd` with [`mount_setattr_idmap`].
///
/// Attach the result with [`move_mount_to`], then close it. Dropped
/// unattached, the clone simply goes away.
pub fn idmapped_clone(path: &Path, userns_fd: BorrowedFd<'_>) -> Result<OwnedFd, IdmapError> {
    let tree = open_tree(
        CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )
    .map_err(|e| IdmapError::OpenTree {
        path: path.to_owned(),
        source: e.into(),
    })?;
    mount_setattr_idmap(tree.as_fd(), userns_fd)?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_and_multiple_mappings() {
        assert_eq!(
            parse_id_mappings("0:100000:65536").unwrap(),
            vec![(0, 100000, 65536)]
        );
        assert_eq!(
            parse_id_mappings("0:1000:1,1:100000:65535").unwrap(),
            vec![(0, 1000, 1), (1, 100000, 65535)]
        );
        assert_eq!(
            parse_id_mappings(" 0 : 1000 : 1 , 1:100000:10 ").unwrap(),
            vec![(0, 1000, 1), (1, 100000, 10)]
        );
        // The largest acceptable range ends at u32::MAX - 1.
        assert_eq!(
            parse_id_mappings("0:0:4294967295").unwrap(),
            vec![(0, 0, u32::MAX)]
        );
    }

    #[test]
    fn rejects_malformed_mappings() {
        for bad in [
            "",
            "  ",
            "0:1",
            "0:1:2:3",
            "0:1:2,",
            ",0:1:2",
            "a:1:2",
            "-1:1:2",
            "+1:1:2",
            "0:1:",
            "0:4294967296:1",
            "0:1:0",
            "1:0:4294967295",
            "0:1:4294967295",
            "4294967295:0:1",
            "0:100:10,5:200:10",
            "0:100:10,20:105:10",
        ] {
            assert!(
                matches!(
                    parse_id_mappings(bad),
                    Err(IdmapError::InvalidMapping { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn limits_the_number_of_mappings() {
        let many = |n: u32| {
            (0..n)
                .map(|i| format!("{}:{}:1", i, 1000 + i))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(parse_id_mappings(&many(340)).unwrap().len(), 340);
        assert!(parse_id_mappings(&many(341)).is_err());
    }

    #[test]
    fn map_text_must_fit_in_one_page() {
        let small: Vec<IdMapping> = (0..3).map(|i| (i, 1000 + i, 1)).collect();
        assert_eq!(map_text(&small).unwrap(), "0 1000 1\n1 1001 1\n2 1002 1\n");
        let big: Vec<IdMapping> = (0..340)
            .map(|i| (4_000_000_000 + i, 3_000_000_000 + i, 1))
            .collect();
        assert!(matches!(
            map_text(&big),
            Err(IdmapError::InvalidMapping { .. })
        ));
    }
}
