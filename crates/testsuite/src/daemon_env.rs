//! A proxy daemon under test in a private directory of its own: its configuration by
//! section ([`Cfg`]), and an [`Env`] that starts it from a given binary, connects a gRPC
//! client to its Snapshots and Diff services and offers the snapshot-directory helpers
//! socket tests share (the integrity tests and the option-cost benchmark).
//!
//! Every [`Env`] owns a private directory (under `/tmp`, or a directory it is given, e.g.
//! below a containerd instance's base directory) with the snapshotter root, the socket, the
//! config, the daemon log, a content store directory for the differ and a `work/` area for
//! mount points. Dropping it stops the daemon, detaches every mount below the directory
//! (deepest first), clears `FS_IMMUTABLE_FL` on everything left (immutable layers cannot be
//! deleted otherwise) and deletes the directory, also when the caller panics.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use containerd_api::containerd::types::{Descriptor, Mount};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::client::{Client, connect};
use crate::daemon;
use crate::mounts::{self_mounts_under, unmount_all_under};
use crate::process::ProcessGroupGuard;
use crate::rootfs::{Mounted, mount_all, parse_overlay};

/// The core's crash-point variable (`snapshotter::failpoint::ENV`).
pub const CRASH_ENV: &str = "EROFS_SNAPSHOTTER_CRASH_AT";

/// The daemon's configuration, by section; `root_path`, `address` and the differ's
/// `content_root` and `containerd_address` are filled in by [`Env`] unless given here.
#[derive(Debug, Clone, Default)]
pub struct Cfg {
    top: Vec<String>,
    snapshotter: Vec<String>,
    differ: Vec<String>,
    /// Further sections (`[artifacts]`, `[metrics]`), in the order first named.
    sections: Vec<(String, Vec<String>)>,
}

impl Cfg {
    /// Nothing but the defaults.
    pub fn new() -> Self {
        Cfg::default()
    }
    /// A top-level line (`mount_mode = "manager"`).
    pub fn top(mut self, line: &str) -> Self {
        self.top.push(line.into());
        self
    }
    /// A `[snapshotter]` line.
    pub fn sn(mut self, line: &str) -> Self {
        self.snapshotter.push(line.into());
        self
    }
    /// A `[differ]` line.
    pub fn df(mut self, line: &str) -> Self {
        self.differ.push(line.into());
        self
    }

    /// A line of section `[name]` (other than `[snapshotter]` and `[differ]`).
    pub fn section(mut self, name: &str, line: &str) -> Self {
        match self.sections.iter_mut().find(|(n, _)| n == name) {
            Some((_, lines)) => lines.push(line.into()),
            None => self.sections.push((name.into(), vec![line.into()])),
        }
        self
    }

    fn render(&self, root: &Path, socket: &Path, content: &Path, base: &Path) -> String {
        let mut t = format!(
            "root_path = {:?}\naddress = {:?}\n",
            root.display().to_string(),
            socket.display().to_string()
        );
        for l in &self.top {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str("[snapshotter]\n");
        for l in &self.snapshotter {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str("[differ]\n");
        if !self.differ.iter().any(|l| l.starts_with("content_root")) {
            t.push_str(&format!(
                "content_root = {:?}\n",
                content.display().to_string()
            ));
        }
        if !self
            .differ
            .iter()
            .any(|l| l.starts_with("containerd_address"))
        {
            // Nothing listens there: blobs come from the content directory only, with no
            // containerd to say which namespace holds them.
            t.push_str(&format!(
                "containerd_address = {:?}\nverify_content_namespace = false\n",
                base.join("no-containerd.sock").display().to_string()
            ));
        }
        for l in &self.differ {
            t.push_str(l);
            t.push('\n');
        }
        for (name, lines) in &self.sections {
            t.push_str(&format!("[{name}]\n"));
            for l in lines {
                t.push_str(l);
                t.push('\n');
            }
        }
        t
    }
}

/// A daemon's world: directory, daemon, client.
pub struct Env {
    /// Everything of this test.
    pub base: PathBuf,
    /// The snapshotter root.
    pub root: PathBuf,
    /// Mount points and scratch files.
    pub work: PathBuf,
    /// containerd-style content store directory (`blobs/sha256/HEX`) the differ reads.
    pub content: PathBuf,
    /// The daemon socket.
    pub socket: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The daemon log (all runs appended).
    pub log: PathBuf,
    cfg: Cfg,
    /// The daemon binary (`BIN serve --config FILE`).
    bin: PathBuf,
    daemon: Option<ProcessGroupGuard>,
    client: Option<Client>,
    seq: AtomicU32,
    /// Removes `base` itself on drop (false when it belongs to someone else's tree).
    own_base: bool,
    ping: bool,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("base", &self.base).finish()
    }
}

impl Env {
    /// A fresh directory `/tmp/eit-XXXX` with `cfg` written, for the daemon binary `bin`;
    /// the daemon is not started.
    pub fn new(bin: impl AsRef<Path>, cfg: Cfg) -> Result<Env> {
        let base = tempfile::Builder::new()
            .prefix("eit-")
            .tempdir_in("/tmp")?
            .keep();
        Self::in_dir(bin, base, cfg, true)
    }

    /// [`new`](Self::new) with the snapshotter root on a fresh `fstype` mount (`tmpfs`,
    /// `ramfs`).
    pub fn on_fs(bin: impl AsRef<Path>, cfg: Cfg, fstype: &str) -> Result<Env> {
        Self::on_fs_with(bin, cfg, fstype, "mode=0700")
    }

    /// [`on_fs`](Self::on_fs) with mount options `data` (e.g. `"mode=0700,size=96m"` for a
    /// small filesystem). The mount goes with the environment, also when the test panics.
    pub fn on_fs_with(bin: impl AsRef<Path>, cfg: Cfg, fstype: &str, data: &str) -> Result<Env> {
        let env = Self::new(bin, cfg)?;
        fs::create_dir_all(&env.root)?;
        let fstype_c = std::ffi::CString::new(fstype)?;
        let data_c = std::ffi::CString::new(data)?;
        rustix::mount::mount(
            fstype_c.as_c_str(),
            &env.root,
            fstype_c.as_c_str(),
            MountFlags::empty(),
            data_c.as_c_str(),
        )
        .with_context(|| format!("mounting a {fstype} ({data}) at {}", env.root.display()))?;
        Ok(env)
    }

    /// An environment in `base` (created if needed; e.g. below a containerd base directory).
    /// `own_base`: remove `base` on drop.
    pub fn in_dir(bin: impl AsRef<Path>, base: PathBuf, cfg: Cfg, own_base: bool) -> Result<Env> {
        fs::create_dir_all(&base)?;
        // Searchable by everyone: user-namespace tests resolve paths below it as an
        // unmapped (other) user.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755))?;
        let work = base.join("work");
        let content = base.join("content");
        fs::create_dir_all(&work)?;
        fs::create_dir_all(content.join("blobs/sha256"))?;
        let env = Env {
            root: base.join("root"),
            socket: base.join("s.sock"),
            config: base.join("config.toml"),
            log: base.join("daemon.log"),
            work,
            content,
            base,
            cfg,
            bin: bin.as_ref().to_path_buf(),
            daemon: None,
            client: None,
            seq: AtomicU32::new(0),
            own_base,
            ping: true,
        };
        env.write_config()?;
        Ok(env)
    }

    fn write_config(&self) -> Result<()> {
        fs::write(
            &self.config,
            self.cfg
                .render(&self.root, &self.socket, &self.content, &self.base),
        )?;
        Ok(())
    }

    /// Replace the configuration (takes effect at the next start).
    pub fn set_config(&mut self, cfg: Cfg) -> Result<()> {
        self.cfg = cfg;
        self.write_config()
    }

    /// The client (the daemon must be running).
    pub fn c(&self) -> &Client {
        self.client.as_ref().expect("the daemon is running")
    }

    fn spawn(&self, crash_at: Option<&str>) -> Result<ProcessGroupGuard> {
        // A private TMPDIR: nothing the daemon probes there depends on other tests' mounts.
        let tmp = self.base.join("tmp");
        fs::create_dir_all(&tmp)?;
        daemon::spawn_serve(
            &self.bin,
            &self.config,
            &self.log,
            "starting the daemon",
            |cmd| {
                cmd.env("TMPDIR", &tmp)
                    .env("EROFS_SNAPSHOTTER_LOG", "info")
                    .env("RUST_BACKTRACE", "1");
                match crash_at {
                    Some(p) => cmd.env(CRASH_ENV, p),
                    None => cmd.env_remove(CRASH_ENV),
                };
            },
        )
    }

    /// Starts the daemon (none may be running) and connects the client.
    pub async fn start(&mut self) -> Result<()> {
        self.start_with(None).await
    }

    /// Starts the daemon with a crash point (`EROFS_SNAPSHOTTER_CRASH_AT`): it aborts when it
    /// reaches it.
    pub async fn start_with(&mut self, crash_at: Option<&str>) -> Result<()> {
        ensure!(self.daemon.is_none(), "a daemon is already running");
        let _ = fs::remove_file(&self.socket);
        let mut p = self.spawn(crash_at)?;
        daemon::wait_serving(&mut p, &self.socket, Duration::from_secs(30))?;
        p.set_stop_timeout(Duration::from_secs(30));
        self.daemon = Some(p);
        self.client = Some(Client::new(connect(&self.socket).await?, "erofs-rs"));
        if self.ping {
            // One request served: by then the daemon handles SIGTERM (see
            // erofs-snapshotter's integrity test lifecycle::sigterm_right_after_start_is_graceful).
            let _ = self.c().stat("integrity-test-ping").await;
        }
        Ok(())
    }

    /// The running daemon's process id.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|p| p.pid())
    }

    /// Fails with the log tail if the daemon has exited (or was never started).
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.daemon.as_mut() {
            Some(p) => p.ensure_running(),
            None => anyhow::bail!("no daemon running"),
        }
    }

    /// Whether [`start`](Self::start) waits for one request to be served (default true).
    pub fn set_ping(&mut self, on: bool) {
        self.ping = on;
    }

    /// Starts the daemon expecting it to refuse: returns its exit status and what it logged
    /// in this run. Fails if it serves.
    pub fn start_expecting_refusal(&mut self) -> Result<(ExitStatus, String)> {
        ensure!(self.daemon.is_none(), "a daemon is already running");
        let before = fs::read(&self.log).map(|b| b.len()).unwrap_or(0);
        let mut p = self.spawn(None)?;
        let st = daemon::wait_refusal(&mut p, &self.socket, Duration::from_secs(30))?;
        let all = fs::read(&self.log)?;
        Ok((st, String::from_utf8_lossy(&all[before..]).into_owned()))
    }

    /// Stops the daemon gracefully (SIGTERM, SIGKILL after 30 s); fails unless it exits 0.
    pub fn stop(&mut self) -> Result<()> {
        self.client = None;
        let Some(mut p) = self.daemon.take() else {
            return Ok(());
        };
        let st = p.stop().context("reaping the daemon")?;
        ensure!(st.success(), "the daemon exited with {st} after SIGTERM");
        Ok(())
    }

    /// `kill -9` the daemon's process group and reap it (its mounts and devices stay).
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.client = None;
        self.daemon.take()?.kill()
    }

    /// Waits for the daemon to abort at crash point `point`.
    pub async fn expect_abort(&mut self, point: &str) -> Result<()> {
        self.client = None;
        let mut p = self.daemon.take().context("no daemon running")?;
        daemon::expect_abort(&mut p, point, Duration::from_secs(60))
    }

    /// The whole daemon log.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the daemon log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// A fresh directory under `work/`.
    pub fn new_dir(&self, prefix: &str) -> Result<PathBuf> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let d = self.work.join(format!("{prefix}-{n}"));
        fs::create_dir_all(&d)?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        Ok(d)
    }

    /// Performs `mounts` on a fresh directory under `work/`.
    pub fn mount(&self, mounts: &[Mount], prefix: &str) -> Result<Mounted> {
        let target = self.new_dir(prefix)?;
        mount_all(mounts, &target)
    }

    /// `ROOT/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// `ROOT/snapshots/ID`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// `ROOT/snapshots/ID/layer.erofs`.
    pub fn layer(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("layer.erofs")
    }

    /// The snapshot id a path under `ROOT/snapshots/ID/...` belongs to.
    pub fn id_of(&self, path: &Path) -> Option<u64> {
        let rest = path.strip_prefix(self.snapshots_dir()).ok()?;
        rest.components().next()?.as_os_str().to_str()?.parse().ok()
    }

    /// The snapshot directory a mount list writes to or shows: a bind's source, an overlay's
    /// upper dir, or a read-only overlay's top lower.
    pub fn id_of_mounts(&self, mounts: &[Mount]) -> Result<u64> {
        let m = mounts.last().context("empty mount list")?;
        let path = match m.r#type.as_str() {
            "bind" | "erofs" => m.source.clone(),
            _ => {
                let o = parse_overlay(m)?;
                o.upper
                    .unwrap_or_else(|| o.lowers[0].clone())
                    .display()
                    .to_string()
            }
        };
        self.id_of(Path::new(&path))
            .with_context(|| format!("{path} is not a snapshot directory of {m:?}"))
    }

    /// Prepare `key` on `parent`, write `files` (path, content) into it, commit it as `name`;
    /// returns the snapshot id.
    pub async fn layer_with(
        &self,
        key: &str,
        parent: &str,
        name: &str,
        files: &[(&str, &[u8])],
    ) -> Result<u64> {
        let mounts = self.c().prepare(key, parent).await?;
        let id = self.id_of_mounts(&mounts)?;
        let m = self.mount(&mounts, "fill")?;
        for (p, data) in files {
            let p = m.path().join(p);
            if let Some(d) = p.parent() {
                fs::create_dir_all(d)?;
            }
            fs::write(&p, data)?;
        }
        m.unmount()?;
        self.c().commit(name, key).await?;
        Ok(id)
    }

    /// Store a blob in the content directory; returns its descriptor.
    pub fn add_blob(&self, media_type: &str, data: &[u8]) -> Result<Descriptor> {
        let digest = crate::oci::sha256_digest(data);
        let hex = digest.trim_start_matches("sha256:");
        fs::write(self.content.join("blobs/sha256").join(hex), data)?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: data.len() as i64,
            annotations: Default::default(),
        })
    }

    /// Prepare `key` (no parent), Apply `desc` through the Diff service and commit as `name`;
    /// returns the snapshot id and the applied descriptor.
    pub async fn apply_layer(
        &self,
        key: &str,
        name: &str,
        desc: &Descriptor,
    ) -> Result<(u64, Descriptor)> {
        let mounts = self.c().prepare(key, "").await?;
        let id = self.id_of_mounts(&mounts)?;
        let applied = self
            .c()
            .apply(desc, &mounts)
            .await
            .with_context(|| format!("applying {} ({})", desc.digest, desc.media_type))?;
        self.c().commit(name, key).await?;
        Ok((id, applied))
    }

    /// Detach the daemon's read-only mount of layer `id` (`ROOT/snapshots/ID/fs`), so the
    /// next use of the layer mounts (and verifies) it again.
    pub fn unmount_layer(&self, id: u64) -> Result<()> {
        let fs_dir = self.snapshot_dir(id).join("fs");
        for m in self_mounts_under(&self.snapshot_dir(id))? {
            if m.mount_point == fs_dir {
                rustix::mount::unmount(&fs_dir, UnmountFlags::DETACH)
                    .with_context(|| format!("umount -l {}", fs_dir.display()))?;
            }
        }
        ensure!(
            !self_mounts_under(&fs_dir)?
                .iter()
                .any(|m| m.mount_point == fs_dir),
            "{} is still mounted",
            fs_dir.display()
        );
        Ok(())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log tail ({}) ---\n{}",
                self.log.display(),
                self.log_tail(60)
            );
        }
        // SIGTERM, then SIGKILL after 10 s.
        self.client = None;
        if let Some(mut p) = self.daemon.take() {
            p.set_stop_timeout(Duration::from_secs(10));
        }
        if let Err(e) = unmount_all_under(&self.base) {
            eprintln!("leaving {} behind: {e:#}", self.base.display());
            return;
        }
        clear_immutable_under(&self.base);
        let r = if self.own_base {
            fs::remove_dir_all(&self.base)
        } else {
            let mut r = Ok(());
            for e in fs::read_dir(&self.base).into_iter().flatten().flatten() {
                let p = e.path();
                let x = if p.is_dir() && !p.is_symlink() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                if x.is_err() {
                    r = x;
                }
            }
            r
        };
        if let Err(e) = r {
            eprintln!("removing {}: {e}", self.base.display());
        }
    }
}

/// Clear `FS_IMMUTABLE_FL` on every file and directory below `dir` (not crossing mounts:
/// call it after unmounting), ignoring filesystems without the flag.
pub fn clear_immutable_under(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_symlink() {
                continue;
            }
            let p = e.path();
            if t.is_file() || t.is_dir() {
                let _ = erofs_sys::flags::set_immutable_path(&p, false);
            }
            if t.is_dir() {
                stack.push(p);
            }
        }
    }
}
