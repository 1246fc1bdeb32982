//! End-to-end test harness for erofs-snapshotter: real containerd, real
//! containers, no network.
//!
//! - [`containerd`]: a private containerd (1.6, 1.7 or 2.1) per test, with its own
//!   root, state, sockets, config and mount namespace; proxy snapshotter and
//!   differ plugins can be wired in through [`ContainerdOpts`].
//! - [`oci`]: OCI image layouts and archives built from layer tars (written
//!   with `erofs_image::tar::TarWriter`), a busybox base layer, and
//!   [`oci::import`] for `ctr images import` on either version.
//! - [`registry`]: a throwaway `docker-registry` on 127.0.0.1 and a push
//!   client, for `ctr images pull --plain-http`.
//! - [`daemon`]: a proxy daemon (`BIN serve --config FILE`) as a child process.
//! - [`daemon_env`]: a proxy daemon with a given configuration in a private directory of
//!   its own (root, socket, content store), its client and snapshot-directory helpers.
//! - [`wired_containerd`]: containerd 2.1 wired to our daemon as proxy snapshotter and
//!   differ on one socket, with helpers that look at what the daemon did.
//! - [`proxied_containerd`]: containerd 1.6, 1.7 or 2.1 with our daemon as its proxy
//!   snapshotter (and differ, on 1.7 and 2.1), with helpers to look at what ends up on disk.
//! - [`cri`]: containerd's CRI plugin configured for a test, and a client that plays kubelet
//!   over the CRI API.
//! - [`client`]: a gRPC client of a daemon's Snapshots and Diff services.
//! - [`rootfs`]: performing a snapshotter's host-mode mount list (`bind`,
//!   `overlay`) on a directory, as containerd does, and parsing overlay options.
//! - [`snapshots`]: containerd's snapshotter conformance cases, generic over the
//!   snapshotter under test (over the socket, or in process without root).
//! - [`vm`]: Debian kernels booted under qemu (software emulation) with the host's root
//!   shared read-only, to run test binaries on kernels other than the host's.
//! - [`process`] and [`mounts`]: process groups, command deadlines, `/proc`
//!   scans and mount table helpers used by the above.
//!
//! Everything but [`snapshots`] with an in-process snapshotter needs root, and everything a type creates is removed when it is
//! dropped.
//!
//! ```no_run
//! use testsuite::{Containerd, ContainerdOpts, Version, oci};
//!
//! # fn main() -> anyhow::Result<()> {
//! let ctd = Containerd::start(ContainerdOpts::new(Version::V2_1))?;
//! let dir = tempfile::tempdir()?;
//! let base = oci::busybox_base_layer()?;
//! let mut top = oci::LayerBuilder::new();
//! top.file("etc/motd", 0o644, b"hi\n").whiteout("etc/group");
//! let image = oci::ImageSpec::new(&testsuite::unique_name("img"))
//!     .layer(base, oci::Compression::Gzip)
//!     .layer(top.finish()?, oci::Compression::Zstd);
//! let archive = oci::build_archive(&image, dir.path())?;
//! oci::import(&ctd, &archive, "overlayfs")?;
//! let out = ctd.run("overlayfs", &archive.name, &["/bin/sh", "-c", "cat /etc/motd"])?;
//! assert_eq!(testsuite::process::check_output(&out, "ctr run")?, "hi\n");
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod daemon_env;
pub mod mounts;
pub mod oci;
pub mod process;
pub mod proxied_containerd;
pub mod registry;
pub mod rootfs;
pub mod snapshots;
pub mod tls;
pub mod vm;
pub mod wired_containerd;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use containerd::{
    Containerd, ContainerdOpts, ProxyKind, ProxyPlugin, RunOpts, UnpackConfig, Version,
};
pub use daemon::Daemon;
pub use registry::Registry;

/// A name unique within this machine's uptime: `prefix-PID-N-NANOS` (lowercase
/// ASCII, digits and `-`, so valid as a container id, a snapshot key and an
/// image repository component).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Cleans up everything the harness started from thread `owner` (from every
/// thread with `None`) and has not cleaned up yet: each live [`Containerd`]
/// (processes, cgroups, mounts, directories) and each child process group
/// (registries, daemons). For a test whose body is stuck, called from another
/// thread; the stuck objects' own Drop later finds nothing left to do.
pub fn emergency_cleanup(owner: Option<std::thread::ThreadId>) {
    containerd::cleanup_instances(owner);
    process::kill_groups(owner);
}

/// Runs `f` on its own thread and fails the test if it takes longer than `limit`, after
/// [`emergency_cleanup`] of everything the harness started from that thread (a stuck test's
/// objects are never dropped). Every command the harness runs has its own deadline as well,
/// so a stuck test normally ends (and cleans up) before this fires; this is the backstop.
/// A panic in `f` is re-raised here.
pub fn with_timeout<F: FnOnce() + Send + 'static>(limit: std::time::Duration, f: F) {
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    let owner = handle.thread().id();
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = handle.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            emergency_cleanup(Some(owner));
            panic!("test timed out after {limit:?}")
        }
    }
}

/// Fails unless running as root (every part of the harness needs it).
pub fn require_root() -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!("the end-to-end harness needs root");
    }
    Ok(())
}
