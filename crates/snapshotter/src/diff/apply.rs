//! Apply: an OCI layer blob straight into the active snapshot's `layer.erofs`, in one
//! streaming pass, without extracting a file.

use std::fs::File;
use std::io::{self, Read, Write};

use erofs_image::compression::{BombGuard, Compression, Decompressed};
use sha2::{Digest, Sha256};

use super::content::{ContentSource, Descriptor};
use super::media_type::{LayerType, MEDIA_TYPE_EROFS, MEDIA_TYPE_TAR, layer_type};
use super::pipeline::Pipeline;
use crate::artifacts::Wanted;
use crate::cancel::Cancel;
use crate::error::{Error, ErrorKind, Result};
use crate::mkfs::MkfsOptions;
use crate::mount::Mount;
use crate::snapshot::Snapshotter;
use crate::snapshot::layers::LayerOut;

impl Snapshotter {
    /// Apply layer `desc` onto the active snapshot `mounts` describe: write `layer.erofs`
    /// durably and return the uncompressed layer's descriptor (its diffID for tar layers).
    ///
    /// It refuses to start below the free-space reserve, waits for a heavy-request slot, and
    /// stops, leaving nothing, once `cancel` trips or its writes take free space below the
    /// reserve (checked between chunks of input and between entries).
    pub fn apply(
        &self,
        desc: &Descriptor,
        mounts: &[Mount],
        content: &dyn ContentSource,
        namespace: &str,
        cancel: &Cancel,
    ) -> Result<Descriptor> {
        let kind = layer_type(&desc.media_type)?;
        super::content::parse_digest(&desc.digest)?;
        let what = format!("Apply of {}", desc.digest);
        self.require_space(&what)?;
        let work = self.guarded(cancel, what);
        let tar = matches!(kind, LayerType::Tar(_));
        let tar_index = tar && self.config().differ.enable_tar_index;
        // A full image can use a fetched tree only, so only where it gets one.
        let wanted = if tar_index {
            Some(Wanted::TarIndex)
        } else if tar && self.config().differ.enable_dmverity {
            Some(Wanted::FullImage)
        } else {
            None
        };
        let lookup = wanted.and_then(|w| Some((self.artifact_lookup(desc, mounts, w)?, w)));
        let (key, (applied, verdict), tree_use) = self
            .write_applied_layer(mounts, tar_index, &work, |out| {
                let Some((lookup, wanted)) = lookup else {
                    let applied = self.write_layer(&kind, desc, out, content, namespace, &work)?;
                    return Ok(((applied, None), None));
                };
                // The fetch runs while the layer streams in, so it adds no time unless it is
                // slower than the layer; it is bounded by artifacts.fetch_timeout.
                let pending = lookup.start(&desc.digest, self.config().artifact_fetch_timeout());
                let applied = self.write_layer(&kind, desc, out, content, namespace, &work)?;
                let fetched = pending.wait();
                let (verdict, plan) =
                    self.judge_artifacts(desc, &applied, out.file, wanted, fetched)?;
                Ok(((applied, Some(verdict)), plan))
            })
            .map_err(|e| self.stopped(&work, e))
            .map_err(|e| e.context(format!("applying {}", desc.digest)))?;
        if let Some(v) = verdict {
            self.count_artifacts(desc, v, tree_use);
        }
        tracing::info!(snapshot = %key, layer = %desc.digest, diff_id = %applied.digest, bytes = applied.size, "applied layer");
        Ok(applied)
    }

    fn write_layer(
        &self,
        kind: &LayerType,
        desc: &Descriptor,
        target: &LayerOut<'_>,
        content: &dyn ContentSource,
        namespace: &str,
        work: &Cancel,
    ) -> Result<Descriptor> {
        let (out, tmp) = (target.file, target.path);
        let blob = content.open(desc, namespace, work)?;
        match kind {
            LayerType::Tar(_) => {
                let mut opts = MkfsOptions::parse(&self.config().differ.mkfs_options)
                    .map_err(|e| Error::invalid_argument(format!("differ.mkfs_options: {e}")))?
                    .build_options(&desc.digest);
                let plain = blob.file.as_ref().filter(|f| is_plain(f));
                opts.max_image_size = Some(self.layer_size_cap(desc, plain.is_some()));
                opts.interrupt = work.interrupt();
                if let Some(f) = plain {
                    // An uncompressed layer in the content store: its digest is its diffID
                    // (containerd verified it when it was written), and its data can move
                    // file to file in the kernel.
                    let size = f
                        .metadata()
                        .map_err(|e| Error::io("stat of the layer", e))?
                        .len();
                    let out = erofs_output::FileOutput::new(out);
                    if self.config().differ.enable_tar_index {
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
                let dec = Decompressed::new(blob.reader, self.bomb_guard())
                    .map_err(|e| Error::io("reading the layer", e))?;
                let mut pipe = Pipeline::start(Box::new(dec));
                if self.config().differ.enable_tar_index {
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
                let sum = pipe.finish().map_err(|e| {
                    Error::io_as(ErrorKind::InvalidArgument, "reading the layer", e)
                })?;
                Ok(Descriptor {
                    media_type: MEDIA_TYPE_TAR.into(),
                    digest: sum.digest,
                    size: sum.size as i64,
                    annotations: Default::default(),
                })
            }
            LayerType::Erofs(compression) => {
                let (digest, size) = if *compression == Compression::Zstd {
                    // The same guard as tar layers: 33 KB of zstd could otherwise write a
                    // gigabyte (a 33 MB blob a terabyte) before the checker sees it.
                    let dec = Decompressed::new(blob.reader, self.bomb_guard())
                        .map_err(|e| Error::io("zstd", e))?;
                    if dec.compression() != Compression::Zstd {
                        return Err(Error::invalid_argument(
                            "layer of media type +zstd is not zstd-compressed",
                        ));
                    }
                    copy_hashing(dec, out)?
                } else if let Some(f) = &blob.file {
                    copy_file(f, out, work)?;
                    (desc.digest.clone(), desc.size as u64)
                } else {
                    copy_hashing(blob.reader, out)?
                };
                work.check()?;
                let report = erofs_image::check::check_image(
                    File::open(tmp).map_err(|e| Error::io("reopening the layer", e))?,
                    Vec::new(),
                );
                if !report.is_ok() {
                    return Err(Error::invalid_argument(format!(
                        "native EROFS layer failed checks: {}",
                        report.summary(5)
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

impl Snapshotter {
    /// What decompressing one layer may produce: the ratio guard, and no more than the
    /// largest layer allowed.
    fn bomb_guard(&self) -> BombGuard {
        BombGuard {
            max_output: Some(self.config().max_layer_bytes()),
            ..BombGuard::default()
        }
    }

    /// The largest image a tar layer may become: `differ.max_layer_size`, and at most what
    /// its blob can honestly expand to. The uncompressed tar is the blob itself (plain) or at
    /// most the bomb guard's ratio times it; an image needs at most 8 bytes per tar byte
    /// (a 1-byte file takes 1 KiB of tar and, block-aligned, 4 KiB of image) plus metadata.
    fn layer_size_cap(&self, desc: &Descriptor, plain: bool) -> u64 {
        let cap = self.config().max_layer_bytes();
        let Ok(blob @ 1..) = u64::try_from(desc.size) else {
            // No size in the request: only the configured cap applies.
            return cap;
        };
        let guard = BombGuard::default();
        let tar = if plain {
            blob
        } else {
            blob.saturating_mul(guard.max_ratio).max(guard.grace)
        };
        tar.saturating_mul(8).saturating_add(64 << 20).min(cap)
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
            Err(e) => {
                return Err(Error::io_as(
                    ErrorKind::InvalidArgument,
                    "reading the layer",
                    e,
                ));
            }
        };
        h.update(&buf[..k]);
        out.write_all(&buf[..k])
            .map_err(|e| Error::io("writing the layer", e))?;
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// Copy a whole file with copy_file_range (reflinks where the filesystem can), in pieces of at
/// most 64 MiB with a look at `work` between them.
fn copy_file(src: &File, dst: &File, work: &Cancel) -> Result<()> {
    let len = src
        .metadata()
        .map_err(|e| Error::io("stat of the blob", e))?
        .len();
    let mut off_in = 0u64;
    let mut off_out = 0u64;
    while off_in < len {
        work.check()?;
        let want = (len - off_in).min(64 << 20) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => break,
            Ok(_) => {}
            Err(
                rustix::io::Errno::XDEV | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP,
            ) => {
                let mut r = work.reader(src);
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
