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
