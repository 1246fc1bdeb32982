//! Helpers shared by the kernel tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Returns early from a test (printing why) unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: this test needs root");
            return;
        }
    };
}

/// Unmounts its path (lazily) when dropped, so tests clean up even when an
/// assertion fails halfway.
#[derive(Debug)]
pub struct MountGuard {
    target: Option<PathBuf>,
}

impl MountGuard {
    pub fn new(target: &Path) -> Self {
        Self {
            target: Some(target.to_owned()),
        }
    }

    /// Unmounts now, without MNT_DETACH, so that a busy mount fails.
    pub fn unmount(mut self) -> rustix::io::Result<()> {
        let target = self.target.take().expect("mounted");
        rustix::mount::unmount(&target, rustix::mount::UnmountFlags::empty())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            let _ = rustix::mount::unmount(&target, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// The mountinfo line for `target`, if it is a mount point.
pub fn mountinfo(target: &Path) -> Option<String> {
    let target = target.canonicalize().ok()?;
    let target = target.to_str()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .rfind(|line| line.split(' ').nth(4) == Some(target))
        .map(str::to_owned)
}

/// Polls `cond` every 20 ms for up to 5 s.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// `statfs` magic of ext4.
pub const EXT4_SUPER_MAGIC: i64 = 0xEF53;
/// `statfs` magic of tmpfs.
pub const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A directory on ext4 for temporary files: /var/tmp or /tmp, whichever is
/// ext4.
pub fn ext4_tmp() -> Option<&'static Path> {
    ["/var/tmp", "/tmp"]
        .into_iter()
        .map(Path::new)
        .find(|p| fs_magic(p) == Some(EXT4_SUPER_MAGIC))
}

/// The `statfs` magic number of the filesystem holding `path`.
// `f_type`'s integer type differs between architectures.
#[allow(clippy::unnecessary_cast)]
pub fn fs_magic(path: &Path) -> Option<i64> {
    rustix::fs::statfs(path).ok().map(|s| s.f_type as i64)
}
