//! The free-space reserve under the root (`daemon.min_free_space`): requests that write refuse
//! to start below it, and the long ones stop when their writes take the filesystem below it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::config::Reserve;
use crate::error::{Error, Result};

/// How often (at most) a long request asks the filesystem how much is free (a statvfs costs
/// a microsecond or two; the builder asks once per entry and per chunk). Writes can overshoot
/// by what they write in this time; the request checks once more when it is done.
const RECHECK_MS: u64 = 10;

/// The reserve of one root.
#[derive(Debug, Clone)]
pub(crate) struct Space {
    root: PathBuf,
    reserve: Reserve,
    setting: String,
}

/// Free and total bytes of the filesystem under `path`.
fn statvfs(path: &Path) -> Result<(u64, u64)> {
    let st = rustix::fs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
    Ok((
        st.f_bavail.saturating_mul(st.f_frsize),
        st.f_blocks.saturating_mul(st.f_frsize),
    ))
}

/// Whether `free` of `total` bytes is below `reserve`. A filesystem that reports no size at
/// all (ramfs: 0 blocks, 0 free) has no limit a reserve could keep us from, so never: else
/// every write on it would be refused.
fn below(free: u64, total: u64, reserve: Reserve) -> bool {
    total != 0 && free < reserve.bytes(total)
}

/// Bytes, with a binary-unit figure for people.
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = "bytes";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if unit == "bytes" {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {unit} ({n} bytes)")
    }
}

impl Space {
    pub(crate) fn new(root: &Path, reserve: Reserve, setting: &str) -> Self {
        Space {
            root: root.to_path_buf(),
            reserve,
            setting: setting.to_string(),
        }
    }

    /// ResourceExhausted, naming the root and the numbers, when free space is below the
    /// reserve; `what` says who asks ("Apply", "Commit of \"k\"").
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        let (free, total) = statvfs(&self.root)?;
        let reserve = self.reserve.bytes(total);
        if below(free, total, self.reserve) {
            return Err(Error::resource_exhausted(format!(
                "{what}: only {} free on the filesystem of {} (of {}), below the reserve of {} (daemon.min_free_space = {:?})",
                human(free),
                self.root.display(),
                human(total),
                human(reserve),
                self.setting
            )));
        }
        Ok(())
    }

    /// What free space is like now, for the message of a request that ran out of it.
    pub(crate) fn report(&self) -> String {
        match statvfs(&self.root) {
            Ok((free, total)) => format!(
                "{} free on the filesystem of {} (of {}; reserve {}, daemon.min_free_space = {:?})",
                human(free),
                self.root.display(),
                human(total),
                human(self.reserve.bytes(total)),
                self.setting
            ),
            Err(e) => e.to_string(),
        }
    }

    /// [`Self::check`] for a long request, asking the filesystem at most every 10 ms: the
    /// condition its cancellation token carries.
    pub(crate) fn watch(self, what: String) -> impl Fn() -> Result<()> + Send + Sync + 'static {
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        move || {
            let now = start.elapsed().as_millis() as u64;
            let prev = last.load(Ordering::Relaxed);
            if now < prev + RECHECK_MS && prev != 0 {
                return Ok(());
            }
            last.store(now.max(1), Ordering::Relaxed);
            self.check(&what)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_reserve_with_the_numbers() {
        let dir = tempfile::tempdir().unwrap();
        Space::new(dir.path(), Reserve::Bytes(0), "0")
            .check("Apply")
            .unwrap();
        Space::new(dir.path(), Reserve::Percent(0.0), "0%")
            .check("Apply")
            .unwrap();
        let e = Space::new(dir.path(), Reserve::Percent(100.0), "100%")
            .check("Apply")
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::ResourceExhausted);
        let m = e.to_string();
        assert!(m.starts_with("Apply: only "), "{m}");
        assert!(m.contains(&dir.path().display().to_string()), "{m}");
        assert!(m.contains("daemon.min_free_space = \"100%\""), "{m}");
        assert_eq!(human(512), "512 bytes");
    }

    /// ramfs reports 0 blocks and 0 free (found by the kernel matrix: every Prepare on a
    /// ramfs root was refused; integrity's `immutable_on_a_filesystem_without_flags` shows it
    /// on a real ramfs): no size, no reserve.
    #[test]
    fn a_filesystem_without_a_size_has_no_reserve() {
        assert!(!below(0, 0, Reserve::Bytes(1 << 30)));
        assert!(!below(0, 0, Reserve::Percent(50.0)));
        assert!(below(0, 4096, Reserve::Bytes(1)));
        assert!(below(1 << 20, 1 << 30, Reserve::Bytes(2 << 20)));
        assert!(!below(3 << 20, 1 << 30, Reserve::Bytes(2 << 20)));
        assert_eq!(human(3 << 20), "3.0 MiB (3145728 bytes)");
    }
}
