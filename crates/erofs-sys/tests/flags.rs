//! The immutable inode flag on ext4 and tmpfs (needs root).

mod common;

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use common::MountGuard;
use erofs_sys::flags::{self, FlagsError, IFlags};

/// Clears the immutable flag on drop so the temporary directory can be
/// removed even if the test fails.
struct Mutable(PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = flags::set_immutable_path(&self.0, false);
    }
}

/// Sets, checks and clears the immutable flag of a file in `dir`.
fn exercise_immutable(dir: &Path) {
    let path = dir.join("layer.erofs");
    fs::write(&path, b"layer").unwrap();
    let _guard = Mutable(path.clone());
    let file = File::open(&path).unwrap();

    assert!(!flags::get_flags(&file).unwrap().contains(IFlags::IMMUTABLE));
    assert!(flags::set_immutable(&file, true).unwrap(), "should change");
    assert!(!flags::set_immutable(&file, true).unwrap(), "already set");
    assert!(flags::get_flags(&file).unwrap().contains(IFlags::IMMUTABLE));

    let err = OpenOptions::new().write(true).open(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    let err = fs::remove_file(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(fs::read(&path).unwrap(), b"layer");

    assert!(flags::set_immutable_path(&path, false).unwrap());
    assert!(
        !flags::set_immutable(&file, false).unwrap(),
        "already clear"
    );
    assert!(!flags::get_flags(&file).unwrap().contains(IFlags::IMMUTABLE));
    fs::write(&path, b"writable again").unwrap();
    fs::remove_file(&path).unwrap();
}

#[test]
fn immutable_on_ext4() {
    require_root!();
    let Some(tmp) = common::ext4_tmp() else {
        eprintln!("skipping: neither /var/tmp nor /tmp is ext4");
        return;
    };
    let dir = tempfile::tempdir_in(tmp).unwrap();
    exercise_immutable(dir.path());
}

/// tmpfs implements FS_IOC_GETFLAGS/SETFLAGS (since Linux 6.0), immutable
/// flag included; this is what the 6.18 kernel here does.
#[test]
fn immutable_on_tmpfs() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    rustix::mount::mount(
        "tmpfs",
        dir.path(),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        Some(c"size=1m"),
    )
    .unwrap();
    let _mounted = MountGuard::new(dir.path());
    assert_eq!(common::fs_magic(dir.path()), Some(common::TMPFS_MAGIC));
    exercise_immutable(dir.path());
}

/// A filesystem without inode flags answers `Unsupported`: procfs has no
/// FS_IOC_GETFLAGS.
#[test]
fn no_flags_on_procfs_is_unsupported() {
    let file = File::open("/proc/self/status").unwrap();
    match flags::get_flags(&file) {
        Err(FlagsError::Unsupported(_)) => {}
        other => panic!("expected FlagsError::Unsupported, got {other:?}"),
    }
    match flags::set_immutable(&file, true) {
        Err(FlagsError::Unsupported(_)) => {}
        other => panic!("expected FlagsError::Unsupported, got {other:?}"),
    }
}
