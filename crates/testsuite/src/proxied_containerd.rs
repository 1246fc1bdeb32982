//! An end-to-end environment ([`Env`]): a private containerd (1.6, 1.7 or 2.1, from the testsuite
//! harness) with our daemon (`erofs-snapshotter serve --config FILE`) as its proxy snapshotter
//! (and, on 1.7 and 2.1, its proxy differ), optionally with its CRI plugin on our snapshotter, plus helpers to look at what ends up on disk.
//!
//! The daemon's root and socket live below the containerd instance's base directory, so the
//! layer mounts it makes in the host namespace propagate into containerd's private mount
//! namespace. Dropping an [`Env`] stops the daemon, then containerd (which kills what is left
//! of the instance, unmounts everything below its base directory and removes it).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::daemon::DaemonOpts;
use crate::mounts::{self, MountInfo};
use crate::oci::{self, OciArchive};
use crate::{
    Containerd, ContainerdOpts, Daemon, ProxyKind, ProxyPlugin, RunOpts, UnpackConfig, Version,
};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Our proxy snapshotter's name in containerd (not `erofs`: containerd 2.1 has a built-in
/// plugin of that name and panics on the clash).
pub const SN: &str = "erofs-rs";
/// Our proxy differ's name in containerd (1.7 and 2.1).
pub const DIFF: &str = "erofs-rs-diff";
/// The socket, relative to the containerd base directory.
pub const SOCK_REL: &str = "erofs/erofs.sock";
/// The line [`Env::run_on`] has the container print after the command's output.
pub const END_OF_OUTPUT: &str = "--e2e-end-of-output--";
/// The core's crash-point variable (`snapshotter::failpoint::ENV`).
pub const CRASH_ENV: &str = "EROFS_SNAPSHOTTER_CRASH_AT";

/// `mount_mode` of the daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MountMode {
    /// The daemon mounts layers and returns plain bind/overlay mounts.
    #[default]
    Host,
    /// Upstream's mount-manager shapes.
    Manager,
}

/// How to start an [`Env`].
#[derive(Debug, Clone, Default)]
pub struct EnvOpts {
    /// The daemon's `mount_mode`.
    pub mode: MountMode,
    /// Crash point the daemon aborts at (empty: none).
    pub crash_at: String,
    /// containerd's log level (default: the harness's, debug).
    pub containerd_log_level: Option<String>,
    /// Deadline of each `ctr` call (default: the harness's).
    pub ctr_timeout: Option<Duration>,
    /// containerd's CRI plugin on our snapshotter ([`crate::cri`]); with it, on versions
    /// whose proxy plugins take `exports`, our snapshotter exports `root` = the daemon's root
    /// (what the CRI plugin of 1.7 and 2.x reports as the image filesystem).
    pub cri: Option<crate::cri::CriConfig>,
    /// The daemon's root relative to containerd's base directory (default `erofs/root`).
    pub root_rel: Option<String>,
    /// The snapshotter plugin's `capabilities` (1.7 and 2.x), e.g. `remap-ids`: a proxy
    /// plugin's come from containerd's config, not from the daemon.
    pub capabilities: Vec<String>,
    /// containerd runs sid's runc ([`crate::ContainerdOpts::sid_runc`]).
    pub sid_runc: bool,
    /// Lines of the daemon's `[snapshotter]` table (e.g. `max_unmerged_layers = 1`).
    pub snapshotter_toml: String,
    /// Put in the daemon's config file right after its `[differ]` keys: plain keys land
    /// in `[differ]`, a `[table]` line starts another (before the `[snapshotter]` table).
    pub daemon_config: String,
}

/// containerd + our daemon.
pub struct Env {
    /// Which containerd.
    pub version: Version,
    /// The daemon (None while stopped or killed).
    daemon: Option<Daemon>,
    /// containerd (dropped after the daemon).
    pub ctd: Containerd,
    /// The daemon's `root_path`.
    pub root: PathBuf,
    /// The daemon's socket.
    pub sock: PathBuf,
    /// The daemon's config text.
    config: String,
    /// The daemon binary.
    binary: PathBuf,
    /// Scratch space outside the containerd base (image archives).
    pub scratch: tempfile::TempDir,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("root", &self.root).finish()
    }
}

impl Env {
    /// containerd `version` with our daemon (the binary `bin`) in `mode`, launched and
    /// reachable.
    pub fn start(bin: &Path, version: Version, mode: MountMode) -> Result<Env> {
        Self::start_opts(
            bin,
            version,
            EnvOpts {
                mode,
                ..EnvOpts::default()
            },
        )
    }

    /// [`start`](Self::start) with the daemon aborting at crash point `crash_at`.
    pub fn start_crashing_at(bin: &Path, version: Version, crash_at: &str) -> Result<Env> {
        Self::start_opts(
            bin,
            version,
            EnvOpts {
                crash_at: crash_at.to_owned(),
                ..EnvOpts::default()
            },
        )
    }

    /// [`start`](Self::start) with options.
    pub fn start_opts(bin: &Path, version: Version, o: EnvOpts) -> Result<Env> {
        crate::require_root()?;
        let sock_rel = Path::new(SOCK_REL);
        let root_rel = o
            .root_rel
            .clone()
            .unwrap_or_else(|| "erofs/root".to_owned());
        let mut plugin = ProxyPlugin::new(SN, ProxyKind::Snapshot, sock_rel);
        if o.cri.is_some() && version.proxy_plugin_extras() {
            plugin.exports.push(("root".to_owned(), root_rel.clone()));
        }
        plugin.capabilities = o.capabilities.clone();
        let mut opts = ContainerdOpts::new(version).proxy_plugin(plugin);
        opts.sid_runc = o.sid_runc;
        opts.cri = o.cri.clone();
        if let Some(level) = &o.containerd_log_level {
            opts.log_level = level.clone();
        }
        if let Some(t) = o.ctr_timeout {
            opts.ctr_timeout = t;
        }
        if version.proxy_diff() {
            opts = opts
                .proxy_differ(DIFF, sock_rel)
                .diff_service_default(&[DIFF, "walking"])
                .unpack(UnpackConfig::new(SN, Some(DIFF)));
        }
        let mut ctd = Containerd::prepare(opts)?;
        let sock = ctd.proxy_address(SN).context("proxy address")?;
        let root = ctd.dir(&root_rel)?;
        let mode = match o.mode {
            MountMode::Host => "host",
            MountMode::Manager => "manager",
        };
        let config = format!(
            "root_path = {root:?}\naddress = {sock:?}\nmount_mode = {mode:?}\n\
             [differ]\ncontent_root = {:?}\ncontainerd_address = {:?}\n{}\n\
             [snapshotter]\n{}\n",
            ctd.content_root(),
            ctd.address(),
            o.daemon_config,
            o.snapshotter_toml,
        );
        let binary = bin.to_path_buf();
        let daemon = start_daemon(&binary, &config, &sock, &o.crash_at)?;
        ctd.launch()?;
        let env = Env {
            version,
            daemon: Some(daemon),
            ctd,
            root,
            sock,
            config,
            binary,
            scratch: tempfile::Builder::new().prefix("e2e-").tempdir()?,
        };
        Ok(env)
    }

    /// The daemon's pid.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    /// The daemon's log tail.
    pub fn daemon_log(&self, lines: usize) -> String {
        self.daemon
            .as_ref()
            .map(|d| d.log_tail(lines))
            .unwrap_or_default()
    }

    /// `kill -9` the daemon (and reap it).
    pub fn kill_daemon(&mut self) -> Result<()> {
        let mut d = self.daemon.take().context("no daemon")?;
        let pid = d.pid().context("daemon has no pid")?;
        crate::process::signal_pid(pid, rustix::process::Signal::KILL)?;
        let status = d.stop();
        ensure!(
            status.is_none_or(|s| !s.success()),
            "daemon exited cleanly after SIGKILL: {status:?}"
        );
        Ok(())
    }

    /// Stops the daemon with SIGTERM; fails unless it exits cleanly.
    pub fn stop_daemon(&mut self) -> Result<()> {
        let mut d = self.daemon.take().context("no daemon")?;
        let status = d.stop();
        ensure!(
            status.is_some_and(|s| s.success()),
            "daemon exit after SIGTERM: {status:?}; log tail:\n{}",
            d.log_tail(20)
        );
        Ok(())
    }

    /// Starts the daemon again with the same config (root and socket), and waits until
    /// containerd reaches it.
    pub fn restart_daemon(&mut self) -> Result<()> {
        self.restart_daemon_crashing_at("")?;
        self.ctd.wait_for_snapshotter(SN, Duration::from_secs(30))
    }

    /// Starts the daemon again, aborting at crash point `crash_at` (not waiting for
    /// containerd: the probe would remove a snapshot).
    pub fn restart_daemon_crashing_at(&mut self, crash_at: &str) -> Result<()> {
        ensure!(self.daemon.is_none(), "daemon still running");
        self.daemon = Some(start_daemon(
            &self.binary,
            &self.config,
            &self.sock,
            crash_at,
        )?);
        Ok(())
    }

    /// Waits until containerd reaches the daemon again, with `ctr snapshots ls` (Stat calls
    /// only: unlike [`Containerd::wait_for_snapshotter`] this removes nothing).
    pub fn wait_reachable(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ctd.snapshots(SN, &["ls"])?.status.success() {
            ensure!(
                Instant::now() < deadline,
                "containerd does not reach the daemon; daemon log tail:\n{}",
                self.daemon_log(20)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Restarts containerd ([`Containerd::restart`]) and waits until it reaches the daemon.
    pub fn restart_containerd(&mut self) -> Result<()> {
        self.ctd.restart()?;
        self.wait_reachable()
    }

    /// Whether the daemon process has exited (not reaped yet).
    pub fn daemon_exited(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|d| d.ensure_running().is_err())
    }

    /// Fails with the log tail if the daemon died.
    pub fn ensure_daemon(&mut self) -> Result<()> {
        self.daemon.as_mut().context("no daemon")?.ensure_running()
    }

    /// Writes `spec`'s archive to the scratch directory.
    pub fn build(&self, spec: &oci::ImageSpec) -> Result<OciArchive> {
        oci::build_archive(spec, self.scratch.path())
    }

    /// Imports `archive` into our snapshotter (`ctr images import --snapshotter erofs-rs`).
    pub fn import(&self, archive: &OciArchive) -> Result<()> {
        oci::import(&self.ctd, archive, SN)
    }

    /// `ctr run --rm --snapshotter erofs-rs IMAGE ID ARGS`: stdout (never empty), failing on a
    /// non-zero exit.
    pub fn run(&self, image: &str, args: &[&str]) -> Result<String> {
        self.run_on(SN, image, args)
    }

    /// Like [`run`](Self::run) on any snapshotter.
    ///
    /// Under CPU load `ctr run` sometimes loses the end of a short-lived task's output (or all
    /// of it) although the task ran and exited 0: a race in containerd's output copying that
    /// shows with its built-in overlayfs snapshotter as well (about 1 run in 100 with the CPUs
    /// saturated). So the command runs under `/bin/sh`, which prints [`END_OF_OUTPUT`] after
    /// it; a run whose output lacks that line is repeated, up to three times.
    pub fn run_on(&self, snapshotter: &str, image: &str, args: &[&str]) -> Result<String> {
        let what = format!("ctr run --snapshotter {snapshotter} {image} {args:?}");
        let script = format!("\"$@\"; rc=$?; echo {END_OF_OUTPUT}; exit $rc");
        let mut wrapped = vec!["/bin/sh", "-c", &script, "sh"];
        wrapped.extend_from_slice(args);
        for _ in 0..3 {
            let out = self.ctd.run(snapshotter, image, &wrapped)?;
            let stdout = self.check(&out, &what)?;
            if let Some(body) = stdout.strip_suffix(&format!("{END_OF_OUTPUT}\n")) {
                return Ok(body.to_owned());
            }
            eprintln!("{what}: exit 0 but output cut short ({stdout:?}); running it again");
        }
        bail!("{what}: output cut short three times in a row")
    }

    /// `ctr run` (not `--rm`) with container id `id`, leaving the container behind.
    pub fn run_keep(&self, image: &str, id: &str, args: &[&str]) -> Result<String> {
        let mut o = RunOpts::new(SN, image, args);
        o.id = Some(id.to_owned());
        o.rm = false;
        let out = self.ctd.run_with(&o)?;
        self.check(&out, &format!("ctr run {id}"))
    }

    /// [`Containerd::check`] plus our daemon's log tail.
    pub fn check(&self, out: &std::process::Output, what: &str) -> Result<String> {
        self.ctd
            .check(out, what)
            .map_err(|e| e.context(format!("daemon log tail:\n{}", self.daemon_log(30))))
    }

    /// `ctr snapshots --snapshotter erofs-rs ARGS`, failing on a non-zero exit.
    pub fn snap(&self, args: &[&str]) -> Result<String> {
        let out = self.ctd.snapshots(SN, args)?;
        self.check(&out, &format!("ctr snapshots {}", args.join(" ")))
    }

    /// `ctr snapshots ... ARGS` expected to fail: its stderr.
    pub fn snap_err(&self, args: &[&str]) -> Result<String> {
        let out = self.ctd.snapshots(SN, args)?;
        ensure!(
            !out.status.success(),
            "ctr snapshots {} succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `ctr snapshots prepare|view --mounts KEY PARENT`: the mounts as JSON.
    ///
    /// `ctr snapshots prepare` labels the new snapshot as a GC root, `view` does not, so
    /// containerd's garbage collector may remove a fresh view at any time. Views are
    /// labelled right after creation, and created again if the collector was first.
    pub fn create_mounts(&self, verb: &str, key: &str, parent: &str) -> Result<Vec<JsonMount>> {
        let mut args = vec![verb, "--mounts", key];
        if !parent.is_empty() {
            args.push(parent);
        }
        for _ in 0..5 {
            let out = self.snap(&args)?;
            let mounts = parse_mounts(&out)?;
            if verb != "view" {
                return Ok(mounts);
            }
            let out = self
                .ctd
                .snapshots(SN, &["label", key, "containerd.io/gc.root=e2e"])?;
            if out.status.success() {
                return Ok(mounts);
            }
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(err.contains("not found"), "labelling view {key}: {err}");
        }
        bail!("view {key} was garbage-collected five times in a row")
    }

    /// `ctr snapshots ls`: name -> (parent, kind).
    pub fn snapshot_list(&self) -> Result<BTreeMap<String, (String, String)>> {
        let out = self.snap(&["ls"])?;
        let mut m = BTreeMap::new();
        for line in out.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.len() {
                3 => m.insert(f[0].to_owned(), (f[1].to_owned(), f[2].to_owned())),
                2 => m.insert(f[0].to_owned(), (String::new(), f[1].to_owned())),
                _ => bail!("bad `ctr snapshots ls` line {line:?}"),
            };
        }
        Ok(m)
    }

    /// `ctr snapshots usage -b KEY`: (bytes, inodes).
    pub fn usage(&self, key: &str) -> Result<(u64, u64)> {
        let out = self.snap(&["usage", "-b", key])?;
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .with_context(|| format!("no usage line for {key}: {out}"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.len() == 3, "bad usage line {line:?}");
        Ok((f[1].parse()?, f[2].parse()?))
    }

    /// `ctr snapshots info KEY` as JSON.
    pub fn info(&self, key: &str) -> Result<Value> {
        let out = self.snap(&["info", key])?;
        serde_json::from_str(&out).with_context(|| format!("ctr snapshots info: {out}"))
    }

    /// The snapshot directories (`ROOT/snapshots/ID`) of the committed chain ending in
    /// `chain_id`, immediate parent first, read from the mounts of a temporary view (host mode).
    pub fn chain_dirs(&self, chain_id: &str) -> Result<Vec<PathBuf>> {
        // Named like containerd's unpack snapshots (`extract-...`), which the daemon never
        // flattens (`max_unmerged_layers`): the view lists every layer.
        let key = crate::unique_name("extract-chain-view");
        let m = self.create_mounts("view", &key, chain_id)?;
        self.snap(&["rm", &key])?;
        ensure!(
            m.len() == 1,
            "host-mode view: one mount expected, got {m:?}"
        );
        let m = &m[0];
        let fs_dirs: Vec<PathBuf> = match m.kind.as_str() {
            "bind" => vec![PathBuf::from(&m.source)],
            "overlay" => m
                .option("lowerdir")
                .context("overlay without lowerdir")?
                .split(':')
                .map(PathBuf::from)
                .collect(),
            other => bail!("unexpected host-mode view mount type {other:?}: {m:?}"),
        };
        fs_dirs
            .into_iter()
            .map(|fs| {
                ensure!(
                    fs.file_name().is_some_and(|n| n == "fs"),
                    "lower {} is not a snapshot's fs directory",
                    fs.display()
                );
                let dir = fs.parent().unwrap().to_path_buf();
                ensure!(
                    dir.parent() == Some(&self.root.join("snapshots")),
                    "lower {} is not below {}/snapshots",
                    fs.display(),
                    self.root.display()
                );
                Ok(dir)
            })
            .collect()
    }

    /// Snapshot directories below `ROOT/snapshots` (excluding staging names).
    pub fn snapshot_dirs(&self) -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.root.join("snapshots"))?
            .map(|e| Ok(e?.path()))
            .collect::<Result<_>>()?;
        v.sort();
        Ok(v)
    }

    /// sha256 of every `layer.erofs` under the root, by snapshot directory.
    pub fn layer_hashes(&self) -> Result<BTreeMap<PathBuf, String>> {
        let mut out = BTreeMap::new();
        for d in self.snapshot_dirs()? {
            let l = d.join("layer.erofs");
            if l.exists() {
                out.insert(d, sha256_file(&l)?);
            }
        }
        Ok(out)
    }

    /// Checks that snapshot directory `dir` holds a committed layer: `layer.erofs` exists
    /// and `fs/` is that image mounted read-only (erofs) in the host namespace.
    pub fn check_layer_dir(&self, dir: &Path) -> Result<()> {
        let layer = dir.join("layer.erofs");
        ensure!(layer.is_file(), "{} is missing", layer.display());
        let fs_dir = dir.join("fs");
        let table = mounts::self_mounts()?;
        let here: Vec<&MountInfo> = table.iter().filter(|m| m.mount_point == fs_dir).collect();
        ensure!(
            here.len() == 1,
            "{} should be mounted exactly once, found {:?}",
            fs_dir.display(),
            here
        );
        let m = here[0];
        ensure!(
            m.fs_type == "erofs",
            "{} is {}",
            fs_dir.display(),
            m.fs_type
        );
        ensure!(
            m.mount_options.iter().any(|o| o == "ro"),
            "{} is not read-only: {:?}",
            fs_dir.display(),
            m.mount_options
        );
        // The daemon mounts the very file it verified: file-backed mounts name it by the
        // daemon's descriptor (`/proc/self/fd/N`, meaningless here), so the mount is compared
        // with the image instead; loop mounts show a /dev/loopN whose backing file is the
        // image.
        if m.source.starts_with("/proc/self/fd/") {
            return same_image(&fs_dir, &layer);
        }
        let src = Path::new(&m.source);
        let backing = if let Some(loopname) = m.source.strip_prefix("/dev/") {
            let f = format!("/sys/block/{loopname}/loop/backing_file");
            PathBuf::from(fs::read_to_string(&f).with_context(|| f.clone())?.trim())
        } else {
            src.to_path_buf()
        };
        ensure!(
            backing == layer,
            "{} is mounted from {} (backing {}), not {}",
            fs_dir.display(),
            m.source,
            backing.display(),
            layer.display()
        );
        Ok(())
    }

    /// Runs containerd's garbage collector now and waits for it (creating a lease and
    /// deleting it with `--sync`): snapshots containerd dropped are removed from us then.
    /// Left alone, containerd spaces its collections by 50 times the last one's duration,
    /// which under load can be a minute.
    pub fn gc(&self) -> Result<()> {
        let id = crate::unique_name("e2e-gc");
        self.ctd.ctr_ok(&["leases", "create", "--id", &id])?;
        self.ctd.ctr_ok(&["leases", "delete", "--sync", &id])?;
        Ok(())
    }

    /// Waits until `cond` holds, running containerd's garbage collector in between.
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if cond()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; daemon log tail:\n{}\ncontainerd log tail:\n{}",
                    self.daemon_log(20),
                    self.ctd.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            self.gc()?;
        }
    }
}

fn start_daemon(binary: &Path, config: &str, sock: &Path, crash_at: &str) -> Result<Daemon> {
    let mut o = DaemonOpts::new(binary, config, sock);
    if !crash_at.is_empty() {
        o.env.push((CRASH_ENV.into(), crash_at.into()));
    }
    Daemon::start_with(o)
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log tail:\n{}\n--- erofs-snapshotter log tail:\n{}",
                self.version,
                self.ctd.log_tail(40),
                self.daemon_log(60)
            );
        }
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        if let Err(e) = self.ctd.stop() {
            eprintln!("containerd cleanup: {e:#}");
        }
    }
}

/// A mount as `ctr snapshots ... --mounts` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMount {
    /// `Type`.
    pub kind: String,
    /// `Source`.
    pub source: String,
    /// `Options`.
    pub options: Vec<String>,
}

impl JsonMount {
    /// Value of a `key=value` option.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Parses ctr's `--mounts` JSON (Go field names, any case).
pub fn parse_mounts(text: &str) -> Result<Vec<JsonMount>> {
    let v: Value =
        serde_json::from_str(text.trim()).with_context(|| format!("mounts JSON: {text}"))?;
    let arr = v
        .as_array()
        .with_context(|| format!("not an array: {text}"))?;
    let field = |m: &Value, name: &str| -> Option<Value> {
        m.as_object()?
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    arr.iter()
        .map(|m| {
            Ok(JsonMount {
                kind: field(m, "type")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                source: field(m, "source")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                options: field(m, "options")
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .map(|o| o.as_str().map(str::to_owned).context("option"))
                    .collect::<Result<_>>()?,
            })
        })
        .collect()
}

/// Performs a host-mode mount (`bind` or `overlay`) at `target` in the test's namespace.
pub fn mount_host(m: &JsonMount, target: &Path) -> Result<()> {
    use rustix::mount::{MountFlags, mount, mount_bind_recursive, mount_remount};
    let ro = m.options.iter().any(|o| o == "ro");
    match m.kind.as_str() {
        "bind" => {
            mount_bind_recursive(Path::new(&m.source), target)
                .with_context(|| format!("bind {} on {}", m.source, target.display()))?;
            if ro {
                mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
                    .context("remount ro")?;
            }
        }
        "overlay" => {
            let data: Vec<&str> = m
                .options
                .iter()
                .map(String::as_str)
                .filter(|o| *o != "ro" && *o != "rw")
                .collect();
            let flags = if ro {
                MountFlags::RDONLY
            } else {
                MountFlags::empty()
            };
            let data = std::ffi::CString::new(data.join(","))?;
            mount(&m.source, target, "overlay", flags, Some(data.as_c_str()))
                .with_context(|| format!("overlay {:?} on {}", m.options, target.display()))?;
        }
        other => bail!("cannot mount type {other:?} here"),
    }
    Ok(())
}

/// Unmounts `target` (detached).
pub fn unmount(target: &Path) -> Result<()> {
    rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH)
        .with_context(|| format!("unmount {}", target.display()))
}

pub use crate::oci::sha256_file;

/// A sorted listing of everything below `dir`: `path TYPE` lines (`f` with size and sha256
/// prefix, `d`, `l -> target`, `c` with rdev), relative paths.
pub fn tree_listing(dir: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(dir)?.display().to_string();
            let md = fs::symlink_metadata(&p)?;
            let t = md.file_type();
            let line = if t.is_dir() {
                stack.push(p.clone());
                format!("{rel} d")
            } else if t.is_symlink() {
                format!("{rel} l -> {}", fs::read_link(&p)?.display())
            } else if t.is_char_device() {
                format!("{rel} c {}", md.rdev())
            } else {
                format!("{rel} f {} {}", md.len(), &sha256_file(&p)?[..12])
            };
            out.push(line);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether the erofs mount at `fs_dir` is the image `layer`: the same block size, block and
/// inode counts, and root directory names.
fn same_image(fs_dir: &Path, layer: &Path) -> Result<()> {
    let img = erofs_image::Image::open(fs::File::open(layer)?)
        .with_context(|| format!("opening {}", layer.display()))?;
    let sb = img.superblock();
    let st = rustix::fs::statfs(fs_dir).with_context(|| format!("statfs {}", fs_dir.display()))?;
    ensure!(
        st.f_bsize as u64 == img.block_size() && st.f_blocks as u64 == sb.blocks as u64,
        "{} has {} blocks of {}, {} has {} of {}",
        fs_dir.display(),
        st.f_blocks,
        st.f_bsize,
        layer.display(),
        sb.blocks,
        img.block_size()
    );
    let root = img.inode(img.root_nid())?;
    let mut want: Vec<Vec<u8>> = img
        .read_dir(&root)?
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n != b"." && n != b"..")
        .collect();
    want.sort();
    let mut got: Vec<Vec<u8>> = fs::read_dir(fs_dir)?
        .map(|e| Ok(e?.file_name().into_encoded_bytes()))
        .collect::<Result<_>>()?;
    got.sort();
    ensure!(
        got == want,
        "{} does not show the root of {}",
        fs_dir.display(),
        layer.display()
    );
    Ok(())
}
