//! What the kernel shows of loop and device-mapper devices, and helpers the kernel tests
//! share.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The running kernel's (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let uts = rustix::system::uname();
    let rel = uts.release().to_string_lossy().into_owned();
    let mut it = rel.split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Whether this kernel mounts EROFS from a regular file (Linux 6.12+); before that every
/// layer needs a loop device.
pub fn erofs_file_backed() -> bool {
    kernel_version() >= (6, 12)
}

/// A loop device bound to a file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loop {
    /// `loop3`.
    pub name: String,
    /// Its backing file (without the kernel's ` (deleted)` suffix).
    pub backing: PathBuf,
    /// Whether the device is read-only.
    pub ro: bool,
}

/// The loop devices whose backing file is below `dir`, by name.
pub fn loops_under(dir: &Path) -> Result<Vec<Loop>> {
    let mut v = Vec::new();
    for e in fs::read_dir("/sys/block").context("reading /sys/block")? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let b = b.trim_end_matches('\n');
        let backing = PathBuf::from(b.strip_suffix(" (deleted)").unwrap_or(b));
        if backing.starts_with(dir) {
            let ro = fs::read_to_string(e.path().join("ro")).unwrap_or_default();
            v.push(Loop {
                name,
                backing,
                ro: ro.trim() == "1",
            });
        }
    }
    v.sort();
    Ok(v)
}

/// A device-mapper device: `dm-N` and its name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dm {
    /// `dm-0`.
    pub block: String,
    /// Its device-mapper name.
    pub name: String,
}

/// Device-mapper devices whose name starts with `prefix`.
pub fn dm_devices(prefix: &str) -> Result<Vec<Dm>> {
    let mut v = Vec::new();
    for e in fs::read_dir("/sys/block").context("reading /sys/block")? {
        let e = e?;
        let block = e.file_name().to_string_lossy().into_owned();
        if !block.starts_with("dm-") {
            continue;
        }
        let name = fs::read_to_string(e.path().join("dm/name")).unwrap_or_default();
        let name = name.trim().to_string();
        if name.starts_with(prefix) {
            v.push(Dm { block, name });
        }
    }
    v.sort();
    Ok(v)
}

/// Polls `f` until it returns `Some` or `limit` passes (the kernel frees autoclear loop
/// devices and lazily detached mounts asynchronously); the error says what was awaited and
/// what the last look saw.
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<std::result::Result<T, String>>,
) -> Result<T> {
    let t0 = Instant::now();
    loop {
        match f()? {
            Ok(v) => return Ok(v),
            Err(last) if t0.elapsed() >= limit => {
                bail!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until no loop device is bound to a file below `dir`.
pub fn wait_no_loops(dir: &Path, when: &str) -> Result<()> {
    wait_until(
        &format!("loop devices released {when}"),
        Duration::from_secs(15),
        || {
            let l = loops_under(dir)?;
            Ok(if l.is_empty() {
                Ok(())
            } else {
                Err(format!("{l:?}"))
            })
        },
    )
}

/// `echo 3 > /proc/sys/vm/drop_caches` after a sync: the next reads come from the device.
pub fn drop_caches() -> Result<()> {
    rustix::fs::sync();
    fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the page cache")
}
