//! Commit: the upper directory becomes `layer.erofs` (unless the differ already wrote it),
//! durably, before the commit is recorded.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Snapshotter, sync_dir, validate_key, validate_labels};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::layout::LAYER_PENDING;
use crate::store::{Kind, LayerMeta};

impl Snapshotter {
    /// Commit active snapshot `key` as `name`. `rebase` (containerd 2.x parallel unpack) gives
    /// a parentless snapshot its parent.
    ///
    /// A Commit that converts an upper directory is a heavy request: it refuses to start below
    /// the free-space reserve, waits for a slot, and stops, leaving the active snapshot as it
    /// was, once `cancel` trips or free space falls below the reserve.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        rebase: &str,
        cancel: &Cancel,
    ) -> Result<()> {
        validate_key("name", name)?;
        validate_key("key", key)?;
        validate_labels(&labels)?;
        let _g = self.locks.lock(&[key, name]);
        let rebase = (!rebase.is_empty()).then_some(rebase);
        // Everything the store will check, checked before the (long) conversion.
        let rec = self.store.read(|tx| {
            if tx.get(name)?.is_some() {
                return Err(Error::already_exists(format!("snapshot {name:?} already exists")));
            }
            let rec = tx.require(key)?;
            if rec.kind != Kind::Active {
                return Err(Error::failed_precondition(format!("snapshot {key:?} is not active")));
            }
            if let Some(p) = rebase {
                match &rec.parent {
                    Some(cur) if cur != p => {
                        return Err(Error::invalid_argument(format!(
                            "cannot rebase snapshot {key:?} onto {p:?}: it already has parent {cur:?}"
                        )));
                    }
                    Some(_) => {}
                    None => {
                        let pr = tx
                            .get(p)?
                            .ok_or_else(|| Error::not_found(format!("parent snapshot {p:?} does not exist")))?;
                        if pr.kind != Kind::Committed {
                            return Err(Error::invalid_argument(format!("parent {p:?} is not a committed snapshot")));
                        }
                    }
                }
            }
            Ok(rec)
        })?;
        let id = rec.id;
        let dir = self.layout.dir(id);
        let layer = self.layout.layer(id);
        let pending = dir.join(LAYER_PENDING);
        let block = rec.writable_size.is_some();
        // A layer the differ wrote is already in place; a converted upper directory stays
        // under a pending name until the commit is recorded, so a failed or interrupted commit
        // leaves the active snapshot exactly as it was.
        let converted = !layer.exists();
        let source = if converted {
            let what = format!("Commit of {key:?}");
            self.require_space(&what)?;
            let work = self.guarded(cancel, what);
            let _slot = self.heavy_slot(&work, "Commit")?;
            let upper = if block {
                self.ensure_writable_mounted(id, None)?;
                self.layout.fs(id).join("upper")
            } else {
                self.layout.fs(id)
            };
            self.convert_upper(&upper, &dir, &pending, id, &work)
                .and_then(|()| {
                    // The finished layer must leave the reserve free too.
                    self.require_space(&format!("Commit of {key:?}"))
                        .inspect_err(|_| {
                            let _ = fs::remove_file(&pending);
                        })
                })
                .map_err(|e| self.stopped(&work, e))?;
            pending.clone()
        } else {
            layer.clone()
        };
        crate::failpoint::hit("commit:after-layer");
        // What Apply recorded of the layer it put in place (ignored for a converted upper
        // directory: anchors of an Apply that did not finish).
        let applied = if converted { None } else { rec.layer.clone() };
        let recorded = self
            .seal_layer(&source, key, applied.as_ref())
            .and_then(|meta| {
                let usage = layer_usage(&source)?;
                self.store.write(|tx| {
                    tx.commit_active(key, name, labels.clone(), rebase, usage, meta.clone())
                })
            });
        if let Err(e) = recorded {
            if converted {
                let _ = fs::remove_file(&pending);
            }
            return Err(e);
        }
        crate::failpoint::hit("commit:after-db-commit");
        if converted {
            // Start-up recovery finishes this rename if it does not happen now.
            fs::rename(&pending, &layer)
                .map_err(|e| Error::io("putting the committed layer in place", e))
                .and_then(|_| sync_dir(&dir))?;
        }
        self.integrity.set_immutable(&layer);
        if converted {
            let bytes = fs::metadata(&layer).map_or(0, |m| m.len());
            self.counters
                .converted(crate::stats::Conversion::Commit, bytes);
        }
        // The writable layer is no longer needed; failures here only waste space and are
        // retried at start-up.
        if let Err(e) = self.release_writable(id, block) {
            tracing::warn!(snapshot = name, error = %e, "cleaning the committed upper directory");
        }
        Ok(())
    }

    /// Convert an upper directory into `target` (in `dir`): temporary name, fsync, rename,
    /// fsync of the directory.
    fn convert_upper(
        &self,
        upper: &Path,
        dir: &Path,
        target: &Path,
        id: u64,
        work: &Cancel,
    ) -> Result<()> {
        let tmp = dir.join(crate::layout::LAYER_TMP);
        let out = super::create_scratch(&tmp)?;
        let opts = erofs_image::BuildOptions {
            block_size: 4096,
            inline_data: false,
            uuid: *uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("erofs:snapshot/{}/{id}", self.layout.root().display()).as_bytes(),
            )
            .as_bytes(),
            interrupt: work.interrupt(),
            ..Default::default()
        };
        let r = crate::writeback::during(&out, || erofs_image::dir_to_image(upper, &out, &opts))
            .map_err(Error::from)
            .and_then(|_| work.check())
            .and_then(|_| {
                out.sync_all()
                    .map_err(|e| Error::io("fsync of the layer", e))
            })
            .and_then(|_| fs::rename(&tmp, target).map_err(|e| Error::io("renaming the layer", e)))
            .and_then(|_| sync_dir(dir));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.map_err(|e| e.context(format!("converting {}", upper.display())))
    }

    /// Integrity steps on a finished layer (fs-verity, immutable flag) and what to record.
    fn seal_layer(
        &self,
        layer: &Path,
        key: &str,
        applied: Option<&LayerMeta>,
    ) -> Result<LayerMeta> {
        let img = erofs_image::Image::open(
            fs::File::open(layer)
                .map_err(|e| Error::io(format!("opening {}", layer.display()), e))?,
        )
        .map_err(|e| Error::from(e).context(format!("layer of {key:?}")))?;
        let root = img.inode(img.root_nid())?;
        let mut meta = LayerMeta {
            size: fs::metadata(layer)
                .map_err(|e| Error::io("stat of the layer", e))?
                .len(),
            root_uid: root.raw.uid,
            root_gid: root.raw.gid,
            ..Default::default()
        };
        self.integrity.seal(layer, &mut meta, applied)?;
        if self.integrity.verity_mode() == crate::integrity::VerityMode::Userspace {
            self.counters.fsverity_userspace();
        }
        Ok(meta)
    }

    /// Drop the writable layer of a snapshot that is now committed: unmount and delete the
    /// ext4 image, or empty the upper directory.
    pub(crate) fn release_writable(&self, id: u64, block: bool) -> Result<()> {
        let fs_dir = self.layout.fs(id);
        if block {
            let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.mounter.is_mountpoint(&fs_dir)? {
                self.mounter.unmount(&fs_dir)?;
            }
            let img = self.layout.rwlayer(id);
            if img.exists() {
                fs::remove_file(&img)
                    .map_err(|e| Error::io(format!("removing {}", img.display()), e))?;
            }
            return Ok(());
        }
        if self.mounter.is_mountpoint(&fs_dir)? {
            return Ok(());
        }
        empty_dir(&fs_dir)
    }
}

/// Remove everything inside `dir`, keeping `dir`.
pub(crate) fn empty_dir(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let p = e.path();
        let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(format!("removing {}", p.display()), e))?;
    }
    Ok(())
}

/// Disk usage of a layer: allocated bytes and the image's inode count.
fn layer_usage(layer: &Path) -> Result<(u64, u64)> {
    let md = fs::metadata(layer).map_err(|e| Error::io(format!("stat {}", layer.display()), e))?;
    let inodes = fs::File::open(layer)
        .ok()
        .and_then(|f| erofs_image::Image::open(f).ok())
        .map(|i| i.superblock().inos)
        .unwrap_or(1);
    Ok((md.blocks() * 512, inodes))
}
