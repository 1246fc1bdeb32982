//! Layer artifacts built and pushed the way `erofs-snapshotter artifacts build|push` does,
//! from the libraries the differ uses, with ways to spoil them: shared by the node-side test
//! on the host (`artifacts_node`) and the guest test of the tree-only check (`kernel`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Result;
use erofs_registry::artifacts::{
    self as fmt, ArtifactSet, Descriptor, LayerArtifacts, SignatureBlob, TarIndexBlob, TreeBlob,
};
use erofs_registry::signature::SecretKey;
use testsuite::Registry;
use testsuite::oci::{self, Compression, OciArchive};

/// One layer's artifacts as built here.
#[derive(Debug, Clone)]
pub struct Built {
    pub layer_digest: String,
    pub diff_id: String,
    pub index: Vec<u8>,
    pub tree: Vec<u8>,
    pub root: String,
    pub hash_offset: u64,
    pub tar_size: u64,
    /// sha256 of the whole layer file the differ writes: `[index][tar][tree]`.
    pub file_sha: String,
    /// That file, as built here.
    pub path: PathBuf,
}

/// Build `layer`'s tar index and tree exactly as the differ does (default mkfs options).
pub fn build_layer(archive: &OciArchive, layer: &oci::LayerBlob, dir: &Path) -> Result<Built> {
    let blob = std::fs::read(archive.blob_path(&layer.blob.digest))?;
    let mut tar = Vec::new();
    match layer.compression {
        Compression::Gzip => {
            flate2::read::GzDecoder::new(&blob[..]).read_to_end(&mut tar)?;
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(&blob[..])?.read_to_end(&mut tar)?;
        }
        _ => tar = blob,
    }
    let path = dir.join(layer.blob.digest.replace(':', "-"));
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let opts = snapshotter::diff::MkfsOptions::parse(&[])?.build_options(&layer.blob.digest);
    erofs_image::tar_to_index_file(&tar[..], erofs_output::FileOutput::new(&out), &opts)?;
    drop(out);
    let data_len = std::fs::metadata(&path)?.len();
    let meta = snapshotter::integrity::dmverity::append_tree(&path, true, None)?;
    let all = std::fs::read(&path)?;
    let tar_size = tar.len() as u64;
    Ok(Built {
        layer_digest: layer.blob.digest.clone(),
        diff_id: layer.diff_id.clone(),
        index: all[..(data_len - tar_size) as usize].to_vec(),
        tree: all[data_len as usize..].to_vec(),
        root: meta.roothash,
        hash_offset: meta.hashoffset,
        tar_size,
        file_sha: oci::sha256_reader(&all[..])?,
        path,
    })
}

impl Built {
    /// The same layer's artifacts, but with the dm-verity tree (and root) of other data: the
    /// layer with the byte at `at` (in a file's contents, so the index is unchanged) flipped.
    /// The tree is consistent in itself, so only hashing the data shows it is not this
    /// layer's; signed, it passes a tree-only check.
    pub fn with_tree_of_other_data(&self, at: u64) -> Result<Built> {
        let data_len = self.index.len() as u64 + self.tar_size;
        anyhow::ensure!(
            at >= self.index.len() as u64 && at < data_len,
            "byte {at} is not in the tar"
        );
        let mut data = std::fs::read(&self.path)?;
        data.truncate(data_len as usize);
        data[at as usize] ^= 0xff;
        let path = self.path.with_extension("other");
        std::fs::write(&path, &data)?;
        let meta = snapshotter::integrity::dmverity::append_tree(&path, true, None)?;
        let all = std::fs::read(&path)?;
        Ok(Built {
            tree: all[data_len as usize..].to_vec(),
            root: meta.roothash,
            hash_offset: meta.hashoffset,
            // What a node that takes this tree writes: this layer's data, the other tree.
            file_sha: {
                data[at as usize] ^= 0xff;
                data.extend_from_slice(&all[data_len as usize..]);
                oci::sha256_reader(&data[..])?
            },
            path,
            ..self.clone()
        })
    }
}

/// What to push for a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Good,
    TamperIndex,
    TamperTree,
    /// Signed by a key the node does not trust.
    Untrusted,
    /// Tree but no signature.
    Unsigned,
    /// Signed by the trusted key, but the tree (and root) of other data: the byte in the
    /// middle of the tar flipped ([`Built::with_tree_of_other_data`]).
    OtherData,
}

/// Push the artifacts of `layers` (with `how`) as a referrer of `archive`'s manifest in
/// `repo`, through the referrers tag (the registry has no Referrers API).
pub fn push_artifacts(
    reg: &Registry,
    repo: &str,
    archive: &OciArchive,
    layers: &[Built],
    how: Push,
    key: &SecretKey,
    other: &SecretKey,
) -> Result<()> {
    let mut set = ArtifactSet {
        subject: Descriptor {
            media_type: archive.manifest.media_type.clone(),
            digest: archive.manifest.digest.clone(),
            size: archive.manifest.size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        created: None,
        layers: Vec::new(),
    };
    let mut blobs: Vec<Vec<u8>> = vec![fmt::EMPTY_BLOB.to_vec()];
    for b in layers {
        let respun;
        let b = if how == Push::OtherData {
            respun = b.with_tree_of_other_data(b.index.len() as u64 + b.tar_size / 2)?;
            &respun
        } else {
            b
        };
        let mut index = b.index.clone();
        let mut tree = b.tree.clone();
        match how {
            // A mode bit of some inode, or any byte: the index is not the tar's.
            Push::TamperIndex => {
                let i = index.len() / 2;
                index[i] ^= 0x10;
            }
            // A hash in the lowest level.
            Push::TamperTree => {
                let n = tree.len();
                tree[n - 100] ^= 1;
            }
            _ => {}
        }
        let sig = match how {
            Push::Unsigned => None,
            Push::Untrusted => Some(other.sign_root(&b.root).to_vec()),
            _ => Some(key.sign_root(&b.root).to_vec()),
        };
        let index_d = Descriptor::of(fmt::MEDIA_TYPE_TAR_INDEX, &index);
        let tree_d = Descriptor::of(fmt::MEDIA_TYPE_DMVERITY_TREE, &tree);
        blobs.push(index);
        blobs.push(tree);
        let signature = sig.map(|s| {
            let media = format!(
                "{}+{}",
                fmt::MEDIA_TYPE_SIGNATURE_PREFIX,
                fmt::SCHEME_ED25519
            );
            let d = Descriptor::of(&media, &s);
            blobs.push(s);
            SignatureBlob {
                descriptor: d,
                scheme: fmt::SCHEME_ED25519.into(),
                public_key: None,
            }
        });
        set.layers.push(LayerArtifacts {
            layer_digest: b.layer_digest.clone(),
            diff_id: b.diff_id.clone(),
            tar_index: TarIndexBlob {
                descriptor: index_d,
                tar_size: b.tar_size,
                mkfs_options: None,
            },
            dmverity: Some(TreeBlob {
                descriptor: tree_d,
                root_digest: b.root.clone(),
                block_size: 512,
                hash_offset: b.hash_offset,
            }),
            signature,
            image_dmverity: None,
            image_signature: None,
        });
    }
    for data in &blobs {
        reg.push_blob(repo, &fmt::sha256_digest(data), data)?;
    }
    let manifest = set.to_manifest().to_bytes();
    let digest = fmt::sha256_digest(&manifest);
    reg.put_manifest(repo, &digest, fmt::MEDIA_TYPE_OCI_MANIFEST, &manifest)?;
    let mut index = fmt::Index::empty();
    index.manifests.push(Descriptor {
        media_type: fmt::MEDIA_TYPE_OCI_MANIFEST.into(),
        digest,
        size: manifest.len() as u64,
        artifact_type: Some(fmt::ARTIFACT_TYPE.into()),
        annotations: BTreeMap::new(),
    });
    reg.put_manifest(
        repo,
        &fmt::referrers_tag(&archive.manifest.digest)?,
        fmt::MEDIA_TYPE_OCI_INDEX,
        &index.to_bytes(),
    )?;
    Ok(())
}
