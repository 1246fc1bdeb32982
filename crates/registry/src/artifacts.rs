//! The layer-artifact format: what `erofs-snapshotter artifacts push` stores and what a node
//! fetches instead of computing.
//!
//! One **referrer manifest** per image manifest: an OCI image manifest
//! ([`MEDIA_TYPE_OCI_MANIFEST`]) with `artifactType` [`ARTIFACT_TYPE`], the OCI empty config
//! ([`empty_config`]), `subject` = the image manifest's descriptor, and as `layers`, for each
//! image layer in image order, its blobs:
//!
//! * the **tar index** ([`MEDIA_TYPE_TAR_INDEX`]): the EROFS index bytes that precede the tar in
//!   the single-file layer `[index][tar]` (512-byte blocks, padded to 4 KiB, its device slot
//!   pointing just past itself); annotated with the tar's size ([`ANN_TAR_SIZE`]);
//! * the **dm-verity tree** ([`MEDIA_TYPE_DMVERITY_TREE`]): the bytes that follow `[index][tar]`
//!   in the layer file once it is zero-padded to [`ANN_BLOCK_SIZE`] (that padded length is
//!   [`ANN_HASH_OFFSET`]): a veritysetup superblock in the first block, then the hash tree, top
//!   level first; hash type 1, SHA-256, salt [`ANN_SALT`], data and hash blocks of the same
//!   size; its root digest in [`ANN_ROOT_DIGEST`] (lower-case hex, as veritysetup prints it);
//! * optionally a **root-hash signature** ([`MEDIA_TYPE_SIGNATURE_PREFIX`]`+<scheme>`, scheme
//!   `ed25519`: the 64-byte signature of the ASCII root digest, see [`crate::signature`]).
//!
//! Every blob carries the layer's compressed digest as in the image manifest
//! ([`ANN_LAYER_DIGEST`]) and its diffID ([`ANN_DIFF_ID`]), so blobs are picked by layer, never
//! by position. The layer file a node assembles is `index ‖ tar ‖ zeros to hash_offset ‖ tree`,
//! byte for byte what the differ writes with `enable_tar_index` and dm-verity on.
//!
//! Referrers are found by the image manifest's digest: the Referrers API
//! (`GET /v2/<name>/referrers/<digest>`), or on registries without it the referrers tag
//! `sha256-<hex>` holding an OCI index; entries are filtered by [`ARTIFACT_TYPE`]. A registry's
//! answer is untrusted: [`ArtifactSet::from_manifest`] checks its shape, and a consumer still
//! validates each blob against the layer before using it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `artifactType` of our referrer manifests.
pub const ARTIFACT_TYPE: &str = "application/vnd.erofs-snapshotter.layer-artifacts.v1";
/// The tar index of a layer (EROFS, 512-byte blocks).
pub const MEDIA_TYPE_TAR_INDEX: &str = "application/vnd.erofs-snapshotter.tar-index.v1";
/// The dm-verity superblock and hash tree of the `[index][tar]` layer.
pub const MEDIA_TYPE_DMVERITY_TREE: &str = "application/vnd.erofs-snapshotter.dmverity-tree.v1";
/// The dm-verity tree of the full EROFS image the differ builds for the layer without tar
/// index (4 KiB blocks; optional, `artifacts build --full-image`).
pub const MEDIA_TYPE_IMAGE_DMVERITY_TREE: &str =
    "application/vnd.erofs-snapshotter.image-dmverity-tree.v1";
/// A signature of a layer's root digest: this prefix, `+`, and the scheme.
pub const MEDIA_TYPE_SIGNATURE_PREFIX: &str =
    "application/vnd.erofs-snapshotter.roothash-signature.v1";
/// The signature scheme this crate writes and verifies ([`crate::signature`]).
pub const SCHEME_ED25519: &str = "ed25519";

/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest (accepted as a subject and as `build` input).
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// The OCI empty descriptor's media type (config of artifact manifests).
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The OCI empty blob: `{}`.
pub const EMPTY_BLOB: &[u8] = b"{}";
/// Digest of [`EMPTY_BLOB`].
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// On every blob: the layer's digest as in the image manifest (compressed).
pub const ANN_LAYER_DIGEST: &str = "io.erofs-snapshotter.layer.digest";
/// On every blob: the layer's diffID (digest of the uncompressed tar), draft EROFS spec name.
pub const ANN_DIFF_ID: &str = "org.erofs.uncompressed-digest";
/// On the tar index: size of the tar in bytes.
pub const ANN_TAR_SIZE: &str = "io.erofs-snapshotter.tar.size";
/// On the tar index: the mkfs options it was built with (the differ's `mkfs_options`), if any.
pub const ANN_MKFS_OPTIONS: &str = "io.erofs-snapshotter.mkfs-options";
/// On the tree (and signature): root digest, lower-case hex (draft EROFS spec name).
pub const ANN_ROOT_DIGEST: &str = "org.erofs.dmverity.root_digest";
/// On the tree: data and hash block size in bytes (draft EROFS spec name).
pub const ANN_BLOCK_SIZE: &str = "org.erofs.dmverity.block_size";
/// On the tree: byte offset of the tree blob in the layer file = `[index][tar]` padded to the
/// block size (draft EROFS spec name).
pub const ANN_HASH_OFFSET: &str = "org.erofs.dmverity.hash_offset";
/// On the tree: the salt, lower-case hex.
pub const ANN_SALT: &str = "org.erofs.dmverity.salt";
/// On the tree: the hash algorithm (`sha256`).
pub const ANN_ALGORITHM: &str = "org.erofs.dmverity.algorithm";
/// On the signature: the signer's public key, lower-case hex (informative only: a verifier
/// uses the keys it is configured with).
pub const ANN_PUBLIC_KEY: &str = "io.erofs-snapshotter.signature.public-key";
/// On the manifest: when it was built (RFC 3339).
pub const ANN_CREATED: &str = "org.opencontainers.image.created";

/// The only tree algorithm written and accepted.
pub const ALGORITHM_SHA256: &str = "sha256";
/// Salt of layer trees: 32 zero bytes, as containerd's differ and ours use, so that root
/// hashes are reproducible across nodes.
pub const DMVERITY_SALT: [u8; 32] = [0; 32];

/// Largest manifest or index this crate parses (the distribution spec's suggested 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// An OCI content descriptor (the fields we use; others are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Artifact type (in referrers indexes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor of `data` (sha256).
    pub fn of(media_type: &str, data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: sha256_digest(data),
            size: data.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    fn annotation(&self, key: &str) -> Result<&str> {
        self.annotations
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| {
                Error::Format(format!(
                    "blob {} ({}) lacks the annotation {key}",
                    self.digest, self.media_type
                ))
            })
    }
}

/// An OCI image manifest (also reads Docker schema 2 manifests, which share the shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Media type, when the manifest says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type (artifact manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// Layers (or artifact blobs).
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// The manifest this one refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Parse a manifest from a registry or a layout (bounded, typed errors).
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        parse_json(bytes, "image manifest")
    }

    /// The JSON bytes (pushed as is; their digest is the manifest's).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serializes")
    }
}

/// An OCI image index (image indexes, and referrers lists).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// Media type, when the index says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Index {
    /// An empty OCI index (a new referrers list).
    pub fn empty() -> Index {
        Index {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.into()),
            ..Index::default()
        }
    }

    /// Parse an index (bounded, typed errors).
    pub fn parse(bytes: &[u8]) -> Result<Index> {
        parse_json(bytes, "image index")
    }

    /// The JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("an index serializes")
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::Format(format!(
            "{what} of {} bytes is larger than {MAX_MANIFEST_BYTES}",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| Error::Format(format!("{what}: {e}")))
}

/// The OCI empty descriptor (config of our referrer manifest).
pub fn empty_config() -> Descriptor {
    Descriptor {
        media_type: MEDIA_TYPE_EMPTY.into(),
        digest: EMPTY_DIGEST.into(),
        size: EMPTY_BLOB.len() as u64,
        artifact_type: None,
        annotations: BTreeMap::new(),
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Check that `d` is `sha256:` and 64 lower-case hex digits (the only algorithm we accept;
/// it also makes the digest safe in a URL path or a file name).
pub fn check_digest(d: &str) -> Result<()> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(())
        }
        _ => Err(Error::Format(format!("{d:?} is not a sha256 digest"))),
    }
}

/// The referrers tag of a manifest digest: `sha256:<hex>` → `sha256-<hex>`.
pub fn referrers_tag(digest: &str) -> Result<String> {
    check_digest(digest)?;
    Ok(digest.replacen(':', "-", 1))
}

/// A layer's tar index blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarIndexBlob {
    /// Its descriptor (digest and size of the index bytes).
    pub descriptor: Descriptor,
    /// Size of the tar it indexes.
    pub tar_size: u64,
    /// The mkfs options it was built with, if any.
    pub mkfs_options: Option<String>,
}

/// A layer's dm-verity tree blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeBlob {
    /// Its descriptor.
    pub descriptor: Descriptor,
    /// Root digest, lower-case hex.
    pub root_digest: String,
    /// Data and hash block size.
    pub block_size: u32,
    /// Offset of the tree in the layer file (`[index][tar]` padded to `block_size`).
    pub hash_offset: u64,
}

/// A layer's root-hash signature blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureBlob {
    /// Its descriptor.
    pub descriptor: Descriptor,
    /// The scheme (the media type's suffix), e.g. [`SCHEME_ED25519`].
    pub scheme: String,
    /// The signer's public key as annotated (informative).
    pub public_key: Option<String>,
}

/// Everything stored for one image layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerArtifacts {
    /// The layer's digest in the image manifest.
    pub layer_digest: String,
    /// Its diffID.
    pub diff_id: String,
    /// The tar index.
    pub tar_index: TarIndexBlob,
    /// The dm-verity tree of `[index][tar]`.
    pub dmverity: Option<TreeBlob>,
    /// The signature of the tree's root digest.
    pub signature: Option<SignatureBlob>,
    /// The dm-verity tree of the full image (no tar index) the differ builds for the layer.
    pub image_dmverity: Option<TreeBlob>,
    /// The signature of that tree's root digest.
    pub image_signature: Option<SignatureBlob>,
}

/// The artifacts of one image: what a referrer manifest says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactSet {
    /// The image manifest they belong to.
    pub subject: Descriptor,
    /// When they were built (RFC 3339), if said.
    pub created: Option<String>,
    /// Per layer, in image order.
    pub layers: Vec<LayerArtifacts>,
}

fn layer_annotations(l: &LayerArtifacts) -> BTreeMap<String, String> {
    BTreeMap::from([
        (ANN_LAYER_DIGEST.to_string(), l.layer_digest.clone()),
        (ANN_DIFF_ID.to_string(), l.diff_id.clone()),
    ])
}

impl ArtifactSet {
    /// The artifacts of layer `digest` (compressed, as in the image manifest).
    pub fn layer(&self, digest: &str) -> Option<&LayerArtifacts> {
        self.layers.iter().find(|l| l.layer_digest == digest)
    }

    /// The artifacts of the layer with diffID `diff_id`.
    pub fn by_diff_id(&self, diff_id: &str) -> Option<&LayerArtifacts> {
        self.layers.iter().find(|l| l.diff_id == diff_id)
    }

    /// The referrer manifest. The descriptors' media types, digests and sizes are taken from
    /// `self`; the annotations are (re)written from the typed fields.
    pub fn to_manifest(&self) -> Manifest {
        let mut layers = Vec::new();
        for l in &self.layers {
            let base = layer_annotations(l);
            let mut d = l.tar_index.descriptor.clone();
            d.media_type = MEDIA_TYPE_TAR_INDEX.into();
            d.annotations = base.clone();
            d.annotations
                .insert(ANN_TAR_SIZE.into(), l.tar_index.tar_size.to_string());
            if let Some(o) = &l.tar_index.mkfs_options {
                d.annotations.insert(ANN_MKFS_OPTIONS.into(), o.clone());
            }
            layers.push(d);
            let tree = |t: &TreeBlob, media_type: &str| {
                let mut d = t.descriptor.clone();
                d.media_type = media_type.into();
                d.annotations = base.clone();
                d.annotations
                    .insert(ANN_ROOT_DIGEST.into(), t.root_digest.clone());
                d.annotations
                    .insert(ANN_BLOCK_SIZE.into(), t.block_size.to_string());
                d.annotations
                    .insert(ANN_HASH_OFFSET.into(), t.hash_offset.to_string());
                d.annotations
                    .insert(ANN_SALT.into(), hex::encode(DMVERITY_SALT));
                d.annotations
                    .insert(ANN_ALGORITHM.into(), ALGORITHM_SHA256.into());
                d
            };
            let sig = |s: &SignatureBlob, t: Option<&TreeBlob>| {
                let mut d = s.descriptor.clone();
                d.media_type = format!("{MEDIA_TYPE_SIGNATURE_PREFIX}+{}", s.scheme);
                d.annotations = base.clone();
                if let Some(t) = t {
                    d.annotations
                        .insert(ANN_ROOT_DIGEST.into(), t.root_digest.clone());
                }
                if let Some(k) = &s.public_key {
                    d.annotations.insert(ANN_PUBLIC_KEY.into(), k.clone());
                }
                d
            };
            if let Some(t) = &l.dmverity {
                layers.push(tree(t, MEDIA_TYPE_DMVERITY_TREE));
            }
            if let Some(s) = &l.signature {
                layers.push(sig(s, l.dmverity.as_ref()));
            }
            if let Some(t) = &l.image_dmverity {
                layers.push(tree(t, MEDIA_TYPE_IMAGE_DMVERITY_TREE));
            }
            if let Some(s) = &l.image_signature {
                layers.push(sig(s, l.image_dmverity.as_ref()));
            }
        }
        let mut annotations = BTreeMap::new();
        if let Some(c) = &self.created {
            annotations.insert(ANN_CREATED.to_string(), c.clone());
        }
        let mut subject = self.subject.clone();
        subject.annotations.clear();
        subject.artifact_type = None;
        Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: empty_config(),
            layers,
            subject: Some(subject),
            annotations,
        }
    }

    /// Read a referrer manifest fetched from a registry, checking everything this format
    /// says: artifact type, empty config, a subject, sha256 digests, and for every blob the
    /// layer annotations and the typed fields of its kind; at most one blob of each kind per
    /// layer, a tree's offset a multiple of its block size past the index and tar, a
    /// signature only with a tree. Blobs of media types we do not know are skipped (newer
    /// producers may add kinds).
    pub fn from_manifest(m: &Manifest) -> Result<ArtifactSet> {
        let bad = |s: String| Error::Format(format!("referrer manifest: {s}"));
        if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(bad(format!(
                "artifactType {:?}, not {ARTIFACT_TYPE}",
                m.artifact_type
            )));
        }
        if m.config.media_type != MEDIA_TYPE_EMPTY {
            return Err(bad(format!(
                "config of type {}, not {MEDIA_TYPE_EMPTY}",
                m.config.media_type
            )));
        }
        let subject = m.subject.clone().ok_or_else(|| bad("no subject".into()))?;
        check_digest(&subject.digest)?;
        struct Partial {
            layer_digest: String,
            diff_id: String,
            tar_index: Option<TarIndexBlob>,
            dmverity: Option<TreeBlob>,
            image_dmverity: Option<TreeBlob>,
            /// Each with the root digest it is annotated with.
            signatures: Vec<(String, SignatureBlob)>,
        }
        let mut order: Vec<Partial> = Vec::new();
        for d in &m.layers {
            check_digest(&d.digest)?;
            let known = d.media_type == MEDIA_TYPE_TAR_INDEX
                || d.media_type == MEDIA_TYPE_DMVERITY_TREE
                || d.media_type == MEDIA_TYPE_IMAGE_DMVERITY_TREE
                || d.media_type
                    .starts_with(&format!("{MEDIA_TYPE_SIGNATURE_PREFIX}+"));
            if !known {
                tracing::debug!(media_type = %d.media_type, digest = %d.digest, "skipping a referrer blob of unknown type");
                continue;
            }
            let layer_digest = d.annotation(ANN_LAYER_DIGEST)?.to_string();
            let diff_id = d.annotation(ANN_DIFF_ID)?.to_string();
            check_digest(&layer_digest)?;
            check_digest(&diff_id)?;
            let i = match order.iter().position(|p| p.layer_digest == layer_digest) {
                Some(i) => i,
                None => {
                    order.push(Partial {
                        layer_digest: layer_digest.clone(),
                        diff_id: diff_id.clone(),
                        tar_index: None,
                        dmverity: None,
                        image_dmverity: None,
                        signatures: Vec::new(),
                    });
                    order.len() - 1
                }
            };
            let p = &mut order[i];
            if p.diff_id != diff_id {
                return Err(bad(format!(
                    "layer {layer_digest} has blobs with diffIDs {} and {diff_id}",
                    p.diff_id
                )));
            }
            let dup = || {
                bad(format!(
                    "layer {layer_digest} has two {} blobs",
                    d.media_type
                ))
            };
            if d.media_type == MEDIA_TYPE_TAR_INDEX {
                if p.tar_index.is_some() {
                    return Err(dup());
                }
                let tar_size = parse_num(d, ANN_TAR_SIZE)?;
                p.tar_index = Some(TarIndexBlob {
                    descriptor: d.clone(),
                    tar_size,
                    mkfs_options: d.annotations.get(ANN_MKFS_OPTIONS).cloned(),
                });
            } else if d.media_type == MEDIA_TYPE_DMVERITY_TREE {
                if p.dmverity.is_some() {
                    return Err(dup());
                }
                p.dmverity = Some(parse_tree(d)?);
            } else if d.media_type == MEDIA_TYPE_IMAGE_DMVERITY_TREE {
                if p.image_dmverity.is_some() {
                    return Err(dup());
                }
                p.image_dmverity = Some(parse_tree(d)?);
            } else {
                let scheme = d.media_type[MEDIA_TYPE_SIGNATURE_PREFIX.len() + 1..].to_string();
                let root = d.annotation(ANN_ROOT_DIGEST)?.to_string();
                p.signatures.push((
                    root,
                    SignatureBlob {
                        descriptor: d.clone(),
                        scheme,
                        public_key: d.annotations.get(ANN_PUBLIC_KEY).cloned(),
                    },
                ));
            }
        }
        let mut layers = Vec::with_capacity(order.len());
        for p in order {
            let tar_index = p
                .tar_index
                .ok_or_else(|| bad(format!("layer {} has no tar index blob", p.layer_digest)))?;
            if let Some(t) = &p.dmverity {
                let data = tar_index.descriptor.size.checked_add(tar_index.tar_size);
                if data.map(|n| n.next_multiple_of(t.block_size as u64)) != Some(t.hash_offset) {
                    return Err(bad(format!(
                        "layer {}: tree offset {} is not index ({}) + tar ({}) padded to {}",
                        p.layer_digest,
                        t.hash_offset,
                        tar_index.descriptor.size,
                        tar_index.tar_size,
                        t.block_size
                    )));
                }
            }
            // A signature belongs to the tree whose root it is annotated with.
            let (mut signature, mut image_signature) = (None, None);
            for (root, sig) in p.signatures {
                let slot = if p.dmverity.as_ref().is_some_and(|t| t.root_digest == root) {
                    &mut signature
                } else if p
                    .image_dmverity
                    .as_ref()
                    .is_some_and(|t| t.root_digest == root)
                {
                    &mut image_signature
                } else {
                    return Err(bad(format!(
                        "layer {}: a signature of root digest {root} signs neither of its trees",
                        p.layer_digest
                    )));
                };
                if slot.replace(sig).is_some() {
                    return Err(bad(format!(
                        "layer {}: two signatures of root digest {root}",
                        p.layer_digest
                    )));
                }
            }
            layers.push(LayerArtifacts {
                layer_digest: p.layer_digest,
                diff_id: p.diff_id,
                tar_index,
                dmverity: p.dmverity,
                signature,
                image_dmverity: p.image_dmverity,
                image_signature,
            });
        }
        Ok(ArtifactSet {
            subject,
            created: m.annotations.get(ANN_CREATED).cloned(),
            layers,
        })
    }

    /// [`from_manifest`](Self::from_manifest) on the bytes of a manifest.
    pub fn parse(bytes: &[u8]) -> Result<ArtifactSet> {
        Self::from_manifest(&Manifest::parse(bytes)?)
    }
}

/// The typed fields of a tree blob.
fn parse_tree(d: &Descriptor) -> Result<TreeBlob> {
    let bad = |s: String| Error::Format(format!("referrer manifest: {s}"));
    let root_digest = d.annotation(ANN_ROOT_DIGEST)?.to_string();
    if root_digest.len() != 64
        || !root_digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(bad(format!(
            "root digest {root_digest:?} is not 64 lower-case hex digits"
        )));
    }
    let block_size = u32::try_from(parse_num(d, ANN_BLOCK_SIZE)?)
        .ok()
        .filter(|b| (512..=65536).contains(b) && b.is_power_of_two())
        .ok_or_else(|| bad(format!("bad {ANN_BLOCK_SIZE} on {}", d.digest)))?;
    let hash_offset = parse_num(d, ANN_HASH_OFFSET)?;
    if hash_offset == 0 || !hash_offset.is_multiple_of(block_size as u64) {
        return Err(bad(format!(
            "{ANN_HASH_OFFSET} {hash_offset} is not a positive multiple of the block size {block_size}"
        )));
    }
    if let Some(a) = d.annotations.get(ANN_ALGORITHM)
        && a != ALGORITHM_SHA256
    {
        return Err(bad(format!("tree algorithm {a:?}, not sha256")));
    }
    if let Some(s) = d.annotations.get(ANN_SALT)
        && *s != hex::encode(DMVERITY_SALT)
    {
        return Err(bad(format!("tree salt {s:?} is not ours")));
    }
    Ok(TreeBlob {
        descriptor: d.clone(),
        root_digest,
        block_size,
        hash_offset,
    })
}

fn parse_num(d: &Descriptor, key: &str) -> Result<u64> {
    let v = d.annotation(key)?;
    // Plain decimal only: no sign, no leading '+', no whitespace.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::Format(format!(
            "annotation {key} of {} is {v:?}, not a number",
            d.digest
        )));
    }
    v.parse()
        .map_err(|_| Error::Format(format!("annotation {key} of {} is too large", d.digest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn sample() -> ArtifactSet {
        let layer = |n: u8, signed: bool| {
            let index = Descriptor::of(MEDIA_TYPE_TAR_INDEX, &vec![n; 8192]);
            let tree = Descriptor::of(MEDIA_TYPE_DMVERITY_TREE, &vec![n; 1024]);
            LayerArtifacts {
                layer_digest: digest(n),
                diff_id: digest(n + 100),
                tar_index: TarIndexBlob {
                    descriptor: index,
                    tar_size: 10240,
                    mkfs_options: None,
                },
                dmverity: Some(TreeBlob {
                    descriptor: tree,
                    root_digest: hex::encode([n + 1; 32]),
                    block_size: 512,
                    hash_offset: 8192 + 10240,
                }),
                signature: signed.then(|| SignatureBlob {
                    descriptor: Descriptor::of("x", &[n; 64]),
                    scheme: SCHEME_ED25519.into(),
                    public_key: Some(hex::encode([9; 32])),
                }),
                image_dmverity: None,
                image_signature: None,
            }
        };
        ArtifactSet {
            subject: Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, b"{\"schemaVersion\":2}"),
            created: Some("2026-12-03T10:00:00Z".into()),
            layers: vec![layer(1, true), layer(2, false)],
        }
    }

    /// What is written reads back the same, with the documented names on the wire.
    #[test]
    fn manifest_round_trips() {
        let s = sample();
        let m = s.to_manifest();
        let bytes = m.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["artifactType"], ARTIFACT_TYPE);
        assert_eq!(v["config"]["mediaType"], MEDIA_TYPE_EMPTY);
        assert_eq!(v["config"]["digest"], sha256_digest(EMPTY_BLOB));
        assert_eq!(v["layers"].as_array().unwrap().len(), 5);
        assert_eq!(
            v["layers"][2]["mediaType"],
            "application/vnd.erofs-snapshotter.roothash-signature.v1+ed25519"
        );
        assert_eq!(v["layers"][1]["annotations"][ANN_HASH_OFFSET], "18432");
        assert_eq!(v["layers"][0]["annotations"][ANN_LAYER_DIGEST], digest(1));
        assert_eq!(v["subject"]["digest"], s.subject.digest);
        let back = ArtifactSet::parse(&bytes).unwrap();
        assert_eq!(back.layers.len(), 2);
        assert_eq!(back.to_manifest(), m);
        assert_eq!(back.layer(&digest(2)).unwrap().diff_id, digest(102));
        assert!(back.by_diff_id(&digest(101)).unwrap().signature.is_some());
    }

    /// Every malformation is a typed error naming what is wrong.
    #[test]
    fn malformed_manifests_are_refused() {
        let good = serde_json::to_value(sample().to_manifest()).unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| v["artifactType"] = "x".into()), "artifactType"),
            (
                Box::new(|v| v["config"]["mediaType"] = "x".into()),
                "config",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("subject");
                }),
                "no subject",
            ),
            (
                Box::new(|v| v["layers"][0]["annotations"][ANN_TAR_SIZE] = "-1".into()),
                "not a number",
            ),
            (
                Box::new(|v| {
                    v["layers"][1]["annotations"][ANN_HASH_OFFSET] = "4096".into();
                }),
                "tree offset",
            ),
            (
                Box::new(|v| v["layers"][1]["annotations"][ANN_BLOCK_SIZE] = "1000".into()),
                "block_size",
            ),
            (
                Box::new(|v| v["layers"][1]["annotations"][ANN_ROOT_DIGEST] = "AB".into()),
                "root digest",
            ),
            (
                Box::new(|v| v["layers"][1]["annotations"][ANN_SALT] = "01".into()),
                "salt",
            ),
            (
                Box::new(|v| v["layers"][2]["annotations"][ANN_ROOT_DIGEST] = "00".into()),
                "signs neither",
            ),
            (
                Box::new(|v| v["layers"][3]["annotations"][ANN_DIFF_ID] = digest(7).into()),
                "diffIDs",
            ),
            (
                Box::new(|v| {
                    v["layers"][3]["annotations"]
                        .as_object_mut()
                        .unwrap()
                        .remove(ANN_LAYER_DIGEST);
                }),
                "lacks the annotation",
            ),
            (
                Box::new(|v| v["layers"][3]["digest"] = "md5:00".into()),
                "not a sha256",
            ),
            (
                Box::new(|v| {
                    let d = v["layers"][0].clone();
                    v["layers"].as_array_mut().unwrap().push(d);
                }),
                "two",
            ),
            (
                Box::new(|v| {
                    v["layers"].as_array_mut().unwrap().remove(3);
                }),
                "no tar index",
            ),
            (
                Box::new(|v| {
                    v["layers"].as_array_mut().unwrap().remove(1);
                }),
                "signs neither",
            ),
        ];
        for (edit, want) in cases {
            let mut v = good.clone();
            edit(&mut v);
            let e = ArtifactSet::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        // Unknown kinds are skipped, not fatal.
        let mut v = good.clone();
        v["layers"][4]["mediaType"] = "application/vnd.example.other".into();
        assert!(
            ArtifactSet::parse(&serde_json::to_vec(&v).unwrap())
                .unwrap()
                .layers[1]
                .dmverity
                .is_none()
        );
        assert!(ArtifactSet::parse(b"[]").is_err());
        assert!(ArtifactSet::parse(&vec![b' '; MAX_MANIFEST_BYTES + 1]).is_err());
    }

    /// Full-image trees and their signatures read back, each signature with its own tree.
    #[test]
    fn image_trees_round_trip() {
        let mut s = sample();
        let root = hex::encode([0x77; 32]);
        s.layers[1].image_dmverity = Some(TreeBlob {
            descriptor: Descriptor::of("x", &[5; 4096]),
            root_digest: root.clone(),
            block_size: 4096,
            hash_offset: 3 * 4096,
        });
        s.layers[1].image_signature = Some(SignatureBlob {
            descriptor: Descriptor::of("x", &[6; 64]),
            scheme: SCHEME_ED25519.into(),
            public_key: None,
        });
        let m = s.to_manifest();
        let back = ArtifactSet::parse(&m.to_bytes()).unwrap();
        assert_eq!(back.to_manifest(), m);
        let l = &back.layers[1];
        assert!(l.signature.is_none());
        assert_eq!(l.image_dmverity.as_ref().unwrap().root_digest, root);
        assert_eq!(
            l.image_signature.as_ref().unwrap().descriptor.digest,
            sha256_digest(&[6; 64])
        );
        assert_eq!(
            m.layers
                .iter()
                .filter(|d| d.media_type == MEDIA_TYPE_IMAGE_DMVERITY_TREE)
                .count(),
            1
        );
    }

    #[test]
    fn digests_and_tags() {
        assert_eq!(
            referrers_tag(&digest(0xab)).unwrap(),
            format!("sha256-{}", "ab".repeat(32))
        );
        for bad in ["sha256:AB", "sha512:00", "sha256:../../x", ""] {
            assert!(check_digest(bad).is_err(), "{bad}");
        }
        assert_eq!(sha256_digest(EMPTY_BLOB), EMPTY_DIGEST);
    }
}
