//! EROFS and overlayfs mounts through the new mount API (`fsopen`,
//! `fsconfig`, `fsmount`, `move_mount`).
//!
//! Safe code on top of [`rustix::mount`]. What it adds:
//!
//! - When a step fails, the kernel's own explanation is read back from the
//!   filesystem context (`read(2)` on the `fsopen` descriptor yields lines
//!   such as `"e overlay: Unknown parameter 'x'"`) and carried in
//!   [`MountError::Kernel`]. Not every failure is explained there: EROFS
//!   (as of Linux 6.18) reports a bad superblock only to the kernel log.
//! - The descriptors returned by `fsopen` and `fsmount` are closed before
//!   the functions return: an open `fsmount` descriptor keeps the mount busy,
//!   so a later plain `umount` would fail with `EBUSY`.
//! - Overlay lower layers are passed one by one with `lowerdir+` (Linux
//!   6.8+), so their number and total path length are not limited by the
//!   4096-byte page that `mount(2)` options must fit in. Older kernels get
//!   one `mount(2)` option string instead (the paths shortened through an
//!   open common parent when they would not fit).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::CWD;
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags, fsconfig_create,
    fsconfig_set_fd, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
};

/// Longest string value `fsconfig(FSCONFIG_SET_STRING)` accepts, in bytes
/// (the kernel copies at most 256 bytes including the terminating NUL).
pub const FSCONFIG_MAX_STRING: usize = 255;

/// Errors from this module.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A step of the new mount API failed. `messages` holds what the kernel
    /// logged into the filesystem context (e.g. `"e overlay: Bad value for 'index'"`), if
    /// anything.
    #[error("{fstype} mount: {step}: {source}{}", kernel_says(.messages))]
    Kernel {
        /// Filesystem type, e.g. `"erofs"`.
        fstype: String,
        /// The failing step, e.g. `fsconfig_create`.
        step: String,
        /// The error returned by the system call.
        #[source]
        source: io::Error,
        /// Messages read from the filesystem context, one per line as the
        /// kernel wrote them (`"e ..."`, `"w ..."` or `"i ..."`).
        messages: Vec<String>,
    },
    /// Attaching a detached mount to its target failed.
    #[error("move_mount to {target}: {source}")]
    MoveMount {
        /// The mount point.
        target: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {target}: {source}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A layer directory could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An extra mount option was empty or had an empty key.
    #[error("invalid mount option {0:?}")]
    InvalidOption(String),
}

fn kernel_says(messages: &[String]) -> String {
    if messages.is_empty() {
        return String::new();
    }
    let mut out = String::from(" (kernel: ");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{m}");
    }
    out.push(')');
    out
}

/// Reads and returns the messages queued in the filesystem context `fs_fd`
/// (a descriptor from `fsopen` or `fspick`), draining the queue.
///
/// Each `read(2)` returns one message: an `"e "`, `"w "` or `"i "` prefix
/// (error, warning, info) followed by the text, e.g.
/// `"e overlay: too many lower directories, limit is 500"`. The kernel
/// keeps the last eight messages.
pub fn fs_context_messages(fs_fd: BorrowedFd<'_>) -> Vec<String> {
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..64 {
        match rustix::io::read(fs_fd, &mut buf[..]) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                messages.push(text.trim_end_matches('\n').to_owned());
            }
            Err(Errno::INTR) => {}
            // The message did not fit and was dropped; go on with the next.
            Err(Errno::MSGSIZE) => {}
            // ENODATA: the queue is empty. Anything else: give up quietly,
            // the messages are only a diagnostic aid.
            Err(_) => break,
        }
    }
    messages
}

/// A filesystem context from `fsopen`.
struct FsContext {
    fd: OwnedFd,
    fstype: &'static str,
}

impl FsContext {
    fn open(fstype: &'static str) -> Result<Self, MountError> {
        let fd = fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| MountError::Kernel {
            fstype: fstype.to_owned(),
            step: "fsopen".to_owned(),
            source: e.into(),
            messages: Vec::new(),
        })?;
        Ok(Self { fd, fstype })
    }

    fn fail(&self, step: String, e: Errno) -> MountError {
        MountError::Kernel {
            fstype: self.fstype.to_owned(),
            step,
            source: e.into(),
            messages: fs_context_messages(self.fd.as_fd()),
        }
    }

    fn set_flag(&self, key: &str) -> Result<(), MountError> {
        fsconfig_set_flag(&self.fd, key)
            .map_err(|e| self.fail(format!("fsconfig_set_flag({key})"), e))
    }

    fn set_string(&self, key: &str, value: &OsStr) -> Result<(), MountError> {
        fsconfig_set_string(&self.fd, key, value).map_err(|e| {
            self.fail(
                format!("fsconfig_set_string({key}={})", Path::new(value).display()),
                e,
            )
        })
    }

    /// Sets a path-valued option: as a string when it fits in
    /// [`FSCONFIG_MAX_STRING`] bytes, else as an open directory descriptor
    /// (`FSCONFIG_SET_FD`, accepted by overlayfs layers since Linux 6.13).
    fn set_dir(&self, key: &str, dir: &Path) -> Result<(), MountError> {
        if dir.as_os_str().len() <= FSCONFIG_MAX_STRING {
            return self.set_string(key, dir.as_os_str());
        }
        let file = open_dir(dir)?;
        fsconfig_set_fd(&self.fd, key, &file)
            .map_err(|e| self.fail(format!("fsconfig_set_fd({key}={})", dir.display()), e))
    }

    fn set_option(&self, option: &str) -> Result<(), MountError> {
        match option.split_once('=') {
            Some(("", _)) => Err(MountError::InvalidOption(option.to_owned())),
            Some((key, value)) => self.set_string(key, OsStr::new(value)),
            None if option.is_empty() => Err(MountError::InvalidOption(option.to_owned())),
            None => self.set_flag(option),
        }
    }

    /// `FSCONFIG_CMD_CREATE`, `fsmount` and `move_mount` onto `target`; both
    /// descriptors are closed on return.
    fn mount_at(self, attrs: MountAttrFlags, target: &Path) -> Result<(), MountError> {
        fsconfig_create(&self.fd).map_err(|e| self.fail("fsconfig_create".to_owned(), e))?;
        let mnt = fsmount(&self.fd, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
            .map_err(|e| self.fail("fsmount".to_owned(), e))?;
        drop(self);
        move_mount_to(mnt.as_fd(), target)?;
        // Closing the mount fd now matters: while it is open the mount is
        // busy and a plain umount of `target` fails with EBUSY.
        drop(mnt);
        Ok(())
    }
}

fn open_dir(path: &Path) -> Result<File, MountError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| MountError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Mounts the EROFS image `source_file` read-only (with `nodev` and
/// `nosuid`) on `target`.
///
/// `source_file` may be a regular file (file-backed mount: Linux 6.12+
/// with `CONFIG_EROFS_FS_BACKED_BY_FILE`) or a block device such as a loop
/// device. `extra_devices` are the image's extra blob devices, in the order
/// of its device table, each passed as one `device=` option.
pub fn mount_erofs_file(
    source_file: &Path,
    target: &Path,
    extra_devices: &[&Path],
) -> Result<(), MountError> {
    mount_erofs_source(source_file.as_os_str(), target, extra_devices)
}

/// Mounts the EROFS image open as `image` (a regular file, or a block device such as a loop
/// or dm-verity device) read-only on `target`, like [`mount_erofs_file`].
///
/// The source is given as `/proc/self/fd/N`: the kernel resolves that magic link to the open
/// file itself (its dentry and mount), not to whatever name it had, so a file renamed over
/// the image's path after `image` was opened (and checked) is not what gets mounted.
pub fn mount_erofs_fd(
    image: BorrowedFd<'_>,
    target: &Path,
    extra_devices: &[&Path],
) -> Result<(), MountError> {
    let source = fd_path(image);
    mount_erofs_source(source.as_os_str(), target, extra_devices)
}

/// `/proc/self/fd/N` for an open descriptor of this process.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn mount_erofs_source(
    source: &OsStr,
    target: &Path,
    extra_devices: &[&Path],
) -> Result<(), MountError> {
    let fc = FsContext::open("erofs")?;
    fc.set_flag("ro")?;
    fc.set_string("source", source)?;
    for device in extra_devices {
        fc.set_string("device", device.as_os_str())?;
    }
    fc.mount_at(
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOSUID,
        target,
    )
}

/// Mounts an overlay filesystem on `target`.
///
/// `lowers` are the lower layers, topmost first; each is passed with its
/// own `lowerdir+` option (Linux 6.8+), so neither their number (up to
/// overlayfs' limit of 500) nor their total length is bounded by the
/// 4096-byte option page of `mount(2)`. A path longer than
/// [`FSCONFIG_MAX_STRING`] bytes is passed as an open directory instead
/// (Linux 6.13+). `upper_work` is the `(upperdir, workdir)` pair of a
/// writable overlay; without it the overlay is read-only. `extra_opts` are
/// more options, each `"key=value"` (set as a string) or `"key"` (set as a
/// flag), e.g. `"index=off"` or `"userxattr"`.
///
/// Kernels before 6.8 have no `lowerdir+` (before 6.5 overlayfs even parses its options
/// as one legacy string, so the refusal may only come at `fsconfig_create`): when the
/// kernel refuses with `EINVAL` and says nothing else, or names `lowerdir+` or its legacy
/// parser, the mount is made again by [`mount_overlay_legacy`].
pub fn mount_overlay(
    target: &Path,
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[String],
) -> Result<(), MountError> {
    // Known from an earlier mount: this kernel needs mount(2) (and logs a warning for
    // every refused `lowerdir+`).
    if NO_LOWERDIR_PLUS.load(std::sync::atomic::Ordering::Relaxed) {
        return mount_overlay_legacy(target, lowers, upper_work, extra_opts);
    }
    let each = (|| {
        let fc = FsContext::open("overlay")?;
        fc.set_string("source", OsStr::new("overlay"))?;
        for lower in lowers {
            fc.set_dir("lowerdir+", lower)?;
        }
        overlay_rest(fc, target, upper_work, extra_opts)
    })();
    let Err(first) = each else { return Ok(()) };
    if !lowerdir_plus_unknown(&first) {
        return Err(first);
    }
    mount_overlay_legacy(target, lowers, upper_work, extra_opts)?;
    NO_LOWERDIR_PLUS.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Set once an overlay refused with `lowerdir+` mounted through [`mount_overlay_legacy`].
static NO_LOWERDIR_PLUS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Largest `mount(2)` option string (one page, with its NUL).
const LEGACY_OPTIONS_MAX: usize = 4095;

/// [`mount_overlay`] through `mount(2)` with all options in one string, as kernels without
/// `lowerdir+` need (what `mount_overlay` falls back to there). A lower list too long for the page gets the lowers' common parent as an
/// open directory, named `/proc/self/fd/N` in each path (containerd shortens it with a
/// `chdir` instead, which a threaded process cannot do safely).
pub fn mount_overlay_legacy(
    target: &Path,
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[String],
) -> Result<(), MountError> {
    use std::os::unix::ffi::OsStrExt;
    let fail = |step: &str, source: io::Error| MountError::Kernel {
        fstype: "overlay".into(),
        step: step.into(),
        source,
        messages: Vec::new(),
    };
    let tail = |lowerdir: &[u8]| -> Result<Vec<u8>, MountError> {
        let mut v = b"lowerdir=".to_vec();
        v.extend_from_slice(lowerdir);
        if let Some((upper, work)) = upper_work {
            for (k, p) in [("upperdir", upper), ("workdir", work)] {
                v.extend_from_slice(format!(",{k}=").as_bytes());
                v.extend_from_slice(p.as_os_str().as_bytes());
            }
        }
        for o in extra_opts {
            if o.is_empty() || o.starts_with('=') {
                return Err(MountError::InvalidOption(o.clone()));
            }
            v.push(b',');
            v.extend_from_slice(o.as_bytes());
        }
        if v.contains(&0) {
            return Err(MountError::InvalidOption(
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
        Ok(v)
    };
    for p in lowers
        .iter()
        .copied()
        .chain(upper_work.into_iter().flat_map(|(u, w)| [u, w]))
    {
        if p.as_os_str().as_bytes().contains(&b',') {
            return Err(MountError::InvalidOption(format!(
                "{}: a comma in an overlay path cannot be passed to mount(2)",
                p.display()
            )));
        }
    }
    let mut data = tail(lowerdir_option(lowers, None).as_bytes())?;
    // Held open until the mount is made.
    let mut _parent = None;
    if data.len() > LEGACY_OPTIONS_MAX
        && let Some(common) = common_parent(lowers)
    {
        let dir = open_dir(&common)?;
        let named = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dir)
        ));
        data = tail(lowerdir_option(lowers, Some((&common, &named))).as_bytes())?;
        _parent = Some(dir);
    }
    if data.len() > LEGACY_OPTIONS_MAX {
        return Err(fail(
            "mount(2)",
            io::Error::other(format!(
                "{} overlay options do not fit mount(2)'s {LEGACY_OPTIONS_MAX}-byte page and this kernel has no lowerdir+ (Linux 6.8)",
                data.len()
            )),
        ));
    }
    let data = std::ffi::CString::new(data).expect("checked for NUL");
    rustix::mount::mount(
        c"overlay",
        target,
        c"overlay",
        rustix::mount::MountFlags::empty(),
        data.as_c_str(),
    )
    .map_err(|e| fail("mount(2)", e.into()))
}

/// The deepest directory all of `paths` are strictly below, if any but `/`.
fn common_parent(paths: &[&Path]) -> Option<PathBuf> {
    let mut common = paths.first()?.parent()?.to_path_buf();
    for p in &paths[1..] {
        while !p.starts_with(&common) || *p == common {
            common = common.parent()?.to_path_buf();
        }
    }
    (common != Path::new("/")).then_some(common)
}

/// Whether a refused `lowerdir+` mount may be a kernel that does not know the option:
/// `EINVAL` with no kernel message, one that names `lowerdir+`, or one from the VFS's legacy
/// option parser (overlayfs before 6.5 has no parser of its own, so its options accumulate
/// in one page and may overflow it at any step).
fn lowerdir_plus_unknown(e: &MountError) -> bool {
    match e {
        MountError::Kernel {
            source, messages, ..
        } => {
            source.raw_os_error() == Some(libc::EINVAL)
                && (messages.is_empty()
                    || messages
                        .iter()
                        .any(|m| m.contains("lowerdir+") || m.contains("VFS: Legacy")))
        }
        _ => false,
    }
}

fn overlay_rest(
    fc: FsContext,
    target: &Path,
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[String],
) -> Result<(), MountError> {
    if let Some((upper, work)) = upper_work {
        fc.set_dir("upperdir", upper)?;
        fc.set_dir("workdir", work)?;
    }
    for option in extra_opts {
        fc.set_option(option)?;
    }
    fc.mount_at(MountAttrFlags::empty(), target)
}

/// The lowers as one `lowerdir=` value: topmost first, `:`-separated, with `:` and `\\` in
/// paths escaped by a backslash (overlayfs unescapes them); `replace` swaps a leading
/// directory for another name of it.
fn lowerdir_option(lowers: &[&Path], replace: Option<(&Path, &Path)>) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut v = Vec::new();
    for (i, l) in lowers.iter().enumerate() {
        if i > 0 {
            v.push(b':');
        }
        let l = match replace {
            Some((from, to)) => match l.strip_prefix(from) {
                Ok(rest) => to.join(rest),
                Err(_) => l.to_path_buf(),
            },
            None => l.to_path_buf(),
        };
        for &b in l.as_os_str().as_bytes() {
            if b == b':' || b == b'\\' {
                v.push(b'\\');
            }
            v.push(b);
        }
    }
    std::ffi::OsString::from_vec(v)
}

/// Attaches the detached mount `fd` (from `fsmount` or
/// `open_tree(OPEN_TREE_CLONE)`) on `target` (`move_mount` with
/// `MOVE_MOUNT_F_EMPTY_PATH`).
///
/// The caller should close `fd` afterwards: while it is open the mount
/// counts as busy for a plain (non-detaching) unmount.
pub fn move_mount_to(fd: BorrowedFd<'_>, target: &Path) -> Result<(), MountError> {
    move_mount(
        fd,
        c"",
        CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| MountError::MoveMount {
        target: target.to_owned(),
        source: e.into(),
    })
}

/// Unmounts `target`; with `detach`, lazily (`MNT_DETACH`), which succeeds
/// even while the mount is busy.
pub fn unmount(target: &Path, detach: bool) -> Result<(), MountError> {
    let flags = if detach {
        UnmountFlags::DETACH
    } else {
        UnmountFlags::empty()
    };
    rustix::mount::unmount(target, flags).map_err(|e| MountError::Unmount {
        target: target.to_owned(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_lowerdir_is_joined_and_escaped() {
        let (a, b, c) = (Path::new("/l/1/fs"), Path::new("/a:b"), Path::new("/x\\y"));
        assert_eq!(lowerdir_option(&[a], None), "/l/1/fs");
        assert_eq!(lowerdir_option(&[a, b, c], None), "/l/1/fs:/a\\:b:/x\\\\y");
        let (from, to) = (Path::new("/l"), Path::new("/proc/self/fd/7"));
        assert_eq!(
            lowerdir_option(&[a, b], Some((from, to))),
            "/proc/self/fd/7/1/fs:/a\\:b"
        );
        assert_eq!(
            common_parent(&[Path::new("/r/s/1/fs"), Path::new("/r/s/22/fs")]),
            Some(PathBuf::from("/r/s"))
        );
        assert_eq!(
            common_parent(&[Path::new("/r/s/1/fs")]),
            Some(PathBuf::from("/r/s/1"))
        );
        assert_eq!(common_parent(&[Path::new("/a/x"), Path::new("/b/y")]), None);
    }

    #[test]
    fn kernel_messages_are_appended_to_the_error() {
        let e = MountError::Kernel {
            fstype: "erofs".into(),
            step: "fsconfig_create".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
            messages: vec!["e erofs: bad".into(), "w erofs: meh".into()],
        };
        let s = e.to_string();
        assert!(s.starts_with("erofs mount: fsconfig_create: "), "{s}");
        assert!(s.ends_with(" (kernel: e erofs: bad; w erofs: meh)"), "{s}");
        let e = MountError::Kernel {
            fstype: "erofs".into(),
            step: "fsmount".into(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
            messages: vec![],
        };
        assert!(!e.to_string().contains("kernel:"));
    }

    #[test]
    fn bad_extra_options_are_rejected() {
        // `set_option` validates before touching the kernel only for empty
        // keys; exercise the parser through a context when we can open one.
        if let Ok(fc) = FsContext::open("overlay") {
            assert!(matches!(
                fc.set_option(""),
                Err(MountError::InvalidOption(_))
            ));
            assert!(matches!(
                fc.set_option("=x"),
                Err(MountError::InvalidOption(_))
            ));
        }
    }
}
