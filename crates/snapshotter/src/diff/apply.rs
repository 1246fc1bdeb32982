//! Apply: an OCI layer blob straight into the active snapshot's `layer.erofs`, in one
//! streaming pass, without extracting a file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use erofs_image::compression::{BombGuard, Decompressed};
use sha2::{Digest, Sha256};

use super::content::{ContentSource, Descriptor};
use super::mkfs::MkfsOptions;
use super::pipeline::Pipeline;
use crate::error::{Error, ErrorKind, Result};
use crate::layout::{LAYER, LAYER_TMP, MARKER};
use crate::mount::Mount;
use crate::snapshot::{Snapshotter, sync_dir};
use crate::store::Kind;

/// The media type of an uncompressed OCI layer (what Apply returns for tar layers).
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Native EROFS layers.
pub const MEDIA_TYPE_EROFS: &str = "application/vnd.erofs.layer.v1";

#[derive(Debug, Clone, PartialEq, Eq)]
enum LayerKind {
    Tar,
    /// A ready EROFS image, possibly zstd-compressed.
    Native {
        zstd: bool,
    },
}

fn classify(media_type: &str) -> Result<LayerKind> {
    if let Some(rest) = media_type.strip_prefix(MEDIA_TYPE_EROFS) {
        return match rest {
            "" => Ok(LayerKind::Native { zstd: false }),
            "+zstd" => Ok(LayerKind::Native { zstd: true }),
            other => Err(Error::invalid_argument(format!(
                "unsupported erofs layer suffix {other:?}"
            ))),
        };
    }
    const TARS: [&str; 4] = [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ];
    for t in TARS {
        if let Some(rest) = media_type.strip_prefix(t)
            && matches!(rest, "" | "+gzip" | "+zstd" | ".gzip" | ".zstd")
        {
            return Ok(LayerKind::Tar);
        }
    }
    // Encrypted layers and unknown types: let containerd try the next differ, which may have
    // the stream processors they need.
    Err(Error::unimplemented(format!(
        "media type {media_type:?} is not handled by the EROFS differ"
    )))
}

/// Where Apply writes a layer: the temporary file, its path, and whether the data may skip
/// the page cache.
struct LayerOut<'a> {
    file: &'a File,
    path: &'a Path,
    direct: bool,
}

impl Snapshotter {
    /// Which active snapshot of ours `mounts` (as returned by Prepare) belong to, or
    /// Unimplemented so containerd falls through to the next differ.
    fn apply_target(&self, mounts: &[Mount]) -> Result<(u64, String)> {
        let not_ours = |why: &str| {
            Error::unimplemented(format!(
                "mounts are not an erofs-snapshotter active snapshot: {why}"
            ))
        };
        let m = mounts.last().ok_or_else(|| not_ours("no mounts"))?;
        let kind = m.kind.rsplit('/').next().unwrap_or_default();
        let path = if mounts[0].kind.starts_with("mkfs/") {
            mounts[0].source.clone()
        } else {
            match kind {
                "bind" | "erofs" => m.source.clone(),
                "overlay" => m
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix("upperdir="))
                    .map(str::to_string)
                    .ok_or_else(|| not_ours("overlay without upperdir"))?,
                other => return Err(not_ours(&format!("mount type {other:?}"))),
            }
        };
        let id = self
            .layout
            .id_of(Path::new(&path))
            .ok_or_else(|| not_ours("not under the snapshotter root"))?;
        if !self.layout.dir(id).join(MARKER).exists() {
            return Err(not_ours("no .erofslayer marker"));
        }
        let key = self
            .store
            .read(|tx| tx.id_map())?
            .remove(&id)
            .ok_or_else(|| not_ours("snapshot no longer exists"))?;
        let rec = self.store.read(|tx| tx.require(&key))?;
        if rec.kind != Kind::Active {
            return Err(not_ours("snapshot is not active"));
        }
        Ok((id, key))
    }

    /// Apply layer `desc` onto the active snapshot `mounts` describe: write `layer.erofs`
    /// durably and return the uncompressed layer's descriptor (its diffID for tar layers).
    pub fn apply(
        &self,
        desc: &Descriptor,
        mounts: &[Mount],
        content: &dyn ContentSource,
        namespace: &str,
    ) -> Result<Descriptor> {
        let kind = classify(&desc.media_type)?;
        super::content::parse_digest(&desc.digest)?;
        let (id, key) = self.apply_target(mounts)?;
        let _g = self.locks.lock(&[&key]);
        let dir = self.layout.dir(id);
        let tmp = dir.join(LAYER_TMP);
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let tar_index = kind == LayerKind::Tar && self.cfg.differ.enable_tar_index;
        // Written back to disk as it is produced, so the fsync below only waits for the tail,
        // and hashed for its integrity trees as it is produced, so they cost little more.
        let trees = crate::integrity::ahead_trees(self, tar_index);
        let (result, ahead) = crate::writeback::during(&out, || {
            crate::integrity::ahead::during(&out, trees, || {
                let target = LayerOut {
                    file: &out,
                    path: &tmp,
                    // Data that is hashed while it is written must stay in the page cache.
                    direct: trees == crate::integrity::ahead::Trees::default(),
                };
                self.write_layer(&kind, desc, &target, content, namespace)
            })
        });
        let sidecar = dir.join(crate::layout::DMVERITY_SIDECAR);
        let sidecar_tmp = crate::integrity::dmverity::sidecar_tmp(&tmp);
        let result = result.and_then(|d| {
            // The layer is written back to disk while the integrity hashes are computed (the
            // Merkle trees read it from the page cache), so they cost little more than the
            // fsync that has to happen anyway. That fsync's error must not be lost: a later
            // fsync of the same file may not report it again.
            let digest = std::thread::scope(|sc| {
                let early = sc.spawn(|| out.sync_data());
                let r = crate::integrity::after_apply(self, &tmp, tar_index, &ahead);
                let synced = early
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked")));
                synced.map_err(|e| Error::io("fsync of the layer", e))?;
                r
            })?;
            crate::failpoint::hit("apply:before-rename");
            out.sync_all()
                .map_err(|e| Error::io("fsync of the layer", e))?;
            // The sidecar goes in place before the layer it describes; a stale one from an
            // earlier apply goes away.
            if sidecar_tmp.exists() {
                fs::rename(&sidecar_tmp, &sidecar)
                    .map_err(|e| Error::io("renaming the dm-verity sidecar", e))?;
            } else if sidecar.exists() {
                fs::remove_file(&sidecar)
                    .map_err(|e| Error::io("removing a stale dm-verity sidecar", e))?;
            }
            fs::rename(&tmp, dir.join(LAYER)).map_err(|e| Error::io("renaming the layer", e))?;
            sync_dir(&dir)?;
            let mut digests = self
                .applied_digests
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match digest {
                Some(dg) => digests.insert(id, dg),
                None => digests.remove(&id),
            };
            Ok(d)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&sidecar_tmp);
        }
        let applied = result
            .map_err(|e| e.context(format!("applying {} to snapshot {key:?}", desc.digest)))?;
        tracing::info!(snapshot = %key, layer = %desc.digest, diff_id = %applied.digest, bytes = applied.size, "applied layer");
        Ok(applied)
    }

    fn write_layer(
        &self,
        kind: &LayerKind,
        desc: &Descriptor,
        target: &LayerOut<'_>,
        content: &dyn ContentSource,
        namespace: &str,
    ) -> Result<Descriptor> {
        let (out, tmp) = (target.file, target.path);
        let blob = content.open(desc, namespace)?;
        match kind {
            LayerKind::Tar => {
                let opts = MkfsOptions::parse(&self.cfg.differ.mkfs_options)
                    .map_err(Error::invalid_argument)?
                    .build_options(&desc.digest);
                if let Some(f) = blob.file.as_ref().filter(|f| is_plain(f)) {
                    // An uncompressed layer in the content store: its digest is its diffID
                    // (containerd verified it when it was written), and its data can move
                    // file to file in the kernel.
                    let size = f
                        .metadata()
                        .map_err(|e| Error::io("stat of the layer", e))?
                        .len();
                    let out = erofs_output::FileOutput::new(out);
                    if self.cfg.differ.enable_tar_index {
                        erofs_image::tar_file_to_index_file(f, out, &opts)?;
                    } else {
                        erofs_image::tar_file_to_image(f, out, &opts)?;
                    }
                    return Ok(Descriptor {
                        media_type: MEDIA_TYPE_TAR.into(),
                        digest: desc.digest.clone(),
                        size: size as i64,
                        annotations: Default::default(),
                    });
                }
                let dec = Decompressed::new(blob.reader, BombGuard::default())
                    .map_err(|e| Error::io("reading the layer", e))?;
                let mut pipe = Pipeline::start(Box::new(dec));
                if self.cfg.differ.enable_tar_index {
                    // The tar skips the page cache: the insert in front drops its pages anyway.
                    erofs_image::tar_to_index_file(
                        &mut pipe,
                        erofs_output::DirectFile::new(out),
                        &opts,
                    )?;
                } else {
                    if target.direct {
                        // The data skips the page cache (see erofs_output::DirectFile).
                        erofs_image::tar_to_image(
                            &mut pipe,
                            erofs_output::DirectFile::new(out),
                            &opts,
                        )?;
                    } else {
                        erofs_image::tar_to_image(&mut pipe, out, &opts)?;
                    }
                }
                let sum = pipe
                    .finish()
                    .map_err(|e| Error::invalid_argument(format!("reading the layer: {e}")))?;
                Ok(Descriptor {
                    media_type: MEDIA_TYPE_TAR.into(),
                    digest: sum.digest,
                    size: sum.size as i64,
                    annotations: Default::default(),
                })
            }
            LayerKind::Native { zstd } => {
                let (digest, size) = if *zstd {
                    let dec = zstd::stream::read::Decoder::new(blob.reader)
                        .map_err(|e| Error::io("zstd", e))?;
                    copy_hashing(dec, out)?
                } else if let Some(f) = &blob.file {
                    copy_file(f, out)?;
                    (desc.digest.clone(), desc.size as u64)
                } else {
                    copy_hashing(blob.reader, out)?
                };
                let report = erofs_image::check::check_image(
                    File::open(tmp).map_err(|e| Error::io("reopening the layer", e))?,
                    Vec::new(),
                );
                if !report.is_ok() {
                    let first: Vec<String> = report
                        .findings
                        .iter()
                        .take(5)
                        .map(|f| f.to_string())
                        .collect();
                    return Err(Error::invalid_argument(format!(
                        "native EROFS layer failed checks: {}",
                        first.join("; ")
                    )));
                }
                Ok(Descriptor {
                    media_type: MEDIA_TYPE_EROFS.into(),
                    digest,
                    size: size as i64,
                    annotations: Default::default(),
                })
            }
        }
    }
}

/// Whether a blob file holds an uncompressed stream.
fn is_plain(f: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 4];
    let n = f.read_at(&mut head, 0).unwrap_or(0);
    erofs_image::compression::Compression::detect(&head[..n])
        == erofs_image::compression::Compression::None
}

/// Copy with sha256 of what was copied.
fn copy_hashing(mut r: impl Read, mut out: &File) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::invalid_argument(format!("reading the layer: {e}"))),
        };
        h.update(&buf[..k]);
        out.write_all(&buf[..k])
            .map_err(|e| Error::io("writing the layer", e))?;
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// Copy a whole file with copy_file_range (reflinks where the filesystem can).
fn copy_file(src: &File, dst: &File) -> Result<()> {
    let len = src
        .metadata()
        .map_err(|e| Error::io("stat of the blob", e))?
        .len();
    let mut off_in = 0u64;
    let mut off_out = 0u64;
    while off_in < len {
        let want = (len - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => break,
            Ok(_) => {}
            Err(
                rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP,
            ) => {
                let mut r = src;
                io::copy(&mut r, &mut &*dst).map_err(|e| Error::io("copying the layer", e))?;
                return Ok(());
            }
            Err(e) => return Err(Error::io("copying the layer", e.into())),
        }
    }
    if off_in != len {
        return Err(Error::io(
            "copying the layer",
            io::Error::from(io::ErrorKind::UnexpectedEof),
        ));
    }
    Ok(())
}

/// Whether an error means "not for this differ".
pub fn is_unimplemented(e: &Error) -> bool {
    e.kind() == ErrorKind::Unimplemented
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        for t in [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.diff.tar",
        ] {
            assert_eq!(classify(t).unwrap(), LayerKind::Tar, "{t}");
        }
        assert_eq!(
            classify("application/vnd.erofs.layer.v1").unwrap(),
            LayerKind::Native { zstd: false }
        );
        assert_eq!(
            classify("application/vnd.erofs.layer.v1+zstd").unwrap(),
            LayerKind::Native { zstd: true }
        );
        assert_eq!(
            classify("application/vnd.erofs.layer.v1+lz4")
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            classify("application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
                .unwrap_err()
                .kind(),
            ErrorKind::Unimplemented
        );
        assert_eq!(
            classify("text/plain").unwrap_err().kind(),
            ErrorKind::Unimplemented
        );
    }
}
