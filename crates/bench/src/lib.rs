//! What the benchmark drivers in `src/bin` share: where the daemon binary is, and the
//! measuring helpers (medians, cold page cache, content digests).

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// The variable naming the daemon binary when `--daemon` is not given.
pub const DAEMON_ENV: &str = "BENCH_DAEMON";

/// The daemon binary: `given`, else the `erofs-snapshotter` next to this executable (both are
/// built into the same `target/<profile>` directory); fails unless it is a file.
pub fn daemon_path(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe().context("locating this executable")?;
            let dir = exe.parent().context("this executable has no directory")?;
            dir.join("erofs-snapshotter")
        }
    };
    ensure!(
        path.is_file(),
        "no daemon binary at {} (build it with `cargo build --release -p erofs-snapshotter`, \
         or give --daemon)",
        path.display()
    );
    Ok(path)
}

/// The bench data directory of this checkout (`bench/work`, filled by `bench/datasets.sh`).
pub fn default_work_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/work")
}

/// The median of `v` (sorted in place); zero when empty.
pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Writes dirty pages back and drops the page cache (best effort: needs root).
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

/// Reads `path` once, so that it is in the page cache.
pub fn warm(path: &Path) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// `sha256:HEX` of the file at `path` (a layer blob's digest).
pub fn sha256_digest_of_file(path: &Path) -> Result<String> {
    Ok(format!("sha256:{}", testsuite::oci::sha256_file(path)?))
}
