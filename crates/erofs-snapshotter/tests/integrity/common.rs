//! The helpers the integrity tests share. The daemon under test in its private directory
//! ([`Env`], configured by [`Cfg`]) lives in `testsuite::daemon_env`; these tests start it
//! from the crate's own binary ([`BIN`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
pub use testsuite::daemon_env::{Cfg, Env};

/// The daemon binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
/// `ENOSPC`.
pub const ENOSPC: i32 = 28;
/// `EPERM`.
pub const EPERM: i32 = 1;
/// The id mapping of the idmap tests: container ids 0..65536 are host ids 100000..165536.
pub const MAP: &str = "0:100000:65536";
/// Label with the writable layer size of one snapshot.
pub const LABEL_MAX_SIZE: &str = "containerd.io/snapshot/max-size";
/// Labels with user-namespace id mappings.
pub const LABEL_UIDMAPPING: &str = "containerd.io/snapshot/uidmapping";
/// See [`LABEL_UIDMAPPING`].
pub const LABEL_GIDMAPPING: &str = "containerd.io/snapshot/gidmapping";

/// Whether `path` has `FS_IMMUTABLE_FL` (errors when the filesystem has no flags).
pub fn is_immutable(path: &Path) -> Result<bool> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let flags = erofs_sys::flags::get_flags(&f)
        .with_context(|| format!("FS_IOC_GETFLAGS on {}", path.display()))?;
    Ok(flags.contains(erofs_sys::flags::IFlags::IMMUTABLE))
}

/// Flip every bit of the byte at `off` of `path`.
pub fn flip_byte(path: &Path, off: u64) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off)?;
    f.write_all_at(&[!b[0]], off)?;
    f.sync_all()?;
    Ok(())
}

/// Run `cmd`, failing with its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a test body on `env` (daemon started first): an error fails the test with the error
/// chain and the daemon log tail; the env is torn down in any case.
pub fn run<F>(env: Result<Env>, f: F)
where
    F: AsyncFnOnce(&mut Env) -> Result<()>,
{
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests need root (they mount)"
    );
    let mut env = env.expect("creating the test environment");
    block_on(async move {
        if let Err(e) = env.start().await {
            panic!("starting the daemon: {e:#}");
        }
        let r = f(&mut env).await;
        if let Err(e) = r {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            panic!("{}", chain.join("\n  caused by: "));
        }
        if let Err(e) = env.stop() {
            panic!("stopping the daemon: {e:#}");
        }
    });
}

/// A multi-threaded runtime for one test.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// A gzip-compressed copy of `data`.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data)?;
    Ok(e.finish()?)
}
