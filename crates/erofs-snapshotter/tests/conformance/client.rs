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

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::Mount;
use testsuite::client::{Client, Labels, connect};
use testsuite::daemon;
use testsuite::mounts::unmount_all_under;
use testsuite::process::ProcessGroupGuard;
use testsuite::rootfs::{Mounted, mount_all};
pub use testsuite::snapshots::{Mode, default_labels};
use testsuite::snapshots::{Scratch, SnapshotterUnderTest};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// The daemon binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
/// The crash-point variable of the core (`snapshotter::failpoint::ENV`).
pub const CRASH_ENV: &str = "EROFS_SNAPSHOTTER_CRASH_AT";

/// A client of the daemon on `ch` as the suite uses it: named `erofs-rs`, a 300 s deadline per
/// call, [`default_labels`] unless given others.
fn client(ch: Channel) -> Client {
    Client::new(ch, "erofs-rs")
        .with_timeout(Duration::from_secs(300))
        .with_default_labels(default_labels)
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
    /// `max_unmerged_layers = 1` in the config.
    pub flatten: bool,
    /// The client (replaced on every daemon start).
    pub sn: Client,
    daemon: Option<ProcessGroupGuard>,
    scratch: Scratch,
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
    run_with(mode, false, f)
}

/// [`run`] with `max_unmerged_layers = 1`: every snapshot on two layers or more has a
/// flattened lower (the parent's fsmeta.erofs).
pub fn run_flattened<F>(mode: Mode, f: F)
where
    F: AsyncFnOnce(&mut Env) -> Result<()>,
{
    run_with(mode, true, f)
}

fn run_with<F>(mode: Mode, flatten: bool, f: F)
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
        let mut env = match Env::new(mode, flatten) {
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
    fn new(mode: Mode, flatten: bool) -> Result<Env> {
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
        toml.push_str(mode.config_toml());
        if flatten {
            if !mode.config_toml().contains("[snapshotter]") {
                toml.push_str("[snapshotter]\n");
            }
            toml.push_str("max_unmerged_layers = 1\n");
        }
        fs::write(&config, toml)?;
        let sn = client(Endpoint::try_from("http://[::]:50051")?.connect_lazy());
        let scratch = Scratch::new(&work);
        Ok(Env {
            base,
            root,
            work,
            socket,
            config,
            log,
            mode,
            flatten,
            sn,
            daemon: None,
            scratch,
            reported: false,
        })
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

    /// Performs `mounts` on a fresh directory under `work/` named after `prefix` (always
    /// for real: the daemon runs as root).
    pub fn mount(&self, mounts: &[Mount], prefix: &str) -> Result<Mounted> {
        let target = self.new_dir(prefix)?;
        mount_all(mounts, &target)
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

/// The daemon over its socket, every mount performed for real.
impl SnapshotterUnderTest for Env {
    async fn prepare_with(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        self.sn.prepare_with(key, parent, labels).await
    }

    async fn view_with(
        &self,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<Vec<Mount>, Status> {
        self.sn.view_with(key, parent, labels).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        self.sn.mounts(key).await
    }

    async fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        parent: &str,
    ) -> Result<(), Status> {
        self.sn.commit_with(name, key, labels, parent).await
    }

    async fn remove(&self, key: &str) -> Result<(), Status> {
        self.sn.remove(key).await
    }

    async fn stat(&self, key: &str) -> Result<pb::Info, Status> {
        self.sn.stat(key).await
    }

    async fn update(&self, info: pb::Info, paths: &[&str]) -> Result<pb::Info, Status> {
        self.sn.update(info, paths).await
    }

    async fn list(&self, filters: &[&str]) -> Result<Vec<pb::Info>, Status> {
        self.sn.list(filters).await
    }

    async fn walk(
        &self,
        filters: &[&str],
        f: impl AsyncFnMut(pb::Info) -> Result<()>,
    ) -> Result<Option<usize>> {
        self.sn.walk(filters, f).await.map(Some)
    }

    async fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        self.sn.usage(key).await
    }

    async fn cleanup(&self) -> Result<(), Status> {
        self.sn.cleanup().await
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn key(&self, name: &str) -> String {
        self.scratch.key(name)
    }

    fn new_dir(&self, prefix: &str) -> Result<PathBuf> {
        self.scratch.new_dir(prefix)
    }

    async fn restart(&mut self) -> Result<()> {
        Env::restart(self).await
    }

    fn can_mount(&self) -> bool {
        true
    }

    fn max_unmerged_layers(&self) -> usize {
        usize::from(self.flatten)
    }

    fn mount(&self, mounts: &[Mount], prefix: &str) -> Result<Option<Mounted>> {
        Env::mount(self, mounts, prefix).map(Some)
    }
}
