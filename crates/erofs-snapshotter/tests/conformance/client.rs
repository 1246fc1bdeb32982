//! The daemon under test and a gRPC client for it.
//!
//! Every test gets an [`Env`]: a private directory under `/tmp` holding the snapshotter root,
//! the socket, the config, the daemon log and a `work/` area for mount points and reference
//! trees. The daemon is the real binary (`erofs-snapshotter serve --config FILE`) and the
//! client talks to it over its real Unix socket. Mounts the daemon returns are performed for
//! real ([`mount_all`]). Dropping the `Env` stops the daemon and detaches every mount under
//! the directory (deepest first) before deleting it, also when the test panics; on a panic
//! the daemon log tail is printed (and with `ECT_KEEP=1` in the environment the directory
//! of a failed test is kept, its mounts detached).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::Mount;
use testsuite::client::{Client, Labels, connect, labels};
use testsuite::daemon;
use testsuite::mounts::unmount_all_under;
use testsuite::process::ProcessGroupGuard;
use testsuite::rootfs::{Mounted, mount_all, parse_overlay};
use tonic::transport::{Channel, Endpoint};

/// The daemon binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
/// The crash-point variable of the core (`snapshotter::failpoint::ENV`).
pub const CRASH_ENV: &str = "EROFS_SNAPSHOTTER_CRASH_AT";
/// containerd's GC root label, set on everything like upstream's suite does.
pub const GC_ROOT: &str = "containerd.io/gc.root";

/// Daemon configuration flavour: the suite runs in both, like upstream's `TestErofs` and
/// `TestErofsWithQuota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain upper directories.
    Plain,
    /// `[snapshotter] default_size = "64MB"`: an ext4 image per active snapshot.
    Quota,
}

/// The default label set of the suite (a GC root, like upstream's `opt`).
pub fn default_labels() -> Labels {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    labels(&[(GC_ROOT, &now.to_string())])
}

/// A client of the daemon on `ch` as the suite uses it: named `erofs-rs`, a 300 s deadline per
/// call, [`default_labels`] unless given others.
fn client(ch: Channel) -> Client {
    Client::new(ch, "erofs-rs")
        .with_timeout(Duration::from_secs(300))
        .with_default_labels(default_labels)
}

/// The kind of an info.
pub fn kind(i: &pb::Info) -> pb::Kind {
    pb::Kind::try_from(i.kind).unwrap_or(pb::Kind::Unknown)
}

/// A prost timestamp as a `SystemTime`.
pub fn time(t: &Option<prost_types::Timestamp>) -> SystemTime {
    let t = t.unwrap_or_default();
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32)
}

/// A test's world: directory, daemon, client.
pub struct Env {
    /// `/tmp/ect-XXXX`: everything of this test.
    pub base: PathBuf,
    /// The snapshotter root.
    pub root: PathBuf,
    /// Mount points and reference trees.
    pub work: PathBuf,
    /// The daemon socket.
    pub socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The daemon log (all runs appended).
    pub log: PathBuf,
    /// The configuration flavour.
    pub mode: Mode,
    /// The client (replaced on every daemon start).
    pub sn: Client,
    daemon: Option<ProcessGroupGuard>,
    seq: AtomicU32,
    reported: bool,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("base", &self.base).finish()
    }
}

/// Runs a test body on a fresh [`Env`] (daemon started): an error fails the test with the
/// daemon log tail; the env is torn down in any case.
pub fn run<F>(mode: Mode, f: F)
where
    F: AsyncFnOnce(&mut Env) -> Result<()>,
{
    assert!(
        rustix::process::geteuid().is_root(),
        "the conformance suite needs root (it mounts)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let mut env = match Env::new(mode) {
            Ok(e) => e,
            Err(e) => panic!("creating the test environment: {e:#}"),
        };
        if let Err(e) = env.start_daemon(None).await {
            env.reported = true;
            panic!("starting the daemon: {e:#}");
        }
        let t0 = Instant::now();
        let r = f(&mut env).await;
        eprintln!("test body took {:?}", t0.elapsed());
        if let Err(e) = r {
            env.reported = true;
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            panic!(
                "{}\n--- daemon log tail ({}) ---\n{}",
                chain.join("\n  caused by: "),
                env.log.display(),
                env.log_tail(60)
            );
        }
        if let Err(e) = env.stop_daemon() {
            env.reported = true;
            panic!(
                "stopping the daemon: {e:#}\n--- daemon log tail ---\n{}",
                env.log_tail(60)
            );
        }
    });
}

impl Env {
    fn new(mode: Mode) -> Result<Env> {
        let base = tempfile::Builder::new()
            .prefix("ect-")
            .tempdir_in("/tmp")?
            .keep();
        let root = base.join("root");
        let work = base.join("work");
        fs::create_dir_all(&work)?;
        let socket = base.join("s.sock");
        let config = base.join("config.toml");
        let log = base.join("daemon.log");
        let mut toml = format!(
            "root_path = {:?}\naddress = {:?}\n",
            root.display().to_string(),
            socket.display().to_string()
        );
        if mode == Mode::Quota {
            toml.push_str("[snapshotter]\ndefault_size = \"64MB\"\n");
        }
        fs::write(&config, toml)?;
        let sn = client(Endpoint::try_from("http://[::]:50051")?.connect_lazy());
        Ok(Env {
            base,
            root,
            work,
            socket,
            config,
            log,
            mode,
            sn,
            daemon: None,
            seq: AtomicU32::new(0),
            reported: false,
        })
    }

    /// `ROOT/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Starts the daemon (none may be running), with `crash_at` as the crash point, and
    /// connects the client.
    pub async fn start_daemon(&mut self, crash_at: Option<&str>) -> Result<()> {
        ensure!(self.daemon.is_none(), "a daemon is already running");
        let mut p = daemon::spawn_serve(
            Path::new(BIN),
            &self.config,
            &self.log,
            &format!("starting the daemon (crash point: {crash_at:?})"),
            |cmd| {
                cmd.env_remove(CRASH_ENV)
                    .env("EROFS_SNAPSHOTTER_LOG", "debug")
                    .env("RUST_BACKTRACE", "1");
                if let Some(p) = crash_at {
                    cmd.env(CRASH_ENV, p);
                }
            },
        )?;
        daemon::wait_serving(&mut p, &self.socket, Duration::from_secs(30))?;
        p.set_stop_timeout(Duration::from_secs(20));
        self.daemon = Some(p);
        self.sn = client(connect(&self.socket).await?);
        Ok(())
    }

    /// Stops the daemon gracefully (SIGTERM, SIGKILL after 20 s); fails unless it exits 0.
    pub fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut p) = self.daemon.take() else {
            return Ok(());
        };
        let st = p.stop().context("reaping the daemon")?;
        ensure!(st.success(), "the daemon exited with {st} after SIGTERM");
        Ok(())
    }

    /// `kill -9` the daemon (its process group) and reap it.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.daemon.take()?.kill()
    }

    /// Waits for a crash point to abort the daemon and checks it was SIGABRT.
    pub async fn expect_abort(&mut self, point: &str) -> Result<()> {
        let mut p = self.daemon.take().context("no daemon running")?;
        daemon::expect_abort(&mut p, point, Duration::from_secs(60))
    }

    /// Stop (gracefully if running) and start again on the same root, without crash point.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop_daemon()?;
        self.start_daemon(None).await
    }

    /// The last `n` lines of the daemon log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A containerd-like backend key (`testsuite/N/name`: namespace, sequence, user key).
    pub fn key(&self, name: &str) -> String {
        format!(
            "testsuite/{}/{name}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A fresh directory under `work/`.
    pub fn new_dir(&self, prefix: &str) -> Result<PathBuf> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let d = self.work.join(format!("{prefix}-{n}"));
        fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Performs `mounts` on a fresh directory under `work/` named after `prefix`.
    pub fn mount(&self, mounts: &[Mount], prefix: &str) -> Result<Mounted> {
        let target = self.new_dir(prefix)?;
        mount_all(mounts, &target)
    }

    /// The numeric snapshot directories and the other entries of `ROOT/snapshots`.
    pub fn snapshot_dirs(&self) -> Result<(BTreeSet<u64>, Vec<String>)> {
        let mut ids = BTreeSet::new();
        let mut other = Vec::new();
        for e in fs::read_dir(self.snapshots_dir())? {
            let name = e?.file_name().to_string_lossy().into_owned();
            match name.parse::<u64>() {
                Ok(id) => {
                    ids.insert(id);
                }
                Err(_) => other.push(name),
            }
        }
        Ok((ids, other))
    }

    /// `ROOT/snapshots/ID`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The snapshot id a path under `ROOT/snapshots/ID/...` belongs to.
    pub fn id_of(&self, path: &Path) -> Option<u64> {
        let rest = path.strip_prefix(self.snapshots_dir()).ok()?;
        rest.components().next()?.as_os_str().to_str()?.parse().ok()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.reported {
            eprintln!(
                "--- daemon log tail ({}) ---\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
        // SIGTERM, then SIGKILL after 10 s.
        drop(self.daemon.take());
        let keep = std::thread::panicking() && std::env::var_os("ECT_KEEP").is_some();
        match unmount_all_under(&self.base) {
            Ok(_) if keep => eprintln!("ECT_KEEP: leaving {}", self.base.display()),
            Ok(_) => {
                if let Err(e) = fs::remove_dir_all(&self.base) {
                    eprintln!("removing {}: {e}", self.base.display());
                }
            }
            Err(e) => eprintln!("leaving {} behind: {e:#}", self.base.display()),
        }
    }
}

/// Whether a mount list gives a writable root.
pub fn is_writable(mounts: &[Mount]) -> bool {
    mounts.last().is_some_and(|m| match m.r#type.as_str() {
        "bind" => m.options.iter().any(|o| o == "rw") && !m.options.iter().any(|o| o == "ro"),
        "overlay" => m.options.iter().any(|o| o.starts_with("upperdir=")),
        _ => false,
    })
}

/// Where a mount list's snapshot dirs are: for a bind, its source; for an overlay, its upper
/// (if any) and lowers. Returns (own/upper dir, lower dirs).
pub fn mount_dirs(mounts: &[Mount]) -> Result<(Option<PathBuf>, Vec<PathBuf>)> {
    ensure!(mounts.len() == 1, "expected one mount, got {mounts:?}");
    let m = &mounts[0];
    match m.r#type.as_str() {
        "bind" => Ok((Some(PathBuf::from(&m.source)), Vec::new())),
        "overlay" => {
            let o = parse_overlay(m)?;
            Ok((o.upper, o.lowers))
        }
        t => bail!("unexpected mount type {t}"),
    }
}

/// A `BTreeMap` of a directory's entries: name → is_dir.
pub fn list_dir(dir: &Path) -> Result<BTreeMap<String, bool>> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            e.file_type()?.is_dir(),
        );
    }
    Ok(out)
}
