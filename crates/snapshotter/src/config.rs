//! Daemon configuration: a TOML file with containerd's EROFS plugin keys (`root_path`,
//! `ovl_mount_options`, `enable_fsverity`, `set_immutable`, `default_size`, `dmverity_mode`,
//! `max_unmerged_layers`, and the differ's `mkfs_options`, `enable_tar_index`,
//! `enable_dmverity`) plus ours.
//!
//! Unknown keys and bad values are errors that name the key (and, through [`Config::check`],
//! the line). [`DEFAULT_TOML`] is the whole default configuration with a comment per key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How mounts are handed to containerd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountMode {
    /// The daemon mounts each committed layer read-only itself and returns plain `bind` and
    /// `overlay` mounts that any containerd can perform.
    #[default]
    Host,
    /// Upstream's shapes for containerd >= 2.2's mount manager: `erofs` mounts plus
    /// `format/mkdir/overlay` with templates.
    Manager,
}

/// fs-verity policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    /// Use it where the kernel and filesystem support it; warn once and go on without it
    /// elsewhere.
    #[default]
    Auto,
    /// Required: refuse to start without support.
    On,
    /// Never.
    Off,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Snapshotter root directory.
    pub root_path: PathBuf,
    /// gRPC socket (Snapshots and Diff services).
    pub address: PathBuf,
    /// Socket file mode, octal string (default "0660").
    pub socket_mode: String,
    /// Group owning the socket (default 0, root).
    pub socket_gid: u32,
    /// How mounts are returned.
    pub mount_mode: MountMode,
    /// Snapshotter keys.
    pub snapshotter: SnapshotterConfig,
    /// Differ keys.
    pub differ: DifferConfig,
    /// How requests are run: concurrency, time limits, the free-space reserve.
    pub daemon: DaemonConfig,
    /// The metrics endpoint.
    pub metrics: MetricsConfig,
    /// Layer artifacts (tar index, dm-verity tree, root-hash signature) fetched from the
    /// image's registry instead of computed.
    pub artifacts: ArtifactsConfig,
}

/// `[artifacts]`: what Apply may fetch from the registry an image came from (the referrers
/// `erofs-snapshotter artifacts push` attached) instead of computing it, and how long and how
/// much it may fetch. Anything missing, slow or invalid is computed locally instead.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArtifactsConfig {
    /// Look for artifacts at all.
    pub enabled: bool,
    /// containerd's registry host configuration directory (`config_path`): mirrors, TLS and
    /// headers per registry in `<hosts_dir>/<host>/hosts.toml`. "" = none (every registry
    /// over HTTPS at its own address).
    pub hosts_dir: PathBuf,
    /// Longest the lookup and download of one layer's artifacts may take (Go-style duration).
    pub fetch_timeout: String,
    /// Largest artifact blob (and referrer manifest or index) fetched; larger ones are not
    /// used.
    pub max_blob_size: String,
    /// Refuse (fail the pull of) any layer whose fetched dm-verity root hash has no valid
    /// signature by one of `trusted_keys`, instead of computing it locally.
    pub require_signed_root_hash: bool,
    /// Public keys that root-hash signatures are checked against (ed25519 key files as
    /// `erofs-snapshotter artifacts keygen` writes them).
    pub trusted_keys: Vec<PathBuf>,
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        ArtifactsConfig {
            enabled: false,
            hosts_dir: "/etc/containerd/certs.d".into(),
            fetch_timeout: "10s".into(),
            max_blob_size: "256MiB".into(),
            require_signed_root_hash: false,
            trusted_keys: Vec::new(),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve Prometheus metrics over HTTP: "" (off), a loopback `IP:PORT`
    /// ("127.0.0.1:9464", "[::1]:9464") or `unix:/ABSOLUTE/PATH`. Only loopback: the
    /// endpoint has no authentication.
    pub address: String,
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    /// A loopback TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket.
    Unix(PathBuf),
}

/// Parse `[metrics] address`: `None` when it is off.
pub fn parse_metrics_address(s: &str) -> std::result::Result<Option<MetricsAddress>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Some(p) = s.strip_prefix("unix:") {
        let p = Path::new(p);
        if !p.is_absolute() {
            return Err(format!("{s:?}: the socket path must be absolute"));
        }
        if p.as_os_str().len() >= 108 {
            return Err(format!(
                "{s:?}: longer than a Unix socket path may be (107 bytes)"
            ));
        }
        return Ok(Some(MetricsAddress::Unix(p.to_path_buf())));
    }
    let addr: std::net::SocketAddr = s.parse().map_err(|_| {
        format!("{s:?} is neither IP:PORT nor unix:/PATH (e.g. \"127.0.0.1:9464\")")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{s:?} is not a loopback address: the endpoint has no authentication; bind 127.0.0.1 or a unix: socket and expose it through something that has"
        ));
    }
    Ok(Some(MetricsAddress::Tcp(addr)))
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Most heavy requests (Apply, Compare, a Commit that converts an upper directory)
    /// running at once; the others wait, without working, for a slot within their deadline.
    /// 0 = the number of CPUs.
    pub max_concurrent_heavy: usize,
    /// Longest a heavy request may take, whatever the caller's deadline (Go-style duration:
    /// "1h", "90s", "1h30m", "500ms").
    pub heavy_timeout: String,
    /// Longest any other request may take.
    pub request_timeout: String,
    /// Free space kept under `root_path`: a size ("1GiB") or a share of the filesystem
    /// ("5%"); "0" keeps none. Prepare, Apply and converting Commits refuse to start below
    /// it, and Apply, Compare and Commit stop when their writes take the filesystem below it.
    pub min_free_space: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            max_concurrent_heavy: 0,
            heavy_timeout: "1h".into(),
            request_timeout: "2m".into(),
            min_free_space: "1GiB".into(),
        }
    }
}

/// A free-space reserve: bytes, or a share of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reserve {
    /// This many bytes.
    Bytes(u64),
    /// This percentage of the filesystem's size.
    Percent(f64),
}

impl Reserve {
    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// Parse a reserve: a size (see [`parse_size`]) or a percentage ("5%", 0 to 100).
pub fn parse_reserve(s: &str) -> std::result::Result<Reserve, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => match p.trim().parse::<f64>() {
            Ok(v) if (0.0..=100.0).contains(&v) => Ok(Reserve::Percent(v)),
            _ => Err(format!("invalid percentage {s:?} (0% to 100%)")),
        },
        None => parse_size(s).map(Reserve::Bytes),
    }
}

/// Parse a Go-style duration: one or more `<number><unit>` with units `h`, `m`, `s`, `ms`
/// ("1h30m", "90s", "500ms"). Zero is refused.
pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {s:?} (e.g. \"90s\", \"2m\", \"1h30m\", \"500ms\")");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let (unit, secs) = [("ms", 0.001), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))
            .ok_or_else(bad)?;
        rest = &rest[unit.len()..];
        total += value * secs;
    }
    if !(total > 0.0 && total < 1e10) {
        return Err(format!("invalid duration {s:?}: must be above 0"));
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

/// `[snapshotter]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// Appended verbatim to every overlay mount (e.g. `["volatile"]`).
    pub ovl_mount_options: Vec<String>,
    /// Enable fs-verity on every committed layer and verify every lower before mounting.
    /// Upstream's boolean; `fsverity` refines what happens without kernel support.
    pub enable_fsverity: bool,
    /// What to do when fs-verity is enabled but unsupported: "auto" (warn, skip) or "on"
    /// (refuse to start). "off" disables it even if `enable_fsverity` is set.
    pub fsverity: Toggle,
    /// Set FS_IMMUTABLE_FL on committed layer blobs.
    pub set_immutable: bool,
    /// Size of each active snapshot's writable layer (ext4 image), go-units notation with
    /// binary units ("5GB" = 5 GiB); empty or "0" = no limit.
    pub default_size: String,
    /// dm-verity policy for mounts: "auto", "on" or "off".
    pub dmverity_mode: Toggle,
    /// Upstream's key: a Prepare or View whose parent chain has more than this many layers
    /// gets one flattened lower (`fsmeta.erofs` over the chain's layers, built before the
    /// request returns) instead of one lower per layer. 0 = never.
    pub max_unmerged_layers: u32,
}

/// `[differ]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DifferConfig {
    /// mkfs.erofs options with upstream meaning (`-T0`, `--mkfs-time`, `-U`, `--sort=none`,
    /// `-b4096`, `-Enoinline_data`).
    pub mkfs_options: Vec<String>,
    /// Write tar-index layers (`[index][tar]`) instead of full images.
    pub enable_tar_index: bool,
    /// Append a dm-verity hash tree to every layer and write the sidecar.
    pub enable_dmverity: bool,
    /// containerd's content store directory, read directly when readable.
    pub content_root: PathBuf,
    /// containerd's gRPC socket, for the Content service (reading blobs it cannot read from
    /// `content_root`, and writing diffs).
    pub containerd_address: PathBuf,
    /// Namespace used for Content calls when a request carries none.
    pub default_namespace: String,
    /// Read a blob from `content_root` only after containerd's Content service says it is in
    /// the request's namespace (the directory holds every namespace's blobs; containerd scopes
    /// them in its metadata). Off: the directory is trusted for any namespace (only where
    /// there is one tenant, or no containerd to ask).
    pub verify_content_namespace: bool,
    /// Largest `layer.erofs` Apply writes (go-units notation, binary units). Each layer is
    /// also held to what its blob can honestly expand to (see README, "Limits").
    pub max_layer_size: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_path: "/var/lib/erofs-snapshotter".into(),
            address: "/run/erofs-snapshotter/snapshotter.sock".into(),
            socket_mode: "0660".into(),
            socket_gid: 0,
            mount_mode: MountMode::Host,
            snapshotter: SnapshotterConfig::default(),
            differ: DifferConfig::default(),
            daemon: DaemonConfig::default(),
            metrics: MetricsConfig::default(),
            artifacts: ArtifactsConfig::default(),
        }
    }
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        SnapshotterConfig {
            ovl_mount_options: Vec::new(),
            enable_fsverity: false,
            fsverity: Toggle::Auto,
            set_immutable: false,
            default_size: String::new(),
            dmverity_mode: Toggle::Auto,
            max_unmerged_layers: 0,
        }
    }
}

impl Default for DifferConfig {
    fn default() -> Self {
        DifferConfig {
            mkfs_options: Vec::new(),
            enable_tar_index: false,
            enable_dmverity: false,
            content_root: "/var/lib/containerd/io.containerd.content.v1.content".into(),
            containerd_address: "/run/containerd/containerd.sock".into(),
            default_namespace: "default".into(),
            verify_content_namespace: true,
            max_layer_size: "256GiB".into(),
        }
    }
}

/// Parse a size the way containerd does (`go-units.RAMInBytes`): a decimal number with an
/// optional binary-unit suffix `k`, `m`, `g`, `t`, `p` (optionally followed by `b` or `ib`,
/// any case). "" means 0.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(0);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(format!("invalid size {s:?}: unknown unit")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}: out of range"));
    }
    Ok(bytes as u64)
}

/// The whole default configuration, every key with its default value and why it is there
/// (`erofs-snapshotter config default`). It parses to exactly [`Config::default`].
pub const DEFAULT_TOML: &str = include_str!("default-config.toml");

/// What [`Config::check`] found wrong: the key (when the problem is one key's value), the
/// 1-based line it is on (when the text names it), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key, dotted (`snapshotter.default_size`).
    pub key: Option<String>,
    /// The line of the text.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(l) = self.line {
            write!(f, "line {l}: ")?;
        }
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line where `text` sets the dotted `key`, if it does.
fn locate(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            return Some(line_of(text, k.span().start));
        }
        table = v.get_ref().as_table()?;
    }
    None
}

/// The dotted key whose value starts at byte `offset` of `text`, if one does.
fn key_at(text: &str, offset: usize) -> Option<String> {
    fn walk(t: &toml::de::DeTable<'_>, prefix: &str, offset: usize) -> Option<String> {
        for (k, v) in t {
            let path = format!("{prefix}{}", k.get_ref());
            if let Some(sub) = v.get_ref().as_table() {
                if let Some(found) = walk(sub, &format!("{path}."), offset) {
                    return Some(found);
                }
            } else if v.span().contains(&offset) {
                return Some(path);
            }
        }
        None
    }
    walk(toml::de::DeTable::parse(text).ok()?.get_ref(), "", offset)
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| e.context(format!("config {}", path.display())))
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Self> {
        Self::check(text).map_err(|p| Error::invalid_argument(p.to_string()))
    }

    /// Parse and validate config text, saying where the first problem is: the key, and the
    /// line when the text names it (`erofs-snapshotter config check`).
    pub fn check(text: &str) -> std::result::Result<Self, Problem> {
        let cfg: Config = toml::from_str(text).map_err(|e| Problem {
            // A bad value's key; unknown keys and syntax errors are named in the message.
            key: e.span().and_then(|s| key_at(text, s.start)),
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().trim().to_string(),
        })?;
        cfg.problem().map_err(|(key, message)| Problem {
            line: locate(text, &key),
            key: Some(key),
            message,
        })?;
        Ok(cfg)
    }

    /// Check values serde cannot.
    pub fn validate(&self) -> Result<()> {
        self.problem()
            .map_err(|(key, why)| Error::invalid_argument(format!("{key}: {why}")))
    }

    /// The first value serde accepted but the daemon cannot use: its key and why.
    fn problem(&self) -> std::result::Result<(), (String, String)> {
        let bad = |key: &str, why: String| Err((key.to_string(), why));
        for (key, path) in [
            ("root_path", &self.root_path),
            ("address", &self.address),
            ("differ.content_root", &self.differ.content_root),
            ("differ.containerd_address", &self.differ.containerd_address),
        ] {
            if !path.is_absolute() {
                return bad(key, format!("{} is not an absolute path", path.display()));
            }
        }
        for (key, path) in [
            ("address", &self.address),
            ("differ.containerd_address", &self.differ.containerd_address),
        ] {
            if path.as_os_str().len() >= 108 {
                return bad(
                    key,
                    "longer than a Unix socket path may be (107 bytes)".into(),
                );
            }
        }
        match u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 => {}
            _ => {
                return bad(
                    "socket_mode",
                    format!("{:?} is not an octal file mode", self.socket_mode),
                );
            }
        }
        if let Err(e) = parse_size(&self.snapshotter.default_size) {
            return bad("snapshotter.default_size", e);
        }
        for o in &self.snapshotter.ovl_mount_options {
            if o.is_empty() || o.contains(',') || o.contains('\0') {
                return bad(
                    "snapshotter.ovl_mount_options",
                    format!("{o:?} is not a single mount option"),
                );
            }
            let key = o.split('=').next().unwrap_or_default();
            if matches!(key, "lowerdir" | "upperdir" | "workdir") {
                return bad(
                    "snapshotter.ovl_mount_options",
                    format!("{key} is set by the snapshotter"),
                );
            }
        }
        if let Err(e) = crate::mkfs::MkfsOptions::parse(&self.differ.mkfs_options) {
            return bad("differ.mkfs_options", e.to_string());
        }
        if self.differ.default_namespace.is_empty() {
            return bad("differ.default_namespace", "must not be empty".into());
        }
        match parse_size(&self.differ.max_layer_size) {
            Ok(0) => return bad("differ.max_layer_size", "must be a size above 0".into()),
            Ok(_) => {}
            Err(e) => return bad("differ.max_layer_size", e),
        }
        for (key, v) in [
            ("daemon.heavy_timeout", &self.daemon.heavy_timeout),
            ("daemon.request_timeout", &self.daemon.request_timeout),
        ] {
            if let Err(e) = parse_duration(v) {
                return bad(key, e);
            }
        }
        if let Err(e) = parse_reserve(&self.daemon.min_free_space) {
            return bad("daemon.min_free_space", e);
        }
        if let Err(e) = parse_metrics_address(&self.metrics.address) {
            return bad("metrics.address", e);
        }
        if let Err(e) = parse_duration(&self.artifacts.fetch_timeout) {
            return bad("artifacts.fetch_timeout", e);
        }
        match parse_size(&self.artifacts.max_blob_size) {
            Ok(0) => return bad("artifacts.max_blob_size", "must be a size above 0".into()),
            Ok(_) => {}
            Err(e) => return bad("artifacts.max_blob_size", e),
        }
        let dir = &self.artifacts.hosts_dir;
        if !dir.as_os_str().is_empty() && !dir.is_absolute() {
            return bad(
                "artifacts.hosts_dir",
                format!("{} is not an absolute path", dir.display()),
            );
        }
        if let Some(k) = self
            .artifacts
            .trusted_keys
            .iter()
            .find(|k| !k.is_absolute())
        {
            return bad(
                "artifacts.trusted_keys",
                format!("{} is not an absolute path", k.display()),
            );
        }
        if self.artifacts.require_signed_root_hash {
            if !self.artifacts.enabled {
                return bad(
                    "artifacts.require_signed_root_hash",
                    "needs artifacts.enabled = true (signatures come with the fetched artifacts)"
                        .into(),
                );
            }
            if !self.differ.enable_dmverity {
                return bad(
                    "artifacts.require_signed_root_hash",
                    "needs differ.enable_dmverity (the signed root is the dm-verity tree's of the layer: [index][tar] with differ.enable_tar_index, else the full image)".into(),
                );
            }
            if self.artifacts.trusted_keys.is_empty() {
                return bad(
                    "artifacts.require_signed_root_hash",
                    "needs artifacts.trusted_keys to check signatures against".into(),
                );
            }
        }
        if let Ok(Some(MetricsAddress::Unix(p))) = parse_metrics_address(&self.metrics.address)
            && p == self.address
        {
            return bad(
                "metrics.address",
                "is the gRPC socket (address): give the metrics a socket of their own".into(),
            );
        }
        Ok(())
    }

    /// `metrics.address` (validated at start-up); `None` when metrics are off.
    pub fn metrics_address(&self) -> Option<MetricsAddress> {
        parse_metrics_address(&self.metrics.address).ok().flatten()
    }

    /// `daemon.max_concurrent_heavy`, with 0 as the number of CPUs.
    pub fn max_concurrent_heavy(&self) -> usize {
        match self.daemon.max_concurrent_heavy {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// `daemon.heavy_timeout` (validated at start-up).
    pub fn heavy_timeout(&self) -> std::time::Duration {
        parse_duration(&self.daemon.heavy_timeout).unwrap_or(std::time::Duration::from_secs(3600))
    }

    /// `daemon.request_timeout` (validated at start-up).
    pub fn request_timeout(&self) -> std::time::Duration {
        parse_duration(&self.daemon.request_timeout).unwrap_or(std::time::Duration::from_secs(120))
    }

    /// `daemon.min_free_space` (validated at start-up).
    pub fn min_free_space(&self) -> Reserve {
        parse_reserve(&self.daemon.min_free_space).unwrap_or(Reserve::Bytes(1 << 30))
    }

    /// The socket mode as a number.
    pub fn socket_mode_bits(&self) -> u32 {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).unwrap_or(0o660)
    }

    /// `default_size` in bytes (0 = unlimited).
    pub fn default_size_bytes(&self) -> u64 {
        parse_size(&self.snapshotter.default_size).unwrap_or(0)
    }

    /// `differ.max_layer_size` in bytes (validated at start-up).
    pub fn max_layer_bytes(&self) -> u64 {
        parse_size(&self.differ.max_layer_size).unwrap_or(256 << 30)
    }

    /// `artifacts.fetch_timeout` (validated at start-up).
    pub fn artifact_fetch_timeout(&self) -> std::time::Duration {
        parse_duration(&self.artifacts.fetch_timeout).unwrap_or(std::time::Duration::from_secs(10))
    }

    /// `artifacts.max_blob_size` in bytes (validated at start-up).
    pub fn artifact_max_blob(&self) -> u64 {
        parse_size(&self.artifacts.max_blob_size).unwrap_or(256 << 20)
    }

    /// Whether fs-verity is wanted at all.
    pub fn fsverity_wanted(&self) -> bool {
        self.snapshotter.enable_fsverity && self.snapshotter.fsverity != Toggle::Off
            || self.snapshotter.fsverity == Toggle::On
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("").unwrap(), 0);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("5GB").unwrap(), 5 << 30);
        assert_eq!(parse_size("5g").unwrap(), 5 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations_and_reserves() {
        use std::time::Duration;
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "0s", "10", "5 minutes", "1d", "-1s", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_reserve("1GiB").unwrap(), Reserve::Bytes(1 << 30));
        assert_eq!(parse_reserve("0").unwrap(), Reserve::Bytes(0));
        assert_eq!(parse_reserve("5%").unwrap(), Reserve::Percent(5.0));
        assert_eq!(Reserve::Percent(5.0).bytes(1000), 50);
        for bad in ["101%", "-1%", "x%", "lots"] {
            assert!(parse_reserve(bad).is_err(), "{bad:?}");
        }
        let d = Config::default();
        assert_eq!(d.heavy_timeout(), Duration::from_secs(3600));
        assert_eq!(d.request_timeout(), Duration::from_secs(120));
        assert_eq!(d.min_free_space(), Reserve::Bytes(1 << 30));
        assert!(d.max_concurrent_heavy() >= 1);
        let c = Config::parse(
            "[daemon]\nmax_concurrent_heavy = 3\nheavy_timeout = \"10m\"\nrequest_timeout = \"5s\"\nmin_free_space = \"2%\"",
        )
        .unwrap();
        assert_eq!(c.max_concurrent_heavy(), 3);
        assert_eq!(c.heavy_timeout(), Duration::from_secs(600));
        assert_eq!(c.request_timeout(), Duration::from_secs(5));
        assert_eq!(c.min_free_space(), Reserve::Percent(2.0));
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
root_path = "/var/lib/x"
address = "/run/x/x.sock"
mount_mode = "manager"
[snapshotter]
ovl_mount_options = ["volatile"]
enable_fsverity = true
set_immutable = true
default_size = "64MB"
max_unmerged_layers = 1
[differ]
mkfs_options = ["-T0", "--mkfs-time", "--sort=none", "-Enoinline_data"]
enable_tar_index = true
"#,
        )
        .unwrap();
        assert_eq!(c.mount_mode, MountMode::Manager);
        assert_eq!(c.default_size_bytes(), 64 << 20);
        assert_eq!(c.snapshotter.max_unmerged_layers, 1);
        assert!(c.differ.enable_tar_index);
    }

    #[test]
    fn errors_name_the_key() {
        for (text, needle) in [
            ("bogus = 1", "bogus"),
            ("[snapshotter]\nnot_a_key = true", "not_a_key"),
            ("mount_mode = \"sideways\"", "sideways"),
            (
                "[snapshotter]\ndefault_size = \"12 parsecs\"",
                "snapshotter.default_size",
            ),
            ("root_path = \"relative\"", "root_path"),
            ("socket_mode = \"999\"", "socket_mode"),
            (
                "[differ]\nmkfs_options = [\"-zlz4\"]",
                "differ.mkfs_options",
            ),
            (
                "[snapshotter]\novl_mount_options = [\"upperdir=/x\"]",
                "ovl_mount_options",
            ),
            (
                "[snapshotter]\nenable_fsverity = \"yes\"",
                "enable_fsverity",
            ),
            ("[daemon]\nheavy_timeout = \"soon\"", "daemon.heavy_timeout"),
            (
                "[daemon]\nrequest_timeout = \"0s\"",
                "daemon.request_timeout",
            ),
            (
                "[daemon]\nmin_free_space = \"200%\"",
                "daemon.min_free_space",
            ),
            (
                "[daemon]\nmax_concurrent_heavy = -1",
                "max_concurrent_heavy",
            ),
            (
                "[snapshotter]\nmax_unmerged_layers = -1",
                "max_unmerged_layers",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    /// Every dotted key of a TOML table, tables themselves excluded.
    fn keys(t: &toml::Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        for (k, v) in t {
            let path = format!("{prefix}{k}");
            match v {
                toml::Value::Table(sub) => keys(sub, &format!("{path}."), out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }

    #[test]
    fn default_toml_is_exactly_the_defaults() {
        let parsed = Config::check(DEFAULT_TOML).unwrap();
        assert_eq!(parsed, Config::default());
        // Every key the daemon accepts is in it (the serialized defaults have them all) and
        // nothing else, each with a comment right above it saying why.
        let want = match toml::Value::try_from(Config::default()).unwrap() {
            toml::Value::Table(t) => t,
            v => panic!("defaults serialize to {v:?}"),
        };
        let (mut a, mut b) = (Default::default(), Default::default());
        keys(&want, "", &mut a);
        keys(&toml::from_str(DEFAULT_TOML).unwrap(), "", &mut b);
        assert_eq!(a, b);
        assert!(a.len() > 20 && a.contains("metrics.address"), "{a:?}");
        let lines: Vec<&str> = DEFAULT_TOML.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.is_empty() && !l.starts_with('#') && !l.starts_with('[') {
                assert!(
                    i > 0 && lines[i - 1].starts_with('#'),
                    "no comment above line {}: {l}",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn check_names_the_key_and_line() {
        for (text, key, line, needle) in [
            (
                "root_path = \"/x\"\n\n[snapshotter]\nbogus = 1\n",
                None,
                4,
                "bogus",
            ),
            (
                "[snapshotter]\nset_immutable = true\ndefault_size = \"12 parsecs\"\n",
                Some("snapshotter.default_size"),
                3,
                "12 parsecs",
            ),
            (
                "socket_mode = \"0660\"\nroot_path = \"var/lib/x\"\n",
                Some("root_path"),
                2,
                "absolute",
            ),
            (
                "[daemon]\nmax_concurrent_heavy = -1\n",
                Some("daemon.max_concurrent_heavy"),
                2,
                "max_concurrent_heavy",
            ),
            (
                "[metrics]\naddress = \"0.0.0.0:9464\"\n",
                Some("metrics.address"),
                2,
                "loopback",
            ),
            (
                "differ.content_root = \"relative/dir\"\n",
                Some("differ.content_root"),
                1,
                "absolute",
            ),
            ("root_path = [\n", None, 1, "unclosed array"),
        ] {
            let p = Config::check(text).unwrap_err();
            assert_eq!(p.key.as_deref(), key, "{text:?}: {p}");
            assert_eq!(p.line, Some(line), "{text:?}: {p}");
            assert!(p.to_string().contains(needle), "{text:?}: {p}");
        }
        // A value left at a bad default is not in the text: no line.
        let cfg = Config {
            root_path: "rel".into(),
            ..Config::default()
        };
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("root_path")
        );
    }

    #[test]
    fn artifact_keys_are_checked() {
        let base = "[differ]\nenable_tar_index = true\nenable_dmverity = true\n[artifacts]\nenabled = true\n";
        let c = Config::check(&format!(
            "{base}fetch_timeout = \"500ms\"\nmax_blob_size = \"1MiB\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.artifact_fetch_timeout(),
            std::time::Duration::from_millis(500)
        );
        assert_eq!(c.artifact_max_blob(), 1 << 20);
        for (extra, key, why) in [
            (
                "fetch_timeout = \"0s\"",
                "artifacts.fetch_timeout",
                "above 0",
            ),
            (
                "max_blob_size = \"0\"",
                "artifacts.max_blob_size",
                "above 0",
            ),
            ("hosts_dir = \"certs.d\"", "artifacts.hosts_dir", "absolute"),
            (
                "trusted_keys = [\"k.pub\"]",
                "artifacts.trusted_keys",
                "absolute",
            ),
            (
                "require_signed_root_hash = true",
                "artifacts.require_signed_root_hash",
                "trusted_keys",
            ),
            ("mirrors = []", "", "unknown field"),
        ] {
            let p = Config::check(&format!("{base}{extra}\n")).unwrap_err();
            assert_eq!(p.line, Some(6), "{extra}: {p}");
            if !key.is_empty() {
                assert_eq!(p.key.as_deref(), Some(key), "{extra}: {p}");
            }
            assert!(p.to_string().contains(why), "{extra}: {p}");
        }
        let p = Config::check(
            "[artifacts]\nrequire_signed_root_hash = true\ntrusted_keys = [\"/k.pub\"]\n",
        )
        .unwrap_err();
        assert!(p.message.contains("enabled"), "{p}");
        let p = Config::check("[artifacts]\nenabled = true\nrequire_signed_root_hash = true\ntrusted_keys = [\"/k.pub\"]\n")
            .unwrap_err();
        assert!(p.message.contains("enable_dmverity"), "{p}");
    }

    #[test]
    fn metrics_addresses() {
        use std::net::SocketAddr;
        assert_eq!(parse_metrics_address("").unwrap(), None);
        assert_eq!(
            parse_metrics_address("127.0.0.1:9464").unwrap(),
            Some(MetricsAddress::Tcp(
                "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
            ))
        );
        assert!(matches!(
            parse_metrics_address("[::1]:0").unwrap(),
            Some(MetricsAddress::Tcp(_))
        ));
        assert_eq!(
            parse_metrics_address("unix:/run/x/m.sock").unwrap(),
            Some(MetricsAddress::Unix("/run/x/m.sock".into()))
        );
        for bad in [
            "0.0.0.0:9464",
            "10.1.2.3:80",
            "localhost:9464",
            "unix:rel.sock",
            "9464",
        ] {
            assert!(parse_metrics_address(bad).is_err(), "{bad}");
        }
        let same = "address = \"/run/a.sock\"\n[metrics]\naddress = \"unix:/run/a.sock\"";
        assert_eq!(
            Config::check(same).unwrap_err().key.as_deref(),
            Some("metrics.address")
        );
    }
}
