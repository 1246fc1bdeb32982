//! A private containerd instance per test.
//!
//! # Isolation
//!
//! Each [`Containerd`] owns a temporary base directory holding its `root`,
//! `state`, gRPC and ttrpc sockets, `config.toml` and `containerd.log`. Some
//! paths are compiled into containerd and its shims and no config moves them:
//! shim sockets go to `/run/containerd/s/`, runc state to
//! `/run/containerd/runc/`, `ctr` FIFOs to `/run/containerd/fifo/`, and 2.1
//! creates `/run/containerd` at start-up. So containerd runs in its own mount
//! namespace (`unshare --mount --propagation slave`) with a private tmpfs on
//! `/run`; the host's `/run/containerd` and `/var/lib/containerd` are never
//! touched. Every `ctr` call enters that namespace (`nsenter --mount`).
//!
//! Proxy plugins: containerd 1.6 dials them at start-up; if a socket is not
//! listening yet, the gRPC channel backs off (up to 3 s) and calls made
//! meanwhile fail with `Unavailable`. So start proxy daemons between
//! [`Containerd::prepare`] and [`Containerd::launch`], or wait with
//! [`Containerd::wait_for_snapshotter`].
//!
//! The base directory is bind-mounted on itself as a **shared** mount before
//! the namespace is created, so mounts made later from the host namespace
//! below it (by the test or by a proxy daemon) propagate into containerd's
//! namespace. Mounts made anywhere else after start-up are invisible to
//! containerd. So a proxy daemon's root must live under
//! [`Containerd::base_dir`] (use [`Containerd::dir`]). Mounts containerd makes
//! (container rootfs, temporary unpack mounts) stay in its namespace: read them
//! with [`Containerd::mountinfo`].
//!
//! # Cleanup
//!
//! Drop stops containerd (SIGTERM, then SIGKILL after the stop timeout), kills
//! what is left of this instance (processes in its mount namespace, processes
//! whose command line names its base directory, their descendants, and
//! processes in its cgroup parent), removes its cgroups, unmounts everything
//! below the base directory (deepest first, `MNT_DETACH`) and removes the
//! directory. The base directory holds a lock file while its instance lives;
//! [`Containerd::start`] first sweeps unlocked `ctd-*` directories left by test
//! processes that died ([`sweep_stale`]), and [`crate::emergency_cleanup`]
//! cleans live instances from another thread when a test is stuck.
//!
//! `ctr` runs with `TMPDIR` in the base directory: it mounts snapshots itself
//! (e.g. `ctr run` reads the image's `/etc/passwd` through a temporary mount),
//! and those mounts also stay in containerd's namespace.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rustix::fs::{FlockOperation, flock};
use rustix::mount::{MountPropagationFlags, mount_bind, mount_change};

use crate::mounts::{self, MountInfo};
use crate::process::{self, ProcInfo, ProcessGroupGuard};

/// Environment variable naming the root where Debian 12's containerd 1.6 and
/// runc were unpacked (default `/opt/containerd-1.6/root`; containerd, `ctr`
/// and the shim are in `usr/bin` below it, runc in `usr/sbin`).
pub const CONTAINERD_1_6_ROOT_ENV: &str = "TESTSUITE_CONTAINERD_1_6_ROOT";

/// Environment variable naming the root where Debian 13's containerd 1.7 was
/// unpacked (default `/opt/containerd-1.7/root`; containerd, `ctr` and the
/// shim are in `usr/bin` below it; it runs Debian 12's runc like the others).
pub const CONTAINERD_1_7_ROOT_ENV: &str = "TESTSUITE_CONTAINERD_1_7_ROOT";

/// Environment variable naming the root where containerd 2.1 was unpacked
/// (default `/opt/containerd-new/root`; binaries are in `usr/bin` below it).
pub const CONTAINERD_NEW_ROOT_ENV: &str = "TESTSUITE_CONTAINERD_NEW_ROOT";

/// Environment variable naming the root where sid's runc (1.3), the glibc and libseccomp it
/// links against and sid's CNI plugins were unpacked (default `/opt/runc-sid/root`; runc in
/// `usr/sbin`, the libraries in `usr/lib/x86_64-linux-gnu`, the plugins in `usr/lib/cni`).
pub const RUNC_SID_ROOT_ENV: &str = "TESTSUITE_RUNC_SID_ROOT";

/// The root of sid's runc and its userspace ([`RUNC_SID_ROOT_ENV`]).
pub fn sid_userspace() -> PathBuf {
    std::env::var_os(RUNC_SID_ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/runc-sid/root"))
}

/// The host's library directory, where [`ContainerdOpts::sid_runc`] binds sid's libraries.
const HOST_LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";

/// Which containerd to run. All are private copies unpacked by
/// `scripts/setup`, never the host's containerd or runc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Debian 12's containerd 1.6, unpacked with Debian 12's runc under
    /// `/opt/containerd-1.6/root` (its own `ctr` and
    /// `containerd-shim-runc-v2`). Config `version = 2`.
    V1_6,
    /// Debian 13's containerd 1.7, unpacked under `/opt/containerd-1.7/root`
    /// (its own `ctr` and `containerd-shim-runc-v2`, Debian 12's runc). Config
    /// `version = 2`; proxy differs, proxy plugin `platform`/`capabilities`/
    /// `exports`, and the transfer service (which `ctr images import`/`pull` use).
    V1_7,
    /// containerd 2.1 from Debian sid, unpacked under `/opt/containerd-new/root`
    /// with its own `containerd-shim-runc-v2`. Config `version = 3`.
    V2_1,
}

impl Version {
    /// Every version, oldest first.
    pub const ALL: [Version; 3] = [Version::V1_6, Version::V1_7, Version::V2_1];

    /// The root this version was unpacked into.
    fn root(self) -> PathBuf {
        let (env, default) = match self {
            Version::V1_6 => (CONTAINERD_1_6_ROOT_ENV, "/opt/containerd-1.6/root"),
            Version::V1_7 => (CONTAINERD_1_7_ROOT_ENV, "/opt/containerd-1.7/root"),
            Version::V2_1 => (CONTAINERD_NEW_ROOT_ENV, "/opt/containerd-new/root"),
        };
        std::env::var_os(env)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    }

    /// Directory holding `containerd`, `ctr` and `containerd-shim-runc-v2`.
    pub fn bin_dir(self) -> PathBuf {
        self.root().join("usr/bin")
    }

    /// The `containerd` binary.
    pub fn containerd(self) -> PathBuf {
        self.bin_dir().join("containerd")
    }

    /// The matching `ctr` binary.
    pub fn ctr(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }

    /// The runc shim this version must run (found first on the child's `PATH`).
    pub fn shim(self) -> PathBuf {
        self.bin_dir().join("containerd-shim-runc-v2")
    }

    /// The `runc` every version's shim runs: Debian 12's, unpacked next to
    /// containerd 1.6 (2.1 from sid has none of its own, and 1.7's is not unpacked). The shims find it
    /// on `PATH` (no `BinaryName` in the runtime options).
    pub fn runc(self) -> PathBuf {
        Version::V1_6.root().join("usr/sbin/runc")
    }

    /// `PATH` for containerd and its shims: this version's binary directory
    /// first, then the private runc's, then the system directories (mount,
    /// unshare, mkfs.erofs...). A host `runc` or shim comes after ours.
    pub fn path_env(self) -> String {
        let runc = self.runc();
        let runc_dir = runc.parent().unwrap_or(Path::new("/usr/sbin"));
        format!(
            "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir().display(),
            runc_dir.display()
        )
    }

    /// The `version` of the config file format this containerd reads.
    pub fn config_version(self) -> u32 {
        match self {
            Version::V1_6 | Version::V1_7 => 2,
            Version::V2_1 => 3,
        }
    }

    /// Whether proxy plugins accept `platform`, `capabilities` and `exports`
    /// (containerd 1.7 (1.7.24 shows all three in `ctr plugins ls -d`) and 2.x;
    /// 1.6 only knows `type` and `address`).
    pub fn proxy_plugin_extras(self) -> bool {
        self != Version::V1_6
    }

    /// Whether a proxy plugin of type `diff` is supported (containerd
    /// 1.7.4+/2.0). containerd 1.6.20 logs `unknown proxy plugin type
    /// type=diff` and then panics (`plugin: no type`) at start-up, so
    /// [`render_config`] refuses such an entry for 1.6.
    pub fn proxy_diff(self) -> bool {
        self != Version::V1_6
    }

    /// Whether the transfer service (and its `unpack_config`) exists; `ctr
    /// images import`/`pull` go through it by default from 1.7 on.
    pub fn transfer_service(self) -> bool {
        self != Version::V1_6
    }

    /// Whether the binaries are installed.
    pub fn available(self) -> bool {
        self.containerd().is_file()
            && self.ctr().is_file()
            && self.shim().is_file()
            && self.runc().is_file()
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1_6 => "containerd-1.6",
            Version::V1_7 => "containerd-1.7",
            Version::V2_1 => "containerd-2.1",
        })
    }
}

/// Kind of a proxy plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// `type = "snapshot"` (a `containerd.services.snapshots.v1.Snapshots` server).
    Snapshot,
    /// `type = "diff"` (a `containerd.services.diff.v1.Diff` server; 1.7 and 2.x).
    Diff,
}

/// One `[proxy_plugins.<name>]` entry.
#[derive(Debug, Clone)]
pub struct ProxyPlugin {
    /// Plugin name: the snapshotter name for `--snapshotter`, or the differ name
    /// for `diff-service` and `unpack_config`.
    pub name: String,
    /// Snapshotter or differ.
    pub kind: ProxyKind,
    /// Unix socket of the gRPC server. A relative path is taken relative to
    /// the instance's base directory (which does not exist before
    /// [`Containerd::start`]); see [`Containerd::proxy_address`].
    pub address: PathBuf,
    /// `platform = "..."` (1.7 and 2.x), e.g. `linux/amd64`.
    pub platform: Option<String>,
    /// `capabilities = [...]` (1.7 and 2.x), e.g. `rebase`, `remap-ids`.
    pub capabilities: Vec<String>,
    /// `[proxy_plugins.<name>.exports]` (1.7 and 2.x). A relative `root` is
    /// taken relative to the instance's base directory, like `address`.
    pub exports: Vec<(String, String)>,
}

impl ProxyPlugin {
    /// A proxy plugin with only a name, kind and address.
    pub fn new(name: &str, kind: ProxyKind, address: &Path) -> Self {
        ProxyPlugin {
            name: name.to_owned(),
            kind,
            address: address.to_path_buf(),
            platform: None,
            capabilities: Vec::new(),
            exports: Vec::new(),
        }
    }
}

/// One `[[plugins."io.containerd.transfer.v1.local".unpack_config]]` entry
/// (1.7 and 2.x): which differ unpacks layers for a snapshotter on a platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackConfig {
    /// Platform, e.g. `linux/amd64`.
    pub platform: String,
    /// Snapshotter name.
    pub snapshotter: String,
    /// Differ (diff plugin id, a proxy differ's name works); `None` lets
    /// containerd pick a differ whose platforms match.
    pub differ: Option<String>,
}

impl UnpackConfig {
    /// An entry for `linux/amd64`.
    pub fn new(snapshotter: &str, differ: Option<&str>) -> Self {
        UnpackConfig {
            platform: "linux/amd64".to_owned(),
            snapshotter: snapshotter.to_owned(),
            differ: differ.map(str::to_owned),
        }
    }
}

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// Which containerd.
    pub version: Version,
    /// Namespace `ctr` uses (`--namespace`); default `default`.
    pub namespace: String,
    /// `[proxy_plugins.*]` entries.
    pub proxy_plugins: Vec<ProxyPlugin>,
    /// `[plugins."io.containerd.service.v1.diff-service"] default = [...]`;
    /// empty leaves containerd's default (`["walking"]`).
    pub diff_service_default: Vec<String>,
    /// `unpack_config` entries of the transfer service (1.7 and 2.x). A non-empty
    /// list replaces containerd's defaults, so unless `keep_overlayfs_unpack`
    /// is false an `overlayfs`/`walking` entry is added when no entry names
    /// `overlayfs`.
    pub unpack_config: Vec<UnpackConfig>,
    /// See `unpack_config`. Default true.
    pub keep_overlayfs_unpack: bool,
    /// `max_concurrent_unpacks` of the transfer service (1.7 and 2.x). containerd
    /// 2.1.9 does not know this key: it logs "Ignoring unknown key in TOML for
    /// plugin" and unpacks one layer at a time.
    pub max_concurrent_unpacks: Option<u32>,
    /// Plugins to disable besides the ones the harness always disables (CRI,
    /// NRI and the pod sandbox controller).
    pub disabled_plugins: Vec<String>,
    /// containerd's CRI plugin, enabled and configured for tests ([`crate::cri`]);
    /// `None` (the default) disables it.
    pub cri: Option<crate::cri::CriConfig>,
    /// Raw TOML appended to the generated config. It must not repeat a table
    /// the harness generates (see [`Containerd::config_toml`]).
    pub extra_toml: String,
    /// `[debug] level`; default `debug`.
    pub log_level: String,
    /// How long to wait for the gRPC socket and `ctr version`.
    pub start_timeout: Duration,
    /// Deadline of each `ctr` invocation.
    pub ctr_timeout: Duration,
    /// Grace period between SIGTERM and SIGKILL when stopping.
    pub stop_timeout: Duration,
    /// Where to create the base directory (default: `std::env::temp_dir()`).
    /// It must not be below `/run`, and must be short enough for socket paths.
    pub tmp_parent: Option<PathBuf>,
    /// Run sid's runc 1.3 ([`sid_userspace`]) instead of Debian 12's 1.1.5: containerd 2.1
    /// starts user-namespaced containers only with a runc that reports idmapped-mount support.
    /// sid's runc needs sid's glibc (2.38 symbols; Debian 12 has 2.36), so in containerd's
    /// mount namespace only, each of sid's libraries is bind-mounted over the host's file of
    /// that name (glibc is backwards compatible, so the host's binaries keep working there).
    /// Default false.
    pub sid_runc: bool,
}

impl ContainerdOpts {
    /// Defaults for `version`.
    pub fn new(version: Version) -> Self {
        ContainerdOpts {
            version,
            namespace: "default".to_owned(),
            proxy_plugins: Vec::new(),
            diff_service_default: Vec::new(),
            unpack_config: Vec::new(),
            keep_overlayfs_unpack: true,
            max_concurrent_unpacks: None,
            disabled_plugins: Vec::new(),
            cri: None,
            extra_toml: String::new(),
            log_level: "debug".to_owned(),
            start_timeout: Duration::from_secs(30),
            ctr_timeout: Duration::from_secs(180),
            stop_timeout: Duration::from_secs(10),
            tmp_parent: None,
            sid_runc: false,
        }
    }

    /// Adds a proxy snapshotter.
    pub fn proxy_snapshotter(mut self, name: &str, address: &Path) -> Self {
        self.proxy_plugins
            .push(ProxyPlugin::new(name, ProxyKind::Snapshot, address));
        self
    }

    /// Adds a proxy differ.
    pub fn proxy_differ(mut self, name: &str, address: &Path) -> Self {
        self.proxy_plugins
            .push(ProxyPlugin::new(name, ProxyKind::Diff, address));
        self
    }

    /// Adds a proxy plugin entry.
    pub fn proxy_plugin(mut self, plugin: ProxyPlugin) -> Self {
        self.proxy_plugins.push(plugin);
        self
    }

    /// Sets the diff service's differ list.
    pub fn diff_service_default(mut self, differs: &[&str]) -> Self {
        self.diff_service_default = differs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Adds an `unpack_config` entry (1.7 and 2.x).
    pub fn unpack(mut self, entry: UnpackConfig) -> Self {
        self.unpack_config.push(entry);
        self
    }

    /// Sets the namespace `ctr` uses.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_owned();
        self
    }

    /// Appends raw TOML to the config.
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        if !toml.ends_with('\n') {
            self.extra_toml.push('\n');
        }
        self
    }
}

/// The files and directories of one instance, all below `base`.
#[derive(Debug, Clone)]
struct Layout {
    base: PathBuf,
    root: PathBuf,
    state: PathBuf,
    address: PathBuf,
    ttrpc_address: PathBuf,
    config: PathBuf,
    log: PathBuf,
    tmp: PathBuf,
}

impl Layout {
    fn new(base: &Path) -> Self {
        Layout {
            base: base.to_path_buf(),
            root: base.join("root"),
            state: base.join("state"),
            address: base.join("containerd.sock"),
            ttrpc_address: base.join("containerd.sock.ttrpc"),
            config: base.join("config.toml"),
            log: base.join("containerd.log"),
            tmp: base.join("tmp"),
        }
    }
}

/// A TOML basic string.
fn q(s: impl AsRef<str>) -> String {
    let mut out = String::from("\"");
    for c in s.as_ref().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn q_path(p: &Path) -> String {
    q(p.to_string_lossy())
}

fn q_list(items: &[String]) -> String {
    let v: Vec<String> = items.iter().map(q).collect();
    format!("[{}]", v.join(", "))
}

/// Plugins the harness always disables: CRI (and its CNI networking), NRI
/// (socket in `/var/run/nri`), on 1.6 and 1.7 the unconfigured devmapper snapshotter
/// (it only logs an error) and, on 2.x, the pod sandbox controller that needs
/// CRI and the sandbox-controllers service that needs it.
fn always_disabled(version: Version) -> Vec<String> {
    let v: &[&str] = match version {
        Version::V1_6 => &[
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.devmapper",
        ],
        Version::V1_7 => &[
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.nri.v1.nri",
        ],
        Version::V2_1 => &[
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
            "io.containerd.nri.v1.nri",
            "io.containerd.podsandbox.controller.v1.podsandbox",
            "io.containerd.grpc.v1.sandbox-controllers",
        ],
    };
    v.iter().map(|s| s.to_string()).collect()
}

/// Renders the config file for `opts` with all paths below `base` (what
/// [`Containerd::start`] writes to `base/config.toml`).
pub fn render_config(opts: &ContainerdOpts, base: &Path) -> Result<String> {
    let l = Layout::new(base);
    let v = opts.version;
    let mut t = String::new();
    let mut disabled = always_disabled(v);
    if opts.cri.is_some() {
        disabled.retain(|p| !crate::cri::plugins(v).contains(&p.as_str()));
    }
    disabled.extend(opts.disabled_plugins.iter().cloned());
    writeln!(t, "version = {}", v.config_version())?;
    writeln!(t, "root = {}", q_path(&l.root))?;
    writeln!(t, "state = {}", q_path(&l.state))?;
    writeln!(t, "disabled_plugins = {}", q_list(&disabled))?;
    writeln!(t)?;
    writeln!(t, "[grpc]\n  address = {}", q_path(&l.address))?;
    writeln!(t, "[ttrpc]\n  address = {}", q_path(&l.ttrpc_address))?;
    writeln!(t, "[debug]\n  level = {}", q(&opts.log_level))?;
    writeln!(t)?;
    // Keep plugins that default to host paths inside the base directory.
    writeln!(
        t,
        "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}",
        q_path(&base.join("opt"))
    )?;
    if v == Version::V2_1 {
        writeln!(
            t,
            "[plugins.\"io.containerd.image-verifier.v1.bindir\"]\n  bin_dir = {}",
            q_path(&base.join("image-verifier"))
        )?;
    }
    if !opts.diff_service_default.is_empty() {
        writeln!(
            t,
            "[plugins.\"io.containerd.service.v1.diff-service\"]\n  default = {}",
            q_list(&opts.diff_service_default)
        )?;
    }
    if v.transfer_service() {
        let mut entries = opts.unpack_config.clone();
        if !entries.is_empty()
            && opts.keep_overlayfs_unpack
            && !entries.iter().any(|e| e.snapshotter == "overlayfs")
        {
            entries.push(UnpackConfig::new("overlayfs", Some("walking")));
        }
        if !entries.is_empty() || opts.max_concurrent_unpacks.is_some() {
            writeln!(t, "[plugins.\"io.containerd.transfer.v1.local\"]")?;
            if let Some(n) = opts.max_concurrent_unpacks {
                writeln!(t, "  max_concurrent_unpacks = {n}")?;
            }
            for e in &entries {
                writeln!(
                    t,
                    "  [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]"
                )?;
                writeln!(t, "    platform = {}", q(&e.platform))?;
                writeln!(t, "    snapshotter = {}", q(&e.snapshotter))?;
                if let Some(d) = &e.differ {
                    writeln!(t, "    differ = {}", q(d))?;
                }
            }
        }
    } else if !opts.unpack_config.is_empty() || opts.max_concurrent_unpacks.is_some() {
        bail!(
            "{v} has no transfer service: unpack_config and max_concurrent_unpacks need 1.7 or later"
        );
    }
    for p in &opts.proxy_plugins {
        if p.kind == ProxyKind::Diff && !v.proxy_diff() {
            bail!(
                "{v}: proxy plugin {:?}: containerd 1.6 has no proxy differ (it logs \"unknown proxy plugin type\" and panics with \"plugin: no type\"); use extra_toml to force it",
                p.name
            );
        }
        writeln!(t)?;
        writeln!(t, "[proxy_plugins.{}]", q(&p.name))?;
        let kind = match p.kind {
            ProxyKind::Snapshot => "snapshot",
            ProxyKind::Diff => "diff",
        };
        writeln!(t, "  type = {}", q(kind))?;
        writeln!(
            t,
            "  address = {}",
            q_path(&resolve_address(base, &p.address))
        )?;
        let extras = p.platform.is_some() || !p.capabilities.is_empty() || !p.exports.is_empty();
        if extras && !v.proxy_plugin_extras() {
            bail!(
                "{v}: proxy plugin {:?}: platform, capabilities and exports need containerd 1.7 or later (use extra_toml to force them)",
                p.name
            );
        }
        if let Some(platform) = &p.platform {
            writeln!(t, "  platform = {}", q(platform))?;
        }
        if !p.capabilities.is_empty() {
            writeln!(t, "  capabilities = {}", q_list(&p.capabilities))?;
        }
        if !p.exports.is_empty() {
            writeln!(t, "  [proxy_plugins.{}.exports]", q(&p.name))?;
            for (k, val) in &p.exports {
                let val = if k == "root" && Path::new(val).is_relative() {
                    base.join(val).to_string_lossy().into_owned()
                } else {
                    val.clone()
                };
                writeln!(t, "    {} = {}", q(k), q(val))?;
            }
        }
    }
    if let Some(cri) = &opts.cri {
        writeln!(t, "\n# CRI")?;
        t.push_str(&crate::cri::render(v, cri, base)?);
    }
    if !opts.extra_toml.is_empty() {
        writeln!(t, "\n# extra_toml")?;
        t.push_str(&opts.extra_toml);
    }
    Ok(t)
}

fn resolve_address(base: &Path, address: &Path) -> PathBuf {
    if address.is_relative() {
        base.join(address)
    } else {
        address.to_path_buf()
    }
}

/// Options of one `ctr run`.
#[derive(Debug, Clone)]
pub struct RunOpts {
    /// Image reference.
    pub image: String,
    /// Snapshotter name (`--snapshotter`).
    pub snapshotter: String,
    /// Container id; `None` generates a unique one.
    pub id: Option<String>,
    /// Command and arguments; empty runs the image's entrypoint/cmd.
    pub args: Vec<String>,
    /// `--rm` (default true); without it the container is left for the caller.
    pub rm: bool,
    /// More `ctr run` flags, inserted before the image.
    pub flags: Vec<String>,
    /// Deadline (default: the instance's `ctr_timeout`).
    pub timeout: Option<Duration>,
}

impl RunOpts {
    /// Run `args` in `image` on `snapshotter` with `--rm`.
    pub fn new(snapshotter: &str, image: &str, args: &[&str]) -> Self {
        RunOpts {
            image: image.to_owned(),
            snapshotter: snapshotter.to_owned(),
            id: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            rm: true,
            flags: Vec::new(),
            timeout: None,
        }
    }
}

/// A running private containerd. See the [module docs](self).
#[derive(Debug)]
pub struct Containerd {
    opts: ContainerdOpts,
    layout: Layout,
    cgroup_parent: String,
    config_toml: String,
    process: Option<ProcessGroupGuard>,
    ns: Option<Arc<NsHandle>>,
    _lock: Option<fs::File>,
    cleaned: bool,
    owner: ThreadId,
}

impl Containerd {
    /// [`prepare`](Self::prepare) then [`launch`](Self::launch): creates the
    /// base directory and config, starts containerd in its own mount
    /// namespace and waits until `ctr version` answers.
    pub fn start(opts: ContainerdOpts) -> Result<Containerd> {
        let mut ctd = Self::prepare(opts)?;
        ctd.launch()?;
        Ok(ctd)
    }

    /// Creates the base directory (a shared bind mount), its lock, `root`,
    /// `state` and the config file, without starting containerd. Start proxy
    /// daemons now (root and socket below [`base_dir`](Self::base_dir), the
    /// content store path is [`content_root`](Self::content_root)), then
    /// [`launch`](Self::launch): containerd 1.6 dials proxy plugins at
    /// start-up, and if the socket is not listening yet its gRPC channel backs
    /// off (up to 3 s) and calls made meanwhile fail with `Unavailable`.
    pub fn prepare(opts: ContainerdOpts) -> Result<Containerd> {
        crate::require_root()?;
        let v = opts.version;
        if !v.available() {
            bail!(
                "{v} is not installed ({}, {}, {}, {}); run scripts/setup",
                v.containerd().display(),
                v.ctr().display(),
                v.shim().display(),
                v.runc().display()
            );
        }
        if opts.sid_runc {
            let r = sid_userspace();
            for f in ["usr/sbin/runc", "usr/lib/x86_64-linux-gnu/libc.so.6"] {
                ensure!(
                    r.join(f).is_file(),
                    "sid's runc is not installed ({} is missing); run scripts/setup",
                    r.join(f).display()
                );
            }
        }
        let parent = opts.tmp_parent.clone().unwrap_or_else(std::env::temp_dir);
        let parent = fs::canonicalize(&parent)
            .with_context(|| format!("temporary directory {}", parent.display()))?;
        if parent.starts_with("/run") {
            bail!("the base directory must not be below /run (containerd gets a private /run)");
        }
        sweep_stale(&parent);
        let base = tempfile::Builder::new()
            .prefix(BASE_PREFIX)
            .tempdir_in(&parent)?
            .keep();
        let layout = Layout::new(&base);
        let cgroup_parent = cgroup_parent_of(&base);
        let mut ctd = Containerd {
            opts,
            layout,
            cgroup_parent,
            config_toml: String::new(),
            process: None,
            ns: None,
            _lock: None,
            cleaned: false,
            owner: std::thread::current().id(),
        };
        register(&ctd.instance());
        ctd.prepare_base()
            .with_context(|| format!("prepare {v} in {}", base.display()))?;
        Ok(ctd)
    }

    fn prepare_base(&mut self) -> Result<()> {
        let l = self.layout.clone();
        if l.ttrpc_address.as_os_str().len() > 100 {
            bail!(
                "base directory path too long for unix sockets: {}",
                l.base.display()
            );
        }
        fs::set_permissions(&l.base, fs::Permissions::from_mode(0o711))?;
        // Held while the instance lives: sweep_stale skips locked directories.
        // Locked under another name first, so no sweeper sees it unlocked.
        let tmp_lock = l.base.join(format!("{LOCK_FILE}.new"));
        let lock = fs::File::create(&tmp_lock)?;
        flock(&lock, FlockOperation::NonBlockingLockExclusive)
            .context("lock the base directory")?;
        fs::rename(&tmp_lock, l.base.join(LOCK_FILE))?;
        self._lock = Some(lock);
        for d in [&l.root, &l.state, &l.tmp] {
            fs::create_dir_all(d)?;
        }
        // A shared mount, so later host mounts below it reach containerd's namespace.
        mount_bind(&l.base, &l.base).context("bind-mount the base directory on itself")?;
        mount_change(&l.base, MountPropagationFlags::SHARED)
            .context("make the base directory a shared mount")?;

        for p in &self.opts.proxy_plugins {
            if let Some(dir) = resolve_address(&l.base, &p.address).parent() {
                fs::create_dir_all(dir)?;
            }
        }
        if let Some(cri) = &self.opts.cri {
            crate::cri::write_files(cri, &l.base)?;
        }
        self.config_toml = render_config(&self.opts, &l.base)?;
        fs::write(&l.config, &self.config_toml)?;
        Ok(())
    }

    /// Starts the prepared containerd and waits until it answers. Fails if it
    /// was launched before.
    pub fn launch(&mut self) -> Result<()> {
        if self.process.is_some() || self.cleaned {
            bail!("{} was already launched", self.layout.base.display());
        }
        let base = self.layout.base.clone();
        self.spawn()
            .with_context(|| format!("start {} in {}", self.opts.version, base.display()))
    }

    fn spawn(&mut self) -> Result<()> {
        let l = self.layout.clone();
        let v = self.opts.version;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "slave", "--"]);
        // Mounts private to containerd's namespace, then containerd itself.
        let mut sh =
            String::from("set -e; mount -t tmpfs -o mode=0755,size=256m testsuite-run /run; ");
        if self.opts.sid_runc {
            write!(
                sh,
                "for f in {sid}{HOST_LIBDIR}/*; do n=${{f##*/}}; \
                   if [ ! -d \"$f\" ] && [ -e {HOST_LIBDIR}/\"$n\" ]; then mount -o bind \"$f\" {HOST_LIBDIR}/\"$n\"; fi; \
                 done; ",
                sid = sid_userspace().display()
            )?;
        }
        if self
            .opts
            .cri
            .as_ref()
            .is_some_and(|c| c.pod_network.is_some())
        {
            // libcni caches each pod's network result there; no config moves it.
            sh.push_str(
                "mkdir -p /var/lib/cni; mount -t tmpfs -o mode=0755,size=16m testsuite-cni /var/lib/cni; ",
            );
        }
        sh.push_str("exec \"$0\" \"$@\"");
        // With sid's libraries, a static shell (busybox) makes the binds: a dynamic `mount`
        // would load a half-swapped libc (sid's ld.so with the host's libc.so.6, or the
        // other way round) and crash.
        let shell: &[&str] = if self.opts.sid_runc {
            &["/bin/busybox", "sh", "-c"]
        } else {
            &["/bin/sh", "-c"]
        };
        cmd.args(shell).arg(sh);
        cmd.arg(v.containerd())
            .arg("--config")
            .arg(&l.config)
            .env_clear()
            .env("PATH", self.path_env())
            .env("TMPDIR", &l.tmp)
            .current_dir(&l.base);
        let mut child = ProcessGroupGuard::spawn(&mut cmd, &v.to_string(), Some(&l.log))?;
        child.set_stop_timeout(self.opts.stop_timeout);
        self.process = Some(child);
        register(&self.instance());
        self.wait_ready()?;
        register(&self.instance());
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.opts.start_timeout;
        let our_ns = fs::metadata("/proc/self/ns/mnt")?.ino();
        loop {
            let proc_ = self.process.as_mut().expect("process");
            proc_.ensure_running()?;
            if self.ns.is_none() {
                // Until unshare(2) ran, the child is still in our namespace.
                let pid = proc_.pid();
                if let Ok(fd) = fs::File::open(format!("/proc/{pid}/ns/mnt"))
                    && let Ok(ino) = fd.metadata().map(|m| m.ino())
                    && ino != our_ns
                {
                    self.ns = Some(Arc::new(NsHandle {
                        name: format!("mnt:[{ino}]"),
                        _fd: fd,
                    }));
                }
            }
            if self.ns.is_some() && UnixStream::connect(&self.layout.address).is_ok() {
                let out = self.ctr_with_timeout(&["version"], Duration::from_secs(10))?;
                if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Server:")
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "not ready after {:?}; log tail:\n{}",
                    self.opts.start_timeout,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts containerd as an operator's `systemctl restart containerd` would: the
    /// process is stopped (SIGTERM, then SIGKILL of its process group; the shims have groups
    /// of their own and live on) and started again with the same config, root and state, in
    /// the same mount namespace (entered with `nsenter` through the handle this instance
    /// holds, so the mounts containerd made stay visible to it), and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(
            !self.cleaned && self.process.is_some(),
            "{} is not running",
            self.layout.base.display()
        );
        let ns = self
            .ns
            .clone()
            .context("containerd's mount namespace is not known")?;
        if let Some(p) = self.process.as_mut() {
            p.stop();
        }
        self.process = None;
        let l = self.layout.clone();
        let v = self.opts.version;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!(
            "--mount=/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&ns._fd)
        ))
        .arg("--")
        .arg(v.containerd())
        .arg("--config")
        .arg(&l.config)
        .env_clear()
        .env("PATH", self.path_env())
        .env("TMPDIR", &l.tmp)
        .current_dir(&l.base);
        let mut child = ProcessGroupGuard::spawn(&mut cmd, &v.to_string(), Some(&l.log))?;
        child.set_stop_timeout(self.opts.stop_timeout);
        self.process = Some(child);
        register(&self.instance());
        self.wait_ready()
            .with_context(|| format!("restart {v} in {}", l.base.display()))
    }

    /// `PATH` for containerd, its shims and `ctr`: [`Version::path_env`], with sid's runc
    /// first when [`ContainerdOpts::sid_runc`] is set.
    fn path_env(&self) -> String {
        let p = self.opts.version.path_env();
        if self.opts.sid_runc {
            format!("{}:{p}", sid_userspace().join("usr/sbin").display())
        } else {
            p
        }
    }

    /// Which containerd this is.
    pub fn version(&self) -> Version {
        self.opts.version
    }

    /// The options it was started with.
    pub fn opts(&self) -> &ContainerdOpts {
        &self.opts
    }

    /// Namespace used by [`ctr`](Self::ctr).
    pub fn namespace(&self) -> &str {
        &self.opts.namespace
    }

    /// The base directory (a shared mount; see the module docs).
    pub fn base_dir(&self) -> &Path {
        &self.layout.base
    }

    /// Creates (if needed) and returns `base_dir()/name`: the place for a proxy
    /// daemon's root and socket, and anything the test mounts for containerd.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let p = self.layout.base.join(name);
        fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// The socket address of proxy plugin `name` as written to the config
    /// (relative addresses resolved against the base directory).
    pub fn proxy_address(&self, name: &str) -> Option<PathBuf> {
        self.opts
            .proxy_plugins
            .iter()
            .find(|p| p.name == name)
            .map(|p| resolve_address(&self.layout.base, &p.address))
    }

    /// containerd's `root`.
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    /// containerd's `state`.
    pub fn state(&self) -> &Path {
        &self.layout.state
    }

    /// The content store's blob directory (`root/io.containerd.content.v1.content`).
    pub fn content_root(&self) -> PathBuf {
        self.layout.root.join("io.containerd.content.v1.content")
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.layout.address
    }

    /// The ttrpc socket.
    pub fn ttrpc_address(&self) -> &Path {
        &self.layout.ttrpc_address
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.layout.config
    }

    /// The generated config text.
    pub fn config_toml(&self) -> &str {
        &self.config_toml
    }

    /// containerd's log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.layout.log
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.layout.log, lines)
    }

    /// containerd's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    /// containerd's mount namespace (`mnt:[N]`).
    pub fn mnt_ns(&self) -> Option<&str> {
        self.ns.as_deref().map(|n| n.name.as_str())
    }

    /// Cgroup parent for containers started by [`run`](Self::run)
    /// (`/testsuite-<base name>`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// The mount table of containerd's mount namespace.
    pub fn mountinfo(&self) -> Result<Vec<MountInfo>> {
        let pid = self.pid().context("containerd is not running")?;
        mounts::read_mountinfo(Path::new(&format!("/proc/{pid}/mountinfo")))
    }

    /// A `ctr` command for this instance, not yet run:
    /// `nsenter --mount=/proc/PID/ns/mnt --wd=BASE -- CTR --address SOCK --namespace NS ARGS...`.
    /// Paths in `args` must be absolute.
    pub fn ctr_command(&self, namespace: &str, args: &[&str]) -> Result<Command> {
        let pid = self.pid().context("containerd is not running")?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg(format!("--wd={}", self.layout.base.display()))
            .arg("--")
            .arg(self.opts.version.ctr())
            .arg("--address")
            .arg(&self.layout.address)
            .arg("--namespace")
            .arg(namespace)
            .args(args)
            .env_clear()
            .env("PATH", self.path_env())
            .env("TMPDIR", &self.layout.tmp);
        Ok(cmd)
    }

    fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = self.ctr_command(&self.opts.namespace, args)?;
        process::run_with_timeout(&mut cmd, timeout)
    }

    /// Runs `ctr ARGS` (with this instance's address and namespace) and
    /// returns its output, whatever the exit status. Fails on timeout.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_in(&self.opts.namespace, args)
    }

    /// [`ctr`](Self::ctr) in another namespace.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.ctr_command(namespace, args)?;
        process::run_with_timeout(&mut cmd, self.opts.ctr_timeout)
            .map_err(|e| e.context(format!("containerd log tail:\n{}", self.log_tail(30))))
    }

    /// Runs `ctr ARGS` and returns stdout; a non-zero exit is an error carrying
    /// stdout, stderr and the tail of containerd's log.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args)?;
        self.check(&out, &format!("ctr {}", args.join(" ")))
    }

    /// [`process::check_output`] plus the tail of containerd's log on failure.
    pub fn check(&self, out: &Output, what: &str) -> Result<String> {
        process::check_output(out, what)
            .map_err(|e| e.context(format!("containerd log tail:\n{}", self.log_tail(30))))
    }

    /// `ctr snapshots --snapshotter SNAPSHOTTER ARGS` (e.g. `prepare KEY
    /// [PARENT]`, `view KEY PARENT`, `commit NAME KEY`, `rm KEY`, `usage
    /// [KEY]`, `ls`, `mounts TARGET KEY`, `info KEY`, `tree`).
    pub fn snapshots(&self, snapshotter: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["snapshots", "--snapshotter", snapshotter];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// Image names (`ctr images ls -q`).
    pub fn images(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr_ok(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Waits until containerd reaches the proxy snapshotter `name`, by
    /// repeating `ctr snapshots --snapshotter NAME prepare testsuite-probe-N`
    /// until it succeeds, then removing that snapshot (the backend sees a
    /// Prepare, and a Remove when containerd's garbage collector runs). For a
    /// daemon started after [`launch`](Self::launch) or restarted: until
    /// containerd's gRPC channel reconnects (its backoff is capped at 3 s),
    /// calls fail with `Unavailable`.
    pub fn wait_for_snapshotter(&self, name: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let key = crate::unique_name("testsuite-probe");
            let out = self.snapshots(name, &["prepare", &key])?;
            if out.status.success() {
                let out = self.snapshots(name, &["rm", &key])?;
                self.check(&out, "ctr snapshots rm (probe)")?;
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.check(&out, &format!("probe of proxy snapshotter {name}"))?;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr images pull --plain-http --snapshotter SNAPSHOTTER REFERENCE` (e.g.
    /// from a [`Registry`](crate::Registry)); on 1.7 and 2.x through the transfer
    /// service, which unpacks only if an `unpack_config` entry names the
    /// snapshotter (the default one names `overlayfs`).
    pub fn pull_plain_http(&self, reference: &str, snapshotter: &str) -> Result<()> {
        self.pull_plain_http_unchecked(reference, snapshotter)?;
        if !self.images()?.iter().any(|i| i == reference) {
            bail!("after pull, {reference} is not among the images");
        }
        Ok(())
    }

    /// [`pull_plain_http`](Self::pull_plain_http) without looking the image up afterwards
    /// (nothing but the `ctr` call, for timing it).
    pub fn pull_plain_http_unchecked(&self, reference: &str, snapshotter: &str) -> Result<()> {
        self.ctr_ok(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            reference,
        ])?;
        Ok(())
    }

    /// `ctr run --rm --snapshotter SNAPSHOTTER --cgroup PARENT/ID IMAGE ID ARGS...`
    /// with a unique container id; returns the output whatever the exit status.
    pub fn run(&self, snapshotter: &str, image: &str, args: &[&str]) -> Result<Output> {
        self.run_with(&RunOpts::new(snapshotter, image, args))
    }

    /// `ctr run` with [`RunOpts`].
    pub fn run_with(&self, o: &RunOpts) -> Result<Output> {
        let id = o.id.clone().unwrap_or_else(|| crate::unique_name("ctr"));
        let cgroup = format!("{}/{id}", self.cgroup_parent);
        let mut args: Vec<&str> = vec!["run"];
        if o.rm {
            args.push("--rm");
        }
        args.extend(["--snapshotter", &o.snapshotter, "--cgroup", &cgroup]);
        args.extend(o.flags.iter().map(String::as_str));
        args.push(&o.image);
        args.push(&id);
        args.extend(o.args.iter().map(String::as_str));
        let mut cmd = self.ctr_command(&self.opts.namespace, &args)?;
        process::run_with_timeout(&mut cmd, o.timeout.unwrap_or(self.opts.ctr_timeout))
            .map_err(|e| e.context(format!("containerd log tail:\n{}", self.log_tail(30))))
    }

    /// Shim processes of this instance (their command line names its socket).
    pub fn shims(&self) -> Vec<ProcInfo> {
        let addr = self.layout.address.to_string_lossy().into_owned();
        process::list_processes()
            .into_iter()
            .filter(|p| {
                p.exe
                    .as_deref()
                    .and_then(Path::file_name)
                    .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim"))
                    && p.cmdline_contains(&addr)
            })
            .collect()
    }

    fn instance(&self) -> Instance {
        Instance {
            base: self.layout.base.clone(),
            ns: self.ns.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            pid: self.pid(),
            owner: Some(self.owner),
        }
    }

    /// Processes belonging to this instance: containerd, everything in its
    /// mount namespace, everything whose command line names the base
    /// directory, anything in its cgroup parent, and their descendants.
    pub fn processes(&self) -> BTreeSet<u32> {
        self.instance().processes()
    }

    /// Stops containerd and cleans up everything of this instance (what Drop
    /// does). Errors are collected; the cleanup goes on after each.
    pub fn stop(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        if let Some(p) = self.process.as_mut() {
            p.stop();
        }
        let mut inst = self.instance();
        // Reaped: its pid may already belong to someone else.
        inst.pid = None;
        self.process = None;
        self._lock = None;
        let killed = inst.kill_processes();
        // Release the namespace: from now on its inode number may be reused.
        self.ns = None;
        inst.ns = None;
        unregister(&inst.base);
        let removed = inst.remove_rest();
        match (killed, removed) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
            (Err(a), Err(b)) => Err(a.context(format!("{b:#}"))),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("testsuite: {e:#}");
        }
    }
}

/// Prefix of base directory names.
const BASE_PREFIX: &str = "ctd-";
/// Lock file in the base directory, locked while its instance lives.
const LOCK_FILE: &str = "instance.lock";

fn cgroup_parent_of(base: &Path) -> String {
    format!(
        "/testsuite-{}",
        base.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// An open handle on containerd's mount namespace: while it is open, the
/// namespace (and so its inode number, which identifies its processes) cannot
/// be freed and reused by a new namespace.
#[derive(Debug)]
struct NsHandle {
    name: String,
    _fd: fs::File,
}

/// What is needed to clean up an instance, even without its [`Containerd`].
#[derive(Debug, Clone)]
struct Instance {
    base: PathBuf,
    ns: Option<Arc<NsHandle>>,
    cgroup_parent: String,
    pid: Option<u32>,
    /// The thread that started it.
    owner: Option<ThreadId>,
}

impl Instance {
    fn processes(&self) -> BTreeSet<u32> {
        let procs = process::list_processes();
        let needle = format!("{}/", self.base.display());
        let mut roots: BTreeSet<u32> = procs
            .iter()
            .filter(|p| {
                self.ns
                    .as_ref()
                    .is_some_and(|ns| p.mnt_ns.as_deref() == Some(ns.name.as_str()))
                    || p.cmdline_contains(&needle)
            })
            .map(|p| p.pid)
            .collect();
        if let Some(pid) = self.pid
            && process::pid_exists(pid)
        {
            roots.insert(pid);
        }
        roots.extend(cgroup_pids(&self.cgroup_parent));
        roots.remove(&std::process::id());
        roots.remove(&1);
        process::with_descendants(&procs, &roots)
    }

    /// Kills the instance's processes, removes its cgroups, unmounts
    /// everything below its base directory and removes it.
    fn cleanup(&self) -> Result<()> {
        let killed = self.kill_processes();
        let removed = self.remove_rest();
        killed.and(removed)
    }

    fn kill_processes(&self) -> Result<()> {
        let left = process::kill_and_wait(&self.processes(), Duration::from_secs(10));
        if !left.is_empty() {
            bail!(
                "cleanup of {}: processes still alive: {left:?}",
                self.base.display()
            );
        }
        Ok(())
    }

    /// Cgroups, mounts and the base directory.
    fn remove_rest(&self) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = remove_cgroups(&self.cgroup_parent) {
            errors.push(format!("cgroups: {e:#}"));
        }
        if let Err(e) = mounts::unmount_all_under(&self.base) {
            errors.push(format!("unmount: {e:#}"));
        }
        if let Err(e) = fs::remove_dir_all(&self.base)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("remove {}: {e}", self.base.display()));
        }
        if !errors.is_empty() {
            bail!("cleanup of {}: {}", self.base.display(), errors.join("; "));
        }
        Ok(())
    }
}

/// Instances of this process that have not been cleaned up yet.
static LIVE: Mutex<Vec<Instance>> = Mutex::new(Vec::new());

fn register(inst: &Instance) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|i| i.base != inst.base);
    live.push(inst.clone());
}

fn unregister(base: &Path) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|i| i.base != base);
}

/// Cleans up every instance of this process that is still alive and was
/// started by thread `owner` (all of them with `None`), from any thread: for a
/// test whose body is stuck (its `Containerd` would never be dropped). The
/// stuck owner's own Drop later finds nothing left to do.
pub fn cleanup_instances(owner: Option<ThreadId>) {
    let live: Vec<Instance> = LIVE
        .lock()
        .map(|l| l.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    for inst in live {
        if owner.is_some() && inst.owner != owner {
            continue;
        }
        if let Err(e) = inst.cleanup() {
            eprintln!("testsuite: {e:#}");
        }
        unregister(&inst.base);
    }
}

/// Cleans up instances left behind in `parent` by test processes that died
/// (their `ctd-*` directory is no longer locked). Called by
/// [`Containerd::start`]; failures are only printed.
pub fn sweep_stale(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let base = e.path();
        let is_ours = e.file_name().to_string_lossy().starts_with(BASE_PREFIX)
            && base.join(LOCK_FILE).is_file();
        if !is_ours {
            continue;
        }
        let Ok(lock) = fs::File::open(base.join(LOCK_FILE)) else {
            continue;
        };
        if flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // alive
        }
        let inst = Instance {
            cgroup_parent: cgroup_parent_of(&base),
            base,
            ns: None,
            pid: None,
            owner: None,
        };
        drop(lock);
        eprintln!("testsuite: removing stale instance {}", inst.base.display());
        if let Err(err) = inst.cleanup() {
            eprintln!("testsuite: {err:#}");
        }
    }
}

/// Cgroup hierarchies mounted under `/sys/fs/cgroup` (v1 controllers, the v2
/// `unified` tree, or `/sys/fs/cgroup` itself on a pure v2 host).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(table) = mounts::self_mounts() else {
        return Vec::new();
    };
    table
        .into_iter()
        .filter(|m| {
            (m.fs_type == "cgroup" || m.fs_type == "cgroup2")
                && m.mount_point.starts_with("/sys/fs/cgroup")
        })
        .map(|m| m.mount_point)
        .collect()
}

/// All directories of cgroup `rel` (absolute cgroup path) in every hierarchy,
/// deepest first.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in cgroup_hierarchies() {
        let top = h.join(rel.trim_start_matches('/'));
        if top.is_dir() {
            collect_dirs(&top, &mut out);
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

fn cgroup_pids(rel: &str) -> BTreeSet<u32> {
    cgroup_dirs(rel)
        .iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn remove_cgroups(rel: &str) -> Result<()> {
    let dirs = cgroup_dirs(rel);
    if dirs.is_empty() {
        return Ok(());
    }
    // An emptied cgroup can stay busy for a moment.
    let ok = process::wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        for d in &dirs {
            let _ = fs::remove_dir(d);
        }
        dirs.iter().all(|d| !d.exists()).then_some(())
    });
    if ok.is_none() {
        let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
        bail!("cannot remove {left:?}");
    }
    Ok(())
}
