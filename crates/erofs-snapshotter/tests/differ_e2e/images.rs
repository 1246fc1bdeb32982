//! Images the harness's `ImageSpec` cannot describe: Docker schema 2 manifests, native EROFS
//! layers, deliberately wrong diffIDs and hostile blobs. Written as an OCI image layout (and
//! its tar, for `ctr images import`) in the shape of [`OciArchive`], so the harness can import
//! or push them.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use erofs_image::tar::{Entry, EntryKind, TarWriter};
use serde_json::{Value, json};
use testsuite::oci::{Blob, Compression, LayerBlob, OciArchive, sha256_digest};

/// Docker schema 2 media types.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker plain layer.
pub const DOCKER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Native EROFS layer.
pub const EROFS: &str = "application/vnd.erofs.layer.v1";
/// Native EROFS layer, zstd.
pub const EROFS_ZSTD: &str = "application/vnd.erofs.layer.v1+zstd";

/// One layer: its blob as stored, media type, and the diffID the config lists.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The blob.
    pub blob: Vec<u8>,
    /// Media type.
    pub media_type: String,
    /// `rootfs.diff_ids` entry.
    pub diff_id: String,
}

impl Layer {
    /// An OCI tar layer.
    pub fn oci(tar: &[u8], c: Compression) -> Result<Layer> {
        Ok(Layer {
            blob: c.compress(tar)?,
            media_type: testsuite::oci::media_type(c).into(),
            diff_id: sha256_digest(tar),
        })
    }

    /// A layer with any media type and compression.
    pub fn with_type(tar: &[u8], c: Compression, media_type: &str) -> Result<Layer> {
        Ok(Layer {
            blob: c.compress(tar)?,
            media_type: media_type.into(),
            diff_id: sha256_digest(tar),
        })
    }

    /// A native EROFS layer made from `tar` with our library (OCI whiteouts become overlay
    /// whiteouts, as containerd's converter does); `zstd` compresses the blob. The diffID is
    /// the sha256 of the uncompressed EROFS image.
    pub fn erofs(tar: &[u8], zstd: bool) -> Result<Layer> {
        let img = erofs_image_of(tar)?;
        let diff_id = sha256_digest(&img);
        Ok(if zstd {
            Layer {
                blob: zstd::encode_all(&img[..], 3)?,
                media_type: EROFS_ZSTD.into(),
                diff_id,
            }
        } else {
            Layer {
                blob: img,
                media_type: EROFS.into(),
                diff_id,
            }
        })
    }

    /// A raw blob.
    pub fn raw(blob: Vec<u8>, media_type: &str, diff_id: &str) -> Layer {
        Layer {
            blob,
            media_type: media_type.into(),
            diff_id: diff_id.into(),
        }
    }

    /// This layer with another diffID in the config.
    pub fn with_diff_id(mut self, d: &str) -> Layer {
        self.diff_id = d.into();
        self
    }
}

/// An EROFS image of a layer tar, as containerd's converter makes them (4 KiB blocks, no
/// inline data, OCI whiteouts translated).
pub fn erofs_image_of(tar: &[u8]) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    let opts = erofs_image::BuildOptions {
        block_size: 4096,
        inline_data: false,
        oci_whiteouts: true,
        uuid: *uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, tar).as_bytes(),
        ..Default::default()
    };
    erofs_image::tar_to_image(tar, &mut out, &opts)?;
    Ok(out.into_inner())
}

fn write_blob(layout: &Path, data: &[u8], media_type: &str) -> Result<Blob> {
    let digest = sha256_digest(data);
    let hex = digest.trim_start_matches("sha256:");
    fs::write(layout.join("blobs/sha256").join(hex), data)?;
    Ok(Blob {
        digest,
        size: data.len() as u64,
        media_type: media_type.into(),
    })
}

/// Write an image named `docker.io/testsuite/<name>:latest` with `layers` (bottom first)
/// under `dir`: OCI manifest and config, or Docker schema 2 ones with `docker`.
pub fn archive(dir: &Path, name: &str, layers: &[Layer], docker: bool) -> Result<OciArchive> {
    let repo = format!("docker.io/testsuite/{name}");
    let tag = "latest".to_string();
    let full = format!("{repo}:{tag}");
    let layout = dir.join(format!("{name}.oci"));
    let tar_path = dir.join(format!("{name}.tar"));
    if layout.exists() {
        fs::remove_dir_all(&layout)?;
    }
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut blobs = Vec::new();
    for l in layers {
        blobs.push(LayerBlob {
            blob: write_blob(&layout, &l.blob, &l.media_type)?,
            diff_id: l.diff_id.clone(),
            compression: Compression::None,
        });
    }
    let config = json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let (manifest_type, config_type) = if docker {
        (DOCKER_MANIFEST, DOCKER_CONFIG)
    } else {
        (
            testsuite::oci::MEDIA_TYPE_MANIFEST,
            testsuite::oci::MEDIA_TYPE_CONFIG,
        )
    };
    let config = write_blob(&layout, &serde_json::to_vec(&config)?, config_type)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": blobs.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
    });
    let manifest = write_blob(&layout, &serde_json::to_vec(&manifest)?, manifest_type)?;
    let mut desc = manifest.descriptor();
    desc["platform"] = json!({"architecture": "amd64", "os": "linux"});
    desc["annotations"] = json!({
        testsuite::oci::ANNOTATION_REF_NAME: full,
        testsuite::oci::ANNOTATION_CONTAINERD_NAME: full,
    });
    let index: Value = json!({
        "schemaVersion": 2,
        "mediaType": testsuite::oci::MEDIA_TYPE_INDEX,
        "manifests": [desc],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    tar_layout(&layout, &tar_path)?;
    Ok(OciArchive {
        path: tar_path,
        layout_dir: layout,
        name: full,
        repo,
        tag,
        manifest,
        config,
        layers: blobs,
    })
}

fn tar_layout(layout: &Path, out: &Path) -> Result<()> {
    let f = std::io::BufWriter::new(fs::File::create(out)?);
    let mut w = TarWriter::new(f);
    let mut file = |rel: &str| -> Result<()> {
        let mut src = fs::File::open(layout.join(rel)).with_context(|| rel.to_string())?;
        let mut e = Entry::new(rel.as_bytes().to_vec(), EntryKind::Regular);
        e.size = src.metadata()?.len();
        w.append(&e, &mut src)?;
        Ok(())
    };
    file("oci-layout")?;
    file("index.json")?;
    let mut names: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for n in names {
        file(&format!("blobs/sha256/{n}"))?;
    }
    w.finish()?.flush()?;
    Ok(())
}

/// A layer tar with one raw entry path (no normalisation), e.g. `../x`.
pub fn tar_with_raw_path(path: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut w = TarWriter::new(Vec::new());
    let mut e = Entry::new(path.as_bytes().to_vec(), EntryKind::Regular);
    e.mode = 0o644;
    w.append_bytes(&e, data)?;
    Ok(w.finish()?)
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
