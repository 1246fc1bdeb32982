//! On-disk names under the snapshotter root, the same as containerd's EROFS snapshotter so
//! tools that look for them (Kata, nerdbox) find them:
//!
//! ```text
//! ROOT/metadata.redb                    the metadata store
//! ROOT/snapshots/ID/.erofslayer         marker: an active snapshot the EROFS differ may fill
//! ROOT/snapshots/ID/fs/                 upper dir while active; the layer's mount point once committed
//! ROOT/snapshots/ID/work/               overlay work dir (active snapshots)
//! ROOT/snapshots/ID/layer.erofs         the layer image
//! ROOT/snapshots/ID/layer.erofs.dmverity  dm-verity sidecar (JSON)
//! ROOT/snapshots/ID/rwlayer.img         ext4 image of a size-limited writable layer
//! ROOT/snapshots/ID/fsmeta.erofs        committed: the chain ending here flattened (metadata
//!                                       only; the chain's layer.erofs files are its devices)
//! ROOT/snapshots/ID/fsmeta.vmdk         VMDK descriptor: fsmeta.erofs then the layers, one disk
//! ROOT/snapshots/ID/merged/             host mode: where fsmeta.erofs is mounted
//! ROOT/snapshots/new-*                  a snapshot being created (renamed to ID when recorded)
//! ROOT/snapshots/rm-*                   a snapshot being deleted (renamed from ID first)
//! ```

use std::path::{Path, PathBuf};

/// Name of the metadata database file.
pub const DB_FILE: &str = "metadata.redb";
/// Directory of snapshot directories.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Prefix of staging directories.
pub const STAGING_PREFIX: &str = "new-";
/// Prefix of directories being removed.
pub const REMOVING_PREFIX: &str = "rm-";
/// Marker file of active snapshots.
pub const MARKER: &str = ".erofslayer";
/// The layer image.
pub const LAYER: &str = "layer.erofs";
/// Temporary name while a layer image is written.
pub const LAYER_TMP: &str = "layer.erofs.tmp";
/// A converted layer whose commit is not recorded yet.
pub const LAYER_PENDING: &str = "layer.erofs.pending";
/// The dm-verity sidecar.
pub const DMVERITY_SIDECAR: &str = "layer.erofs.dmverity";
/// The ext4 image of a size-limited writable layer.
pub const RWLAYER: &str = "rwlayer.img";
/// The flattened chain ending at a committed snapshot (upstream's name).
pub const FSMETA: &str = "fsmeta.erofs";
/// Temporary name while fsmeta is written.
pub const FSMETA_TMP: &str = "fsmeta.erofs.tmp";
/// The VMDK descriptor of fsmeta and the chain's layers as one disk.
pub const FSMETA_VMDK: &str = "fsmeta.vmdk";
/// Temporary name while the VMDK descriptor is written.
pub const FSMETA_VMDK_TMP: &str = "fsmeta.vmdk.tmp";
/// Host mode: the mount point of fsmeta.
pub const MERGED_DIR: &str = "merged";

/// Paths under one snapshotter root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Paths under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The metadata database.
    pub fn db(&self) -> PathBuf {
        self.root.join(DB_FILE)
    }
    /// `ROOT/snapshots`.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join(SNAPSHOTS_DIR)
    }
    /// `ROOT/snapshots/ID`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.snapshots().join(id.to_string())
    }
    /// `ROOT/snapshots/ID/fs`.
    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }
    /// `ROOT/snapshots/ID/work`.
    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }
    /// `ROOT/snapshots/ID/layer.erofs`.
    pub fn layer(&self, id: u64) -> PathBuf {
        self.dir(id).join(LAYER)
    }
    /// `ROOT/snapshots/ID/rwlayer.img`.
    pub fn rwlayer(&self, id: u64) -> PathBuf {
        self.dir(id).join(RWLAYER)
    }
    /// `ROOT/snapshots/ID/layer.erofs.dmverity`.
    pub fn dmverity(&self, id: u64) -> PathBuf {
        self.dir(id).join(DMVERITY_SIDECAR)
    }
    /// `ROOT/snapshots/ID/fsmeta.erofs`.
    pub fn fsmeta(&self, id: u64) -> PathBuf {
        self.dir(id).join(FSMETA)
    }
    /// `ROOT/snapshots/ID/fsmeta.vmdk`.
    pub fn fsmeta_vmdk(&self, id: u64) -> PathBuf {
        self.dir(id).join(FSMETA_VMDK)
    }
    /// `ROOT/snapshots/ID/merged`.
    pub fn merged(&self, id: u64) -> PathBuf {
        self.dir(id).join(MERGED_DIR)
    }
    /// The snapshot id a directory path belongs to, if `path` is `ROOT/snapshots/ID[/...]`.
    pub fn id_of(&self, path: &Path) -> Option<u64> {
        let rest = path.strip_prefix(self.snapshots()).ok()?;
        let first = rest.components().next()?;
        first.as_os_str().to_str()?.parse().ok()
    }
}
