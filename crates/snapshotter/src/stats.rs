//! What the daemon counts about itself, for an operator's metrics endpoint. The core keeps
//! plain counters of what only it sees (layers converted and their bytes, integrity steps it
//! had to leave out) and answers questions about the store; request durations come from
//! whoever serves the requests, through an [`Observer`] the binary installs. Nothing here
//! knows about Prometheus or gRPC.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Told about every request when it finishes.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Request `op` ("prepare", "apply", ...) ended with result `code` ("OK", "NotFound",
    /// ...) after `elapsed`.
    fn request(&self, op: &'static str, code: &'static str, elapsed: Duration);
}

/// Where a layer was converted to EROFS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// The differ's Apply wrote it from a layer blob.
    Apply,
    /// Commit converted an upper directory (containerd's own differ unpacked the layer, or a
    /// container was committed).
    Commit,
}

/// The counters (monotonic since start-up).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    apply_layers: AtomicU64,
    apply_bytes: AtomicU64,
    commit_layers: AtomicU64,
    commit_bytes: AtomicU64,
    fsverity_userspace: AtomicU64,
    dmverity_skipped: AtomicU64,
    fsmeta_built: AtomicU64,
    pub(crate) artifacts: ArtifactCounters,
}

impl Counters {
    /// A layer of `bytes` was written by `how`.
    pub(crate) fn converted(&self, how: Conversion, bytes: u64) {
        let (n, b) = match how {
            Conversion::Apply => (&self.apply_layers, &self.apply_bytes),
            Conversion::Commit => (&self.commit_layers, &self.commit_bytes),
        };
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A layer was sealed without kernel fs-verity although fs-verity is wanted (its digest
    /// is checked in userspace instead).
    pub(crate) fn fsverity_userspace(&self) {
        self.fsverity_userspace.fetch_add(1, Ordering::Relaxed);
    }

    /// A layer with a dm-verity tree was mounted without a dm-verity device (the kernel has
    /// none, `dmverity_mode = "auto"`).
    pub(crate) fn dmverity_skipped(&self) {
        self.dmverity_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// A flattened chain's `fsmeta.erofs` was built (`max_unmerged_layers`).
    pub(crate) fn fsmeta_built(&self) {
        self.fsmeta_built.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, loop_mounts: u64) -> Stats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            apply_layers: get(&self.apply_layers),
            apply_bytes: get(&self.apply_bytes),
            commit_layers: get(&self.commit_layers),
            commit_bytes: get(&self.commit_bytes),
            fsverity_userspace: get(&self.fsverity_userspace),
            dmverity_skipped: get(&self.dmverity_skipped),
            fsmeta_built: get(&self.fsmeta_built),
            artifacts: self.artifacts.get(),
            loop_mounts,
        }
    }
}

/// The counters' values ([`crate::Snapshotter::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Layers the differ's Apply wrote.
    pub apply_layers: u64,
    /// Bytes of `layer.erofs` those Applies wrote.
    pub apply_bytes: u64,
    /// Upper directories Commit converted to layers.
    pub commit_layers: u64,
    /// Bytes of `layer.erofs` those Commits wrote.
    pub commit_bytes: u64,
    /// Layers sealed with a userspace digest instead of kernel fs-verity.
    pub fsverity_userspace: u64,
    /// Mounts of a layer with a dm-verity tree made without dm-verity.
    pub dmverity_skipped: u64,
    /// `fsmeta.erofs` images built for flattened chains.
    pub fsmeta_built: u64,
    /// Tar-index layers per what happened to their registry artifacts.
    pub artifacts: [(ArtifactOutcome, u64); 10],
    /// EROFS mounts made through a loop device instead of from the file (kernels before
    /// 6.12, or a mounter told to).
    pub loop_mounts: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            apply_layers: 0,
            apply_bytes: 0,
            commit_layers: 0,
            commit_bytes: 0,
            fsverity_userspace: 0,
            dmverity_skipped: 0,
            fsmeta_built: 0,
            artifacts: ArtifactOutcome::ALL.map(|o| (o, 0)),
            loop_mounts: 0,
        }
    }
}

/// What the store holds now ([`crate::Snapshotter::store_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Active (writable) snapshots.
    pub active: u64,
    /// Views.
    pub views: u64,
    /// Committed snapshots, i.e. layers.
    pub committed: u64,
    /// Bytes of the committed layers' images, as recorded at commit.
    pub layer_bytes: u64,
}

/// What happened to a layer's artifacts, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactOutcome {
    /// Fetched, valid and used.
    Used,
    /// containerd passed no image reference or manifest digest.
    NoImage,
    /// The registry has none for the layer.
    Absent,
    /// The registry was unreachable or failed.
    Unreachable,
    /// TLS with the registry failed: its certificate was refused (unknown issuer, wrong
    /// name, expired), it refused ours, or the endpoint's TLS files cannot be used.
    Tls,
    /// The fetch timed out.
    Timeout,
    /// Malformed or too large.
    Invalid,
    /// The tar index is not the tar's.
    BadIndex,
    /// The dm-verity tree does not match.
    BadTree,
    /// The signature is missing or does not verify.
    BadSignature,
}

impl ArtifactOutcome {
    /// Every outcome, in counter order.
    pub const ALL: [ArtifactOutcome; 10] = [
        ArtifactOutcome::Used,
        ArtifactOutcome::NoImage,
        ArtifactOutcome::Absent,
        ArtifactOutcome::Unreachable,
        ArtifactOutcome::Tls,
        ArtifactOutcome::Timeout,
        ArtifactOutcome::Invalid,
        ArtifactOutcome::BadIndex,
        ArtifactOutcome::BadTree,
        ArtifactOutcome::BadSignature,
    ];

    /// The counter's label value.
    pub fn name(self) -> &'static str {
        match self {
            ArtifactOutcome::Used => "used",
            ArtifactOutcome::NoImage => "no_image",
            ArtifactOutcome::Absent => "absent",
            ArtifactOutcome::Unreachable => "unreachable",
            ArtifactOutcome::Tls => "tls",
            ArtifactOutcome::Timeout => "timeout",
            ArtifactOutcome::Invalid => "invalid",
            ArtifactOutcome::BadIndex => "bad_index",
            ArtifactOutcome::BadTree => "bad_tree",
            ArtifactOutcome::BadSignature => "bad_signature",
        }
    }
}

/// Layers per outcome since start-up.
#[derive(Debug, Default)]
pub(crate) struct ArtifactCounters([AtomicU64; 10]);

impl ArtifactCounters {
    pub(crate) fn add(&self, o: ArtifactOutcome) {
        let i = ArtifactOutcome::ALL
            .iter()
            .position(|x| *x == o)
            .expect("listed");
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> [(ArtifactOutcome, u64); 10] {
        ArtifactOutcome::ALL.map(|o| {
            let i = ArtifactOutcome::ALL
                .iter()
                .position(|x| *x == o)
                .expect("listed");
            (o, self.0[i].load(Ordering::Relaxed))
        })
    }
}
