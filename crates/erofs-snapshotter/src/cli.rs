//! Command-line arguments. Doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// containerd EROFS snapshotter and differ, and EROFS image tools.
///
/// `serve` runs the daemon containerd talks to as a proxy plugin. The other commands build,
/// inspect and check EROFS images without erofs-utils and without mounting them.
#[derive(Debug, Parser)]
#[command(name = "erofs-snapshotter", version, propagate_version = true)]
pub struct Cli {
    /// Log debug messages (or set EROFS_SNAPSHOTTER_LOG, e.g. "info" or "erofs_image=debug").
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: containerd's Snapshots (and Diff) services on a Unix socket.
    Serve(ServeArgs),
    /// The daemon's configuration file: print the defaults, or check a file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Ask a running daemon whether it answers (one gRPC call on its socket); exit status 0
    /// if it does, 1 if not. For service managers and Kubernetes probes.
    Health(HealthArgs),
    /// Build an EROFS image from a directory or a tar stream (like mkfs.erofs).
    Mkfs(MkfsArgs),
    /// Build fsmeta: one metadata-only EROFS image over a chain of layer images (what
    /// `mkfs.erofs --aufs --ovlfs-strip=1 OUT LAYER...` makes for flattened snapshots).
    ///
    /// Its tree is the overlayfs view of the layers stacked (whiteouts and opaque
    /// directories applied, then dropped); its files point into the layers' own blocks, so
    /// nothing but inline tails is copied. Mount it with one `device=` per layer, in the
    /// order given: `mount -t erofs -o ro,device=LAYER1,...,device=LAYERN OUT /mnt`. Check
    /// or read it the same way: `fsck --device LAYER1 ... OUT`, `ls --device ...`.
    Merge(MergeArgs),
    /// Check an image: every invariant the kernel relies on; exit status 1 on any error.
    Fsck(FsckArgs),
    /// List a directory of an image.
    Ls(LsArgs),
    /// Write a file of an image to standard output.
    Cat(PathArgs),
    /// Show an inode of an image.
    Stat(PathArgs),
    /// Print the superblock and every inode of an image.
    Dump(ImageArgs),
    /// Layer artifacts (tar index, dm-verity tree, root-hash signature) for a registry:
    /// build them for an image, attach them to it as OCI referrers, list them.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
    /// Check a tar-index layer (`[index][tar]`, optionally with its dm-verity tree after it)
    /// against its diffID, as a confidential guest does: hash the tar inside and compare.
    /// Exit status 0 if it matches, 1 if not.
    Verify(VerifyArgs),
}

#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Compute, for every tar layer of an image, its tar index and the dm-verity tree of the
    /// `[index][tar]` layer (and sign the root hashes), and write them with their referrer
    /// manifest to OUTDIR.
    Build(ArtifactsBuildArgs),
    /// Push what `build` wrote to a repository as referrers of the image it was built from
    /// (Referrers API, or the referrers tag `sha256-<hex>` for registries without it).
    Push(ArtifactsPushArgs),
    /// Show what a registry holds for an image: per layer, which artifacts, their sizes, the
    /// root hash, and whether it is signed (and with --public-key, whether that verifies).
    Ls(ArtifactsLsArgs),
    /// Write a new ed25519 key pair: KEY (secret, mode 0600) and KEY.pub.
    Keygen(KeygenArgs),
}

/// How to reach the registry. HTTPS by default (as `ctr`), verified against the system's
/// root certificates plus any --ca.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// User name for HTTP basic auth (and the token realm); the password is read from
    /// EROFS_REGISTRY_PASSWORD.
    #[arg(long, value_name = "USER")]
    pub username: Option<String>,
    /// Talk plain HTTP to the registry instead of HTTPS (no TLS at all: use for test and
    /// loopback registries only).
    #[arg(long, conflicts_with_all = ["ca", "cert", "skip_verify"])]
    pub plain_http: bool,
    /// Also trust the CA certificates in this PEM file (repeat for more); the system's roots
    /// are trusted as well.
    #[arg(long, value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// Client certificate (PEM, leaf first) for registries that require one (mutual TLS).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM); without it the key is read from the --cert file.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Accept any server certificate (no chain, expiry or name check). DANGEROUS: anyone on
    /// the network path can impersonate the registry and see the credentials; only for
    /// testing.
    #[arg(long)]
    pub skip_verify: bool,
    /// Platform to pick from an image index, `OS/ARCH` (default: linux and this machine's
    /// architecture).
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
}

#[derive(Debug, Args)]
pub struct ArtifactsBuildArgs {
    /// The image: an OCI image layout directory, an OCI archive (tar of a layout), or a
    /// registry reference `HOST[:PORT]/REPO[:TAG|@DIGEST]` (HTTPS; see --plain-http).
    pub source: String,
    /// Where the blobs (`blobs/sha256/...`) and the referrer manifest (`manifest.json`) go;
    /// created if missing.
    pub outdir: PathBuf,
    /// Sign each root hash with this ed25519 secret key file (`artifacts keygen`).
    #[arg(long, value_name = "KEY")]
    pub sign_key: Option<PathBuf>,
    /// One of the nodes' `differ.mkfs_options` (repeat for each, e.g. `--mkfs-option=-T0`),
    /// for their tar indexes (and, with --full-image, their full images) to be the same
    /// bytes: a node with other options cannot use the artifacts.
    #[arg(long = "mkfs-option", value_name = "OPT", allow_hyphen_values = true)]
    pub mkfs_options: Vec<String>,
    /// Also keep each assembled layer (`[index][tar][tree]`) as OUTDIR/layers/<diffID hex>.
    #[arg(long)]
    pub keep_layers: bool,
    /// Also build each layer as the full EROFS image the differ writes without tar index,
    /// and store (and sign) the dm-verity tree of that image, for nodes with
    /// `enable_tar_index = false` and `enable_dmverity = true`.
    #[arg(long)]
    pub full_image: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct ArtifactsPushArgs {
    /// What `artifacts build` wrote.
    pub outdir: PathBuf,
    /// The repository, `HOST[:PORT]/REPO` (over HTTPS unless --plain-http); with a tag or
    /// digest it must name the image the artifacts were built from.
    pub target: String,
    /// Keep earlier referrers of our artifact type in the referrers tag (by default they are
    /// replaced by this one; with the Referrers API nothing is removed).
    #[arg(long)]
    pub keep_old: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct ArtifactsLsArgs {
    /// The image, `HOST[:PORT]/REPO[:TAG|@DIGEST]` (over HTTPS unless --plain-http).
    pub image: String,
    /// Verify signatures with this ed25519 public key file; exit status 1 if one does not
    /// verify.
    #[arg(long, value_name = "KEY.pub")]
    pub public_key: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The secret key file to write (the public key goes to KEY.pub); never overwritten.
    pub key: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The layer file.
    pub image: PathBuf,
    /// The expected diffID, `sha256:<hex>`.
    #[arg(long, value_name = "sha256:HEX")]
    pub diff_id: String,
    /// The tar's exact size, when known (e.g. from the artifact's annotation).
    #[arg(long, value_name = "BYTES")]
    pub tar_size: Option<u64>,
    /// Also check the index: rebuild it from the tar as the differ does for the layer with
    /// this (compressed) digest, and compare. Without it only the tar is checked, and the
    /// index in front of it must be trusted some other way.
    #[arg(long, value_name = "sha256:HEX")]
    pub layer_digest: Option<String>,
    /// With --layer-digest: one of the differ's `mkfs_options` the index was built with
    /// (repeat for each).
    #[arg(long = "mkfs-option", value_name = "OPT", allow_hyphen_values = true)]
    pub mkfs_options: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it the defaults apply: root
    /// /var/lib/erofs-snapshotter, socket /run/erofs-snapshotter/snapshotter.sock.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the whole default configuration, every key commented: a starting point for
    /// /etc/erofs-snapshotter/config.toml.
    Default,
    /// Check a configuration file as `serve` would read it: syntax, unknown keys, values
    /// (sizes, durations, paths, addresses). Exit status 0 if it is valid, 1 if not (the
    /// first problem is printed with its line and key), 2 if it cannot be read.
    Check(ConfigCheckArgs),
}

#[derive(Debug, Args)]
pub struct ConfigCheckArgs {
    /// The file, or `-` for standard input.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The daemon's socket (`address` in its configuration).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/erofs-snapshotter/snapshotter.sock"
    )]
    pub socket: PathBuf,
    /// Longest to wait for the answer (Go-style duration: "5s", "500ms").
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub timeout: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Tar modes, as in mkfs.erofs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TarMode {
    /// Full image: file data is copied into the image (4096-byte blocks by default).
    F,
    /// Tar index: a small index in front of the original tar bytes (512-byte blocks).
    I,
}

#[derive(Debug, Args)]
pub struct MkfsArgs {
    /// The image to write. It appears only when the build succeeded.
    pub image: PathBuf,
    /// A directory, or with --tar a tar file (plain, gzip or zstd, detected) or `-` for stdin.
    pub source: PathBuf,
    /// Read SOURCE as a tar stream: `--tar=f` (or `--tar`) for a full image, `--tar=i` for a
    /// tar index (one file `[index][tar]` that mounts with no options).
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "f")]
    pub tar: Option<TarMode>,
    /// Translate OCI/AUFS whiteouts (`.wh.NAME`, `.wh..wh..opq`) into overlayfs whiteouts
    /// and opaque directories, as container layers need.
    #[arg(long)]
    pub aufs: bool,
    // The mkfs.erofs options below are taken as given and checked by the library's parser
    // (snapshotter::diff::MkfsOptions), the one the differ's `mkfs_options` go through too.
    /// Extended options, comma-separated: `inline_data` (default) or `noinline_data` /
    /// `^inline_data` (keep regular-file data block-aligned, as containerd asks).
    #[arg(short = 'E', value_name = "OPTS")]
    pub extended: Vec<String>,
    /// Image timestamp in seconds. Without --mkfs-time every inode gets this mtime.
    #[arg(short = 'T', value_name = "SECONDS", allow_hyphen_values = true)]
    pub timestamp: Option<String>,
    /// With -T, every inode gets the timestamp (the default; the last of --all-time and
    /// --mkfs-time counts).
    #[arg(long, overrides_with = "mkfs_time")]
    pub all_time: bool,
    /// With -T, use the timestamp only for the image and synthesized directories; keep the
    /// files' own mtimes.
    #[arg(long, overrides_with = "all_time")]
    pub mkfs_time: bool,
    /// Filesystem UUID: a UUID, `clear` (all zeros) or `random` (the default).
    #[arg(short = 'U', value_name = "UUID")]
    pub uuid: Option<String>,
    /// Block size of full images (512, 1024, 2048 or 4096; default 4096).
    #[arg(short = 'b', value_name = "BYTES")]
    pub block_size: Option<String>,
    /// Data order (accepted for mkfs.erofs compatibility; data is always in input order).
    #[arg(long, value_name = "none|path")]
    pub sort: Option<String>,
    /// Tar index only: write just the index to IMAGE and the (decompressed) tar to this file;
    /// mount with `-o device=FILE`.
    #[arg(long, value_name = "FILE", requires = "tar")]
    pub tar_out: Option<PathBuf>,
    /// Refuse to produce an image larger than this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u64>,
    /// No progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The fsmeta image to write. It appears only when the build succeeded (written under a
    /// temporary name, synced, renamed).
    pub image: PathBuf,
    /// The layer images, bottom layer first (full images and `[index][tar]` tar indexes,
    /// mixed as they come); device N of the result is the N-th.
    #[arg(required = true, value_name = "LAYER")]
    pub layers: Vec<PathBuf>,
    /// Also treat aufs-style markers left as plain entries in the layers as whiteouts:
    /// `.wh.NAME` hides NAME in the layers below and `.wh..wh..opq` makes its directory
    /// opaque; the markers are not kept. This is mkfs.erofs's documented meaning ("replace
    /// aufs special files with overlayfs metadata"); mkfs.erofs 1.9's rebuild mode itself
    /// ignores the flag for EROFS inputs. Layers built with `mkfs --aufs` (as the differ
    /// builds them) hold overlayfs whiteouts already, which are applied either way.
    #[arg(long)]
    pub aufs: bool,
    /// Accepted for mkfs.erofs compatibility: overlayfs metadata (whiteouts, `trusted.overlay.*`
    /// xattrs) is always stripped from the merged tree, so only 1 is accepted.
    #[arg(long, value_name = "1", value_parser = ["1"])]
    pub ovlfs_strip: Option<String>,
    /// Filesystem UUID: a UUID, `clear` (all zeros) or `random`. By default one is derived
    /// from the layers, so the same layers always give the same bytes.
    #[arg(short = 'U', value_name = "UUID")]
    pub uuid: Option<String>,
    /// No progress output.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// The image.
    pub image: PathBuf,
    /// An extra device (blob) of a multi-device image, in device-table order; repeatable.
    /// Without it, extra devices are read from the image itself (the `[index][tar]` form).
    #[arg(long = "device", value_name = "BLOB")]
    pub devices: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FsckArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Also print warnings.
    #[arg(long)]
    pub warnings: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Directory to list (default `/`).
    #[arg(default_value = "/")]
    pub path: String,
    /// Long format: mode, links, owner, size, mtime.
    #[arg(short = 'l')]
    pub long: bool,
    /// List recursively.
    #[arg(short = 'R')]
    pub recursive: bool,
}

#[derive(Debug, Args)]
pub struct PathArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Path inside the image.
    pub path: String,
}
