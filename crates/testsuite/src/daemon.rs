//! A proxy daemon (our snapshotter/differ, later) as a child process:
//! `BINARY serve --config FILE`, logs to a file, ready when its socket accepts.
//!
//! The daemon runs in the test's (host) mount namespace. For containerd to see
//! the mounts it makes, its root must be below [`Containerd::base_dir`]
//! (see the [`containerd`](crate::containerd) module docs):
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use testsuite::{Containerd, ContainerdOpts, Daemon, Version};
//! # let binary = std::path::Path::new("target/debug/erofs-snapshotter");
//! let dir = tempfile::tempdir()?; // or a directory below the containerd base
//! let socket = dir.path().join("erofs.sock");
//! let daemon = Daemon::start(binary, "root = \"/some/root\"\n", &socket)?;
//! let ctd = Containerd::start(
//!     ContainerdOpts::new(Version::V2_1)
//!         .proxy_snapshotter("erofs-rs", daemon.socket())
//!         .proxy_differ("erofs-rs-diff", daemon.socket()),
//! )?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Containerd::base_dir`]: crate::Containerd::base_dir

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::ProcessGroupGuard;

/// How to start a [`Daemon`].
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// The daemon binary.
    pub binary: PathBuf,
    /// Config file content, written to a private file passed as `--config`.
    pub config_toml: String,
    /// The socket to wait for.
    pub socket: PathBuf,
    /// Arguments before `--config FILE` (default `["serve"]`).
    pub args: Vec<OsString>,
    /// Environment variables added to a clean environment (`PATH` is set).
    pub env: Vec<(OsString, OsString)>,
    /// How long to wait for the socket.
    pub start_timeout: Duration,
    /// Grace period between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
}

impl DaemonOpts {
    /// `binary serve --config FILE`, waiting for `socket`.
    pub fn new(binary: &Path, config_toml: &str, socket: &Path) -> Self {
        DaemonOpts {
            binary: binary.to_path_buf(),
            config_toml: config_toml.to_owned(),
            socket: socket.to_path_buf(),
            args: vec!["serve".into()],
            env: vec![("RUST_BACKTRACE".into(), "1".into())],
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// A running daemon. Drop sends SIGTERM, then SIGKILL after the stop timeout,
/// and removes its private directory (config and log).
#[derive(Debug)]
pub struct Daemon {
    process: Option<ProcessGroupGuard>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Daemon {
    /// Starts `binary serve --config FILE` with `config_toml` in FILE and waits
    /// until `socket` accepts connections.
    pub fn start(binary: &Path, config_toml: &str, socket: &Path) -> Result<Daemon> {
        Self::start_with(DaemonOpts::new(binary, config_toml, socket))
    }

    /// [`start`](Self::start) with options.
    pub fn start_with(opts: DaemonOpts) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("daemon-").tempdir()?;
        let config = dir.path().join("config.toml");
        fs::write(&config, &opts.config_toml)?;
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(&opts.binary);
        cmd.args(&opts.args)
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir.path());
        let name = opts
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "daemon".into());
        let mut p = ProcessGroupGuard::spawn(&mut cmd, &name, Some(&log))?;
        p.set_stop_timeout(opts.stop_timeout);
        wait_serving(&mut p, &opts.socket, opts.start_timeout)?;
        Ok(Daemon {
            process: Some(p),
            dir,
            socket: opts.socket,
        })
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    /// The config file passed as `--config`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log_path(), lines)
    }

    /// Fails with the log tail if the daemon has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.process.as_mut() {
            Some(p) => p.ensure_running(),
            None => bail!("daemon stopped"),
        }
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after the stop timeout) and
    /// returns its exit status (`None` if it was stopped before).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.process.take().and_then(|mut p| p.stop())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `binary serve --config CONFIG` as its own process group, its output appended to
/// `log` after a line with `banner`: for tests that restart a daemon on the same root and
/// config and read one log across its runs (the caller sets the environment in `configure`).
pub fn spawn_serve(
    binary: &Path,
    config: &Path,
    log: &Path,
    banner: &str,
    configure: impl FnOnce(&mut Command),
) -> Result<ProcessGroupGuard> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(f, "===== test: {banner} =====")?;
    let mut cmd = Command::new(binary);
    cmd.arg("serve").arg("--config").arg(config);
    configure(&mut cmd);
    let name = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "daemon".into());
    ProcessGroupGuard::spawn(&mut cmd, &name, Some(log))
}

/// Waits until `socket` accepts connections. Fails with the log tail if the daemon exits
/// first, or after `timeout` (and then kills it).
pub fn wait_serving(p: &mut ProcessGroupGuard, socket: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        p.ensure_running()
            .with_context(|| format!("{} exited before its socket accepted", p.name()))?;
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            p.kill();
            bail!(
                "{}: {} does not accept connections after {timeout:?}; log tail:\n{}",
                p.name(),
                socket.display(),
                p.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a daemon that should refuse to start: returns its exit status. Fails (and
/// kills it) if it serves on `socket` instead, or is still running after `timeout`.
pub fn wait_refusal(
    p: &mut ProcessGroupGuard,
    socket: &Path,
    timeout: Duration,
) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while !p.has_exited() {
        if UnixStream::connect(socket).is_ok() {
            p.kill();
            bail!(
                "{} started serving; log tail:\n{}",
                p.name(),
                p.log_tail(30)
            );
        }
        if Instant::now() >= deadline {
            p.kill();
            bail!("{} neither served nor exited within {timeout:?}", p.name());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    p.wait_exit(Duration::ZERO)
}

/// Waits up to `timeout` for the daemon to abort at crash point `point`: killed by SIGABRT,
/// with the crash point named at the end of its log.
pub fn expect_abort(p: &mut ProcessGroupGuard, point: &str, timeout: Duration) -> Result<()> {
    let st = p
        .wait_exit(timeout)
        .with_context(|| format!("waiting for crash point {point}"))?;
    ensure!(
        st.signal() == Some(rustix::process::Signal::ABORT.as_raw()),
        "expected the daemon to abort at {point}, it exited with {st}"
    );
    ensure!(
        p.log_tail(20).contains(&format!("crash point {point}")),
        "the daemon aborted but did not report crash point {point}"
    );
    Ok(())
}
