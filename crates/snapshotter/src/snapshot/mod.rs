//! The snapshotter: containerd's snapshot lifecycle over the store, the on-disk layout and
//! the layer images.
//!
//! Lifecycle (as containerd defines it): `prepare` makes an *active* snapshot, writable, on
//! top of a *committed* parent (or nothing); `view` makes a read-only one; `commit` turns an
//! active snapshot into a committed one under a new name, which is when its upper directory
//! becomes `layer.erofs` (unless the differ already wrote the layer); `remove` deletes a
//! snapshot without children. Committed snapshots are immutable, and every mount of a
//! snapshot's parents is the same for its whole life.
//!
//! Ordering for crashes: directories are built under `new-*` and renamed into place inside
//! the store transaction that records them; layer images are written to a temporary name,
//! fsynced, renamed and the directory fsynced before the commit is recorded; removal deletes
//! the record first and the directory after. A crash at any point leaves a store whose
//! records all have complete directories; leftovers are swept at start-up and by Cleanup.

mod cleanup;
mod commit;
mod flatten;
mod gate;
mod info;
pub(crate) mod layers;
mod locks;
mod mounts;
mod prepare;
mod remove;
mod space;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

pub use gate::HeavyStats;
pub use info::{Info, Usage};

use crate::cancel::Cancel;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::integrity::Integrity;
use crate::layout::Layout;
use crate::mount::Mounter;
use crate::store::Store;
use locks::KeyLocks;

/// containerd's limit on one label (key plus value).
pub const MAX_LABEL_LEN: usize = 4096;
/// Longest snapshot key accepted.
pub const MAX_KEY_LEN: usize = 4096;
/// Label with the writable layer size of one snapshot (bytes).
pub const LABEL_MAX_SIZE: &str = "containerd.io/snapshot/max-size";
/// Labels with user-namespace id mappings (`ctr:host:size[,...]`).
pub const LABEL_UIDMAPPING: &str = "containerd.io/snapshot/uidmapping";
/// See [`LABEL_UIDMAPPING`].
pub const LABEL_GIDMAPPING: &str = "containerd.io/snapshot/gidmapping";

/// The snapshotter core. Its state is private to this module: the differ ([`crate::diff`])
/// reaches snapshots only through the methods in [`layers`].
#[derive(Debug)]
pub struct Snapshotter {
    cfg: Config,
    layout: Layout,
    store: Store,
    mounter: Arc<dyn Mounter>,
    locks: KeyLocks,
    /// Serialises changes to the mount table so a layer is mounted once (held for the mount
    /// itself, not for verifying the layer: see `ensure_layer_mounted`).
    mount_lock: Mutex<()>,
    /// Per-layer locks (by snapshot id) held while a layer is verified and mounted, so two
    /// requests do not hash the same layer at once.
    layer_locks: KeyLocks,
    /// Manager mode: layers whose digest was checked before their paths were handed to
    /// containerd, by snapshot id, with the file's identity then (re-checked when it changes).
    manager_verified: Mutex<std::collections::HashMap<u64, FileStamp>>,
    /// Creation holds it shared between staging and recording; Cleanup holds it exclusively,
    /// so it never mistakes a directory being recorded for an orphan.
    sweep_lock: RwLock<()>,
    /// How layers are sealed and checked.
    integrity: Integrity,
    default_size: u64,
    /// The cap on heavy requests.
    heavy: gate::Gate,
    /// The free-space reserve under the root.
    space: space::Space,
    /// What the metrics endpoint reads ([`Self::stats`]).
    pub(crate) counters: crate::stats::Counters,
    /// Told about every request ([`Self::observe_request`]).
    observer: std::sync::OnceLock<Arc<dyn crate::stats::Observer>>,
    /// Where Apply fetches layer artifacts from (`[artifacts] enabled`), installed by the
    /// daemon ([`Self::set_artifact_source`]).
    artifacts: std::sync::OnceLock<Arc<dyn crate::artifacts::ArtifactSource>>,
    /// `artifacts.trusted_keys`, read at start-up.
    trusted_keys: Vec<erofs_registry::signature::PublicKey>,
}

/// A file's identity and last change: any write, rename over or attribute change makes a
/// different stamp (ctime cannot be set by anyone but the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl FileStamp {
    pub(crate) fn of(md: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// Check a key or name from a request.
pub(crate) fn validate_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument(format!("{what} must not be empty")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::invalid_argument(format!(
            "{what} longer than {MAX_KEY_LEN} bytes"
        )));
    }
    if key.contains('\0') {
        return Err(Error::invalid_argument(format!(
            "{what} contains a NUL byte"
        )));
    }
    Ok(())
}

/// containerd's label rules.
pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in labels {
        if k.is_empty() {
            return Err(Error::invalid_argument("label key must not be empty"));
        }
        if k.len() + v.len() > MAX_LABEL_LEN {
            return Err(Error::invalid_argument(format!(
                "label key and value length ({} bytes) greater than maximum size ({MAX_LABEL_LEN} bytes)",
                k.len() + v.len()
            )));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(Error::invalid_argument("label contains a NUL byte"));
        }
    }
    Ok(())
}

/// Create (or truncate) a layer's temporary file, for reading and writing: what a layer is
/// built into before it is fsynced and renamed into place.
pub(crate) fn create_scratch(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))
}

/// fsync a directory (after renames in it).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}

/// `uname -r`, for messages.
fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

impl Snapshotter {
    /// Open the snapshotter: check the host, open the store, and recover from any crash
    /// (unfinished creations and removals, half-written layers, stale mounts).
    pub fn open(cfg: Config, mounter: Arc<dyn Mounter>) -> Result<Self> {
        cfg.validate()?;
        let layout = Layout::new(&cfg.root_path);
        let mk = |p: &Path| -> Result<()> {
            fs::create_dir_all(p).map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
            rustix::fs::chmod(p, rustix::fs::Mode::from_raw_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", p.display()), e.into()))
        };
        mk(layout.root())?;
        mk(&layout.snapshots())?;
        crate::mount::probe::check_host(layout.root())?;
        if cfg.differ.enable_tar_index {
            // Refused here, with the reason, rather than as an EINVAL at the first mount.
            crate::mount::probe::small_blocks(layout.root(), &*mounter).map_err(|why| {
                Error::failed_precondition(format!(
                    "differ.enable_tar_index: this kernel cannot mount EROFS images with 512-byte blocks, which tar-index layers have (Linux 6.4 or later; {}): {why}",
                    kernel_release()
                ))
            })?;
        }
        let integrity = Integrity::new(&cfg, layout.root())?;
        let trusted_keys = crate::artifacts::load_keys(&cfg.artifacts.trusted_keys)?;
        let store = Store::open(&layout.db())?;
        let s = Snapshotter {
            default_size: cfg.default_size_bytes(),
            heavy: gate::Gate::new(cfg.max_concurrent_heavy()),
            space: space::Space::new(
                layout.root(),
                cfg.min_free_space(),
                &cfg.daemon.min_free_space,
            ),
            cfg,
            layout,
            store,
            mounter,
            locks: KeyLocks::default(),
            mount_lock: Mutex::new(()),
            layer_locks: KeyLocks::default(),
            manager_verified: Default::default(),
            sweep_lock: RwLock::new(()),
            integrity,
            counters: Default::default(),
            observer: std::sync::OnceLock::new(),
            artifacts: std::sync::OnceLock::new(),
            trusted_keys,
        };
        s.recover()?;
        Ok(s)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// On-disk paths.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// How fs-verity protects layers.
    pub fn verity_mode(&self) -> crate::integrity::VerityMode {
        self.integrity.verity_mode()
    }

    /// Heavy requests (Apply, Compare, converting Commits): running, most at once, the cap.
    pub fn heavy_stats(&self) -> HeavyStats {
        self.heavy.stats()
    }

    /// A slot for a heavy request (see [`gate`]); take key locks first.
    pub(crate) fn heavy_slot(&self, cancel: &Cancel, what: &str) -> Result<gate::Slot<'_>> {
        self.heavy.enter(cancel, what)
    }

    /// Refuse to start `what` while free space under the root is below the reserve.
    pub(crate) fn require_space(&self, what: &str) -> Result<()> {
        self.space.check(what)
    }

    /// `cancel`, also tripping when `what`'s writes take free space below the reserve.
    pub(crate) fn guarded(&self, cancel: &Cancel, what: String) -> Cancel {
        cancel.with_condition(self.space.clone().watch(what))
    }

    /// The error to report for work `work` governed: what stopped it (see
    /// [`Cancel::explain`]), and, for a write that found the disk full, how full it is.
    pub(crate) fn stopped(&self, work: &Cancel, e: Error) -> Error {
        let e = work.explain(e);
        if e.is_disk_full() {
            e.context(format!("out of space: {}", self.space.report()))
        } else {
            e
        }
    }

    /// Install where Apply fetches layer artifacts from (the first one installed stays).
    pub fn set_artifact_source(&self, source: Arc<dyn crate::artifacts::ArtifactSource>) {
        let _ = self.artifacts.set(source);
    }

    /// The artifact source, when artifacts are enabled and one is installed.
    pub(crate) fn artifact_source(&self) -> Option<&Arc<dyn crate::artifacts::ArtifactSource>> {
        self.artifacts.get().filter(|_| self.cfg.artifacts.enabled)
    }

    /// The public keys root-hash signatures are checked against.
    pub(crate) fn trusted_keys(&self) -> &[erofs_registry::signature::PublicKey] {
        &self.trusted_keys
    }

    /// Install the observer told about every request (the first one installed stays).
    pub fn set_observer(&self, observer: Arc<dyn crate::stats::Observer>) {
        let _ = self.observer.set(observer);
    }

    /// Request `op` ended with `code` after `elapsed`: tell the observer, if there is one.
    pub fn observe_request(
        &self,
        op: &'static str,
        code: &'static str,
        elapsed: std::time::Duration,
    ) {
        if let Some(o) = self.observer.get() {
            o.request(op, code, elapsed);
        }
    }

    /// The counters since start-up: conversions, integrity steps left out, loop mounts.
    pub fn stats(&self) -> crate::stats::Stats {
        self.counters.snapshot(self.mounter.loop_mounts())
    }

    /// What the store holds now: snapshots by kind and the committed layers' disk use.
    pub fn store_stats(&self) -> Result<crate::stats::StoreStats> {
        let all = self.store.read(|tx| tx.all())?;
        let mut st = crate::stats::StoreStats::default();
        for (_, rec) in &all {
            match rec.kind {
                crate::store::Kind::Active => st.active += 1,
                crate::store::Kind::View => st.views += 1,
                crate::store::Kind::Committed => {
                    st.committed += 1;
                    st.layer_bytes += rec.size;
                }
            }
        }
        Ok(st)
    }

    /// The capabilities to advertise to containerd.
    pub fn capabilities(&self) -> Vec<&'static str> {
        let mut caps = vec!["rebase", "only-remap-ids"];
        if crate::mount::probe::idmapped_mounts(self.layout.root()) {
            caps.push("remap-ids");
        }
        caps
    }

    fn staging_dir(&self) -> PathBuf {
        let n: u64 = rand_u64();
        self.layout
            .snapshots()
            .join(format!("{}{n:016x}", crate::layout::STAGING_PREFIX))
    }
}

/// A random number for unique temporary names.
pub(crate) fn rand_u64() -> u64 {
    let u = uuid::Uuid::new_v4();
    u64::from_le_bytes(u.as_bytes()[..8].try_into().expect("8 bytes"))
}
