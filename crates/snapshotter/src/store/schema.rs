//! Tables, the schema version, and the stored record.
//!
//! ```text
//! meta:      "schema" -> 1, "next_id" -> next snapshot id (ids are never reused)
//! snapshots: key -> Record (JSON)
//! ids:       id -> key          (which ids are live; Cleanup sweeps directories of others)
//! children:  (parent id, child id) -> ()   (refuse removing parents; rebase)
//! ```

use std::collections::BTreeMap;

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
pub(crate) const IDS: TableDefinition<u64, &str> = TableDefinition::new("ids");
pub(crate) const CHILDREN: TableDefinition<(u64, u64), ()> = TableDefinition::new("children");

pub(crate) const SCHEMA_KEY: &str = "schema";
pub(crate) const NEXT_ID_KEY: &str = "next_id";
/// Bumped on incompatible changes; a newer store is refused rather than misread.
pub(crate) const SCHEMA_VERSION: u64 = 1;

/// Snapshot kinds, numbered as containerd's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only view of a committed snapshot.
    View,
    /// Writable.
    Active,
    /// Immutable layer.
    Committed,
}

impl Kind {
    /// containerd's filter name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A point in time, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds.
    pub nanos: u32,
}

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// A layer's dm-verity tree as the differ built it: what a dm-verity device over the layer
/// must use, whatever the sidecar next to the layer says by then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmVerityRecord {
    /// Root hash, hex (SHA-256, salted with the fixed salt of the differ's trees).
    pub roothash: String,
    /// Byte offset of the verity superblock in `layer.erofs` (= the padded data size).
    pub hashoffset: u64,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
}

/// What is known about a committed layer's blob (for an active snapshot the differ wrote a
/// layer into: what Apply measured, until Commit records it for good).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// Bytes of `layer.erofs` as committed (with any dm-verity tree appended to it).
    pub size: u64,
    /// fs-verity digest (hex SHA-256) measured at commit, checked before every mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsverity_digest: Option<String>,
    /// The dm-verity tree appended to the layer, if any (records written before this field
    /// existed have none: see `Integrity::dmverity_anchor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmverity: Option<DmVerityRecord>,
    /// Whether FS_IMMUTABLE_FL was set.
    #[serde(default)]
    pub immutable: bool,
    /// Owner of the layer's root directory (new upper dirs on top of it inherit it).
    #[serde(default)]
    pub root_uid: u32,
    /// Group of the layer's root directory.
    #[serde(default)]
    pub root_gid: u32,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Directory id.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: Timestamp,
    /// Last update.
    pub updated: Timestamp,
    /// Disk usage recorded at commit.
    #[serde(default)]
    pub size: u64,
    /// Inodes recorded at commit.
    #[serde(default)]
    pub inodes: u64,
    /// The layer blob (committed snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerMeta>,
    /// Size limit of the writable layer (active snapshots in block mode), bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_size: Option<u64>,
    /// Active snapshots and views: their lower is the parent's flattened chain
    /// (`fsmeta.erofs`), decided at creation so the mounts never change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flattened: bool,
    /// Committed snapshots: the `fsmeta.erofs` built for the chain ending here (this layer
    /// and its parents), recorded only once it is durable and sealed; what it is checked
    /// against before every mount (size, digest, dm-verity tree, immutable flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsmeta: Option<LayerMeta>,
}
