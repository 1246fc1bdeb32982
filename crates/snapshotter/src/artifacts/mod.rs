//! Layer artifacts from the registry (the node side of `erofs-snapshotter artifacts push`):
//! when the differ applies a tar layer as a tar index (for full images, see below), it asks the image's registry for the
//! layer's tar index, dm-verity tree and root-hash signature, checks them against the layer
//! it builds, and uses what passes; anything missing, slow, unreachable or invalid is computed
//! locally, with one warning and a counter. Only `require_signed_root_hash` turns a missing or
//! bad signature into a failed Apply.
//!
//! What identifies the image: containerd's unpacker gives the layer descriptor's annotations
//! to Prepare as snapshot labels (the `containerd.io/snapshot/` ones) and the same descriptor
//! to Apply. The image reference and manifest digest are there when the pull added them
//! ([`LABEL_IMAGE_REF`], [`LABEL_MANIFEST_DIGEST`]: CRI with `disable_snapshot_annotations =
//! false`); see README, "Layer artifacts from the registry", for what each containerd version
//! sends. Apply's descriptor is looked at first, then the labels of the snapshot Apply writes.
//!
//! What is checked, and why it is sound:
//! * The tar index is used only if it is byte for byte the index the node builds from the tar
//!   as it streams by ([`check_index`]). An index carries more than offsets: every file's
//!   mode, owner, name, link target and xattrs. A check of offsets alone (header offset, data
//!   offset and size of every entry agree with the stream) would let a registry turn a file
//!   setuid or rename it while every offset still matched; checking all of that against the
//!   tar headers is rebuilding the index. Building it is cheap next to the stream (headers
//!   only, while the data is decompressed and hashed for the diffID anyway), so the node keeps
//!   building it and compares: a hostile index is never parsed, only compared, which is linear
//!   and cannot panic. The saving is in the tree.
//! * The dm-verity tree covers `[index][tar]`, which after the index check is exactly the
//!   layer the node built. Without a trusted root (no valid signature) the tree is recomputed
//!   from the data and every level compared ([`TreeCheck::Full`]): sound, but no cheaper than
//!   building it. With a root signed by a trusted key and `snapshotter.dmverity_mode = "on"`
//!   (every read of the layer goes through dm-verity, which checks each data block against
//!   the tree and each tree block up to the root), only the tree is checked against its root
//!   ([`TreeCheck::TreeOnly`], 1/16 of the hashing): a tree that does not describe the data
//!   can then only make reads fail, never return other data. Where the layer may be mounted
//!   without dm-verity (`auto` on a kernel without it), nothing would ever check the data
//!   against the tree, so the full check is kept.
//! * The signature (ed25519 over the root digest, `erofs_registry::signature`) is checked
//!   against the configured keys, and only for a root that passed the tree check.
//!
//! Full images (`differ.enable_tar_index = false`, `differ.enable_dmverity = true`): the node
//! asks for the dm-verity tree of the full EROFS image instead ([`Wanted::FullImage`],
//! `artifacts build --full-image`), with its signature; there is no index to fetch. The image
//! is what the node's own mkfs options make of the tar, so the tree can only describe it when
//! the producer's `--mkfs-option`s are the node's `differ.mkfs_options`: the hash offset must
//! be the node's image size padded to 4 KiB, and the tree is always checked in full
//! ([`TreeCheck::Full`]) against the node's data. That costs little: the node hashes a full
//! image's blocks while it writes them (`integrity::ahead`), and the check starts from those
//! hashes. A root-only check would leave a same-size image of other mkfs options (another
//! `-T`, say) with a tree that fails every read; the full check computes it instead
//! (`bad_tree`). The registry's tree then saves the upper levels only; what it adds is the
//! producer's signature of the root, which `require_signed_root_hash` can demand.

pub mod hosts;
pub mod registry;

pub use crate::integrity::dmverity::{FetchedTree, TreeBytes, TreeCheck};
pub use crate::stats::ArtifactOutcome as Outcome;

/// Label (and descriptor annotation) with the image reference (containerd's
/// `snapshotters.TargetRefLabel`).
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Label with the digest of the image manifest the layer belongs to.
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// Label with the layer's (compressed) digest.
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";

/// The image a layer is applied for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageId {
    /// The reference as containerd passed it (`host/repo:tag`, `host/repo@sha256:...`).
    pub reference: String,
    /// The (platform) manifest digest.
    pub manifest_digest: String,
    /// Where it was found: "descriptor" (Apply's annotations) or "labels" (Prepare's).
    pub from: &'static str,
}

/// The image of a layer: from Apply's descriptor annotations, else from the snapshot's
/// labels. Both keys must come from the same place.
pub fn identify<'a>(
    annotations: impl Fn(&str) -> Option<&'a str>,
    labels: impl Fn(&str) -> Option<&'a str>,
) -> Option<ImageId> {
    let pick = |get: &dyn Fn(&str) -> Option<&'a str>, from| {
        let reference = get(LABEL_IMAGE_REF).filter(|s| !s.is_empty())?;
        let manifest_digest = get(LABEL_MANIFEST_DIGEST).filter(|s| !s.is_empty())?;
        Some(ImageId {
            reference: reference.to_string(),
            manifest_digest: manifest_digest.to_string(),
            from,
        })
    };
    pick(&annotations, "descriptor").or_else(|| pick(&labels, "labels"))
}

/// Which layer the node builds, so which artifacts it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// `[index][tar]`: the tar index, the tree of `[index][tar]` and its signature.
    TarIndex,
    /// The full EROFS image: its tree (4 KiB blocks) and that tree's signature.
    FullImage,
}

/// What a registry holds for one layer, fetched and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The tar index bytes ([`Wanted::TarIndex`] only).
    pub tar_index: Option<Vec<u8>>,
    /// The diffID the artifacts say they are for.
    pub diff_id: String,
    /// The dm-verity tree of the layer asked for, if stored.
    pub tree: Option<FetchedTree>,
    /// The signature bytes of that tree's root hash and their scheme, if stored.
    pub signature: Option<(String, Vec<u8>)>,
}

/// Why nothing usable was fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The registry holds no artifacts for the image or the layer.
    #[error("no artifacts: {0}")]
    Absent(String),
    /// The registry could not be reached or failed.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// TLS with the registry failed, or its TLS settings (`ca`, `client`) cannot be used.
    #[error("registry TLS failed: {0}")]
    Tls(String),
    /// The fetch took longer than `artifacts.fetch_timeout`.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// What the registry sent is malformed or larger than allowed.
    #[error("invalid artifacts: {0}")]
    Invalid(String),
}

/// Where artifacts come from (the registry client in the daemon; tests may serve their own).
pub trait ArtifactSource: Send + Sync + std::fmt::Debug {
    /// Fetch what the registry of `image` holds for layer `layer_digest` as the node builds
    /// it (`wanted`), within the configured time and size bounds.
    fn fetch(
        &self,
        image: &ImageId,
        layer_digest: &str,
        wanted: Wanted,
    ) -> Result<Fetched, FetchError>;
}

/// Check a fetched tar index against the layer the node built (`[index][tar]` in `layer`,
/// `tar_size` bytes of tar at its end): it must be that index byte for byte (see the module
/// docs for why nothing less is sound). Reads only the index's length of the layer.
pub fn check_index(
    fetched: &[u8],
    layer: &std::fs::File,
    tar_size: u64,
) -> std::io::Result<Result<(), String>> {
    use std::os::unix::fs::FileExt;
    let len = layer.metadata()?.len();
    let Some(index_len) = len.checked_sub(tar_size) else {
        return Ok(Err("the layer is shorter than its tar".into()));
    };
    if fetched.len() as u64 != index_len {
        return Ok(Err(format!(
            "tar index of {} bytes, the tar's index has {index_len}",
            fetched.len()
        )));
    }
    let mut buf = vec![0u8; (1usize << 20).min(fetched.len())];
    let mut off = 0usize;
    while off < fetched.len() {
        let n = buf.len().min(fetched.len() - off);
        layer.read_exact_at(&mut buf[..n], off as u64)?;
        if buf[..n] != fetched[off..off + n] {
            return Ok(Err(format!(
                "tar index differs from the tar's index (in bytes {off}..{})",
                off + n
            )));
        }
        off += n;
    }
    Ok(Ok(()))
}

/// Read `artifacts.trusted_keys` (public key files as `erofs-snapshotter artifacts keygen`
/// writes them); a key that cannot be read stops the start-up.
pub fn load_keys(
    paths: &[std::path::PathBuf],
) -> crate::error::Result<Vec<erofs_registry::signature::PublicKey>> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| {
                crate::error::Error::io(
                    format!("artifacts.trusted_keys: reading {}", p.display()),
                    e,
                )
            })?;
            erofs_registry::signature::PublicKey::from_text(&text).map_err(|e| {
                crate::error::Error::invalid_argument(format!(
                    "artifacts.trusted_keys: {}: {e}",
                    p.display()
                ))
            })
        })
        .collect()
}

/// The outcome of a failed fetch.
pub fn outcome_of(e: &FetchError) -> Outcome {
    match e {
        FetchError::Absent(_) => Outcome::Absent,
        FetchError::Unreachable(_) => Outcome::Unreachable,
        FetchError::Tls(_) => Outcome::Tls,
        FetchError::Timeout(_) => Outcome::Timeout,
        FetchError::Invalid(_) => Outcome::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_image_comes_from_one_place() {
        let ann = HashMap::from([(LABEL_IMAGE_REF, "r.example/a:1")]);
        let labels = HashMap::from([
            (LABEL_IMAGE_REF, "r.example/b:1"),
            (LABEL_MANIFEST_DIGEST, "sha256:ab"),
        ]);
        // The descriptor lacks the manifest digest: the labels are used as a whole.
        let id = identify(|k| ann.get(k).copied(), |k| labels.get(k).copied()).unwrap();
        assert_eq!(
            (id.reference.as_str(), id.manifest_digest.as_str(), id.from),
            ("r.example/b:1", "sha256:ab", "labels")
        );
        assert!(identify(|_| None, |k| ann.get(k).copied()).is_none());
    }

    #[test]
    fn an_index_must_be_the_tars_own() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("layer");
        let index = vec![7u8; 3000];
        let tar = vec![1u8; 5120];
        std::fs::write(&p, [&index[..], &tar[..]].concat()).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(check_index(&index, &f, 5120).unwrap(), Ok(()));
        let mut bad = index.clone();
        bad[2999] ^= 1;
        assert!(
            check_index(&bad, &f, 5120)
                .unwrap()
                .unwrap_err()
                .contains("differs")
        );
        assert!(
            check_index(&index[1..], &f, 5120)
                .unwrap()
                .unwrap_err()
                .contains("bytes")
        );
        assert!(check_index(&index, &f, 1 << 20).unwrap().is_err());
        assert!(check_index(&[], &f, 8120).unwrap().is_ok());
    }
}
