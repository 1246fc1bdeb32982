//! Flattened lowers (`snapshotter.max_unmerged_layers`, upstream's key and meaning): an active
//! snapshot or view whose parent chain has more than N layers gets one lower, the EROFS
//! filesystem of `fsmeta.erofs` (the chain's merged tree, metadata only) with the chain's
//! `layer.erofs` files as its devices, instead of one overlay lower per layer.
//!
//! Upstream generated fsmeta after Commit and rewrote it, so the lowers of live overlays
//! changed under them (ESTALE) and the feature was removed. Here fsmeta belongs to the parent
//! committed snapshot and describes exactly the chain ending there, which never changes: it is
//! built once, before the first Prepare/View on that parent returns, shared by every snapshot
//! on the same parent, never rewritten, and removed with the parent's directory (which the
//! store refuses to remove while children exist). Whether a snapshot is flattened is decided
//! when it is created and recorded with it, so its mounts never change either, whatever the
//! configuration says later.
//!
//! Crashes: fsmeta is written to a temporary name, fsynced (with its dm-verity tree), its
//! VMDK descriptor put in place, then renamed and the directory fsynced, sealed (fs-verity,
//! immutable), and only then recorded on the parent's record. A file without a record is
//! never mounted and is deleted at start-up and before the next build.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Snapshotter, create_scratch, sync_dir};
use crate::config::MountMode;
use crate::error::{Error, Result};
use crate::integrity::{LayerState, VerifiedLayer};
use crate::layout::{FSMETA_TMP, FSMETA_VMDK_TMP};
use crate::store::{LayerMeta, Record};

/// containerd's unpacker names its snapshots `extract-<unique> <chainID>` (`UnpackKeyPrefix`):
/// the differ writes those, nothing mounts their lowers for long, and flattening every
/// intermediate chain of an unpack would build fsmeta for every layer. Upstream skipped
/// them too.
const UNPACK_PREFIX: &str = "extract-";

/// Whether `key` is an unpack's snapshot: the client's key starts with [`UNPACK_PREFIX`].
/// Through containerd the key a snapshotter sees is `<namespace>/<id>/<client key>`.
fn is_unpack_key(key: &str) -> bool {
    key.starts_with(UNPACK_PREFIX)
        || key
            .splitn(3, '/')
            .nth(2)
            .is_some_and(|k| k.starts_with(UNPACK_PREFIX))
}

impl Snapshotter {
    /// Whether a new snapshot `key` on `parents` (immediate parent first) gets a flattened
    /// lower.
    pub(crate) fn flatten_wanted(&self, key: &str, parents: &[(String, Record)]) -> bool {
        let n = self.cfg.snapshotter.max_unmerged_layers as usize;
        if n == 0 || parents.len() <= n || is_unpack_key(key) {
            return false;
        }
        // containerd's mount manager sets dm-verity up per `erofs` mount from its
        // `X-containerd.dmverity=` option, not for `device=` entries: a flattened mount there
        // would read the layers unverified, so such chains stay stacked.
        if self.cfg.mount_mode == MountMode::Manager
            && self.integrity.dmverity_enabled()
            && (self.integrity.dmverity_required()
                || parents
                    .iter()
                    .any(|(_, p)| p.layer.as_ref().is_some_and(|l| l.dmverity.is_some())))
        {
            tracing::info!(
                snapshot = key,
                "not flattening: layers with dm-verity trees are verified per mount in manager mode"
            );
            return false;
        }
        true
    }

    /// The fsmeta of the chain `parents` (immediate parent first), built now unless it is
    /// recorded already. Concurrent callers on one parent wait for the one building it (a lock
    /// per parent), then find it recorded.
    pub(crate) fn ensure_fsmeta(&self, parents: &[(String, Record)]) -> Result<LayerMeta> {
        let (pname, prec) = parents
            .first()
            .ok_or_else(|| Error::internal("flattening a snapshot without parents"))?;
        let id = prec.id;
        let _g = self.layer_locks.lock(&[&fsmeta_lock(id)]);
        let cur = self
            .store
            .read(|tx| tx.get(pname))?
            .filter(|r| r.id == id)
            .ok_or_else(|| Error::not_found(format!("parent snapshot {pname:?} was removed")))?;
        if let Some(m) = cur.fsmeta {
            return Ok(m);
        }
        let started = std::time::Instant::now();
        let meta = self.build_fsmeta(id, parents)?;
        if let Err(e) = self
            .store
            .write(|tx| tx.record_fsmeta(pname, id, meta.clone()))
        {
            self.discard_fsmeta(id);
            return Err(e);
        }
        crate::failpoint::hit("fsmeta:after-db-commit");
        self.counters.fsmeta_built();
        tracing::info!(
            parent = %pname,
            layers = parents.len(),
            bytes = meta.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built fsmeta.erofs"
        );
        Ok(meta)
    }

    /// Remove what an unrecorded build of snapshot `id`'s fsmeta left (never mounted: only
    /// recorded ones are).
    pub(crate) fn discard_fsmeta(&self, id: u64) {
        let dir = self.layout.dir(id);
        let fsmeta = self.layout.fsmeta(id);
        self.integrity.release_fsmeta(id, &fsmeta);
        for p in [
            dir.join(FSMETA_TMP),
            fsmeta,
            self.layout.fsmeta_vmdk(id),
            dir.join(FSMETA_VMDK_TMP),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => tracing::info!(file = %p.display(), "removed an unrecorded fsmeta file"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "removing an unrecorded fsmeta file")
                }
            }
        }
    }

    /// Write, seal and put in place the fsmeta of `parents`, whose top is snapshot `id`.
    fn build_fsmeta(&self, id: u64, parents: &[(String, Record)]) -> Result<LayerMeta> {
        self.discard_fsmeta(id);
        let dir = self.layout.dir(id);
        let tmp = dir.join(FSMETA_TMP);
        let target = self.layout.fsmeta(id);
        // The layers are read through the integrity gate, bottom layer first (the device
        // table's order).
        let mut layers = Vec::with_capacity(parents.len());
        let mut paths = Vec::with_capacity(parents.len());
        for (name, p) in parents.iter().rev() {
            let path = self.layout.layer(p.id);
            layers.push(self.integrity.open_verified(
                &path,
                LayerState::Committed(p.layer.as_ref()),
                name,
            )?);
            paths.push(path);
        }
        let r = (|| -> Result<LayerMeta> {
            let out = create_scratch(&tmp)?;
            let built = merge_chain(&out, &tmp, &layers)?;
            crate::failpoint::hit("fsmeta:mid-build");
            out.sync_all()
                .map_err(|e| Error::io("fsync of fsmeta", e))?;
            drop(out);
            let tree = self.integrity.fsmeta_tree(&tmp, built.block_size)?;
            let data_len = tree.as_ref().map_or(built.len, |t| t.hashoffset);
            write_vmdk(
                &dir.join(FSMETA_VMDK_TMP),
                &self.layout.fsmeta_vmdk(id),
                &target,
                data_len,
                &built,
                &paths,
            )?;
            crate::failpoint::hit("fsmeta:before-rename");
            fs::rename(&tmp, &target).map_err(|e| Error::io("renaming fsmeta", e))?;
            sync_dir(&dir)?;
            let mut meta = LayerMeta {
                size: fs::metadata(&target)
                    .map_err(|e| Error::io("stat of fsmeta", e))?
                    .len(),
                ..Default::default()
            };
            let applied = LayerMeta {
                dmverity: tree,
                ..Default::default()
            };
            self.integrity.seal(&target, &mut meta, Some(&applied))?;
            self.integrity.set_immutable(&target);
            crate::failpoint::hit("fsmeta:before-db-commit");
            Ok(meta)
        })();
        if r.is_err() {
            self.discard_fsmeta(id);
        }
        r
    }

    /// Host mode: mount the fsmeta of `parents` (recorded as `meta`) at the parent's `merged`
    /// directory unless it is already, from the files the integrity gate checked: fsmeta
    /// itself and every layer, each through its dm-verity device where it has a tree and the
    /// kernel verifies it, as a stacked layer would be.
    pub(crate) fn ensure_fsmeta_mounted(
        &self,
        parents: &[(String, Record)],
        meta: &LayerMeta,
    ) -> Result<PathBuf> {
        let (pname, prec) = parents
            .first()
            .ok_or_else(|| Error::internal("flattening a snapshot without parents"))?;
        let id = prec.id;
        let target = self.layout.merged(id);
        let _l = self.layer_locks.lock(&[&fsmeta_lock(id)]);
        {
            let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.mounter.is_mountpoint(&target)? {
                return Ok(target);
            }
        }
        let what = format!("fsmeta of {pname:?}");
        let fsmeta = self.integrity.open_verified(
            &self.layout.fsmeta(id),
            LayerState::Committed(Some(meta)),
            &what,
        )?;
        let mut layers = Vec::with_capacity(parents.len());
        for (name, p) in parents.iter().rev() {
            let path = self.layout.layer(p.id);
            let state = LayerState::Committed(p.layer.as_ref());
            let verified = self.integrity.open_verified(&path, state, name)?;
            let tree = self.integrity.dmverity_anchor(
                &path,
                Some(verified.file()),
                &self.layout.dir(p.id),
                state.meta().and_then(|m| m.dmverity.as_ref()),
                name,
                false,
            )?;
            if let Some(a) = tree.as_ref().filter(|a| a.migrated) {
                self.record_dmverity(name, p.id, &a.record)?;
            }
            layers.push((verified, tree.map(|a| a.record), p.id, name));
        }
        let sources = layers
            .iter()
            .map(|(v, t, id, name)| self.integrity.mount_source(v, t.as_ref(), *id, name))
            .collect::<Result<Vec<_>>>()?;
        let main =
            self.integrity
                .fsmeta_mount_source(&fsmeta, meta.dmverity.as_ref(), id, &what)?;
        fs::create_dir_all(&target)
            .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !self.store.read(|tx| tx.is_live(id))? {
            return Err(Error::not_found(format!(
                "{what} (snapshot {id}) was removed while it was being mounted"
            )));
        }
        let devices: Vec<_> = sources.iter().map(|s| s.image()).collect();
        self.mounter
            .mount_erofs_devices(main.image(), &devices, &target)
            .map_err(|e| e.context(what))?;
        Ok(target)
    }

    /// Manager mode: fsmeta is checked against its record before its path is handed out, as
    /// the layers are ([`Self::verify_for_manager`]).
    pub(crate) fn verify_fsmeta_for_manager(
        &self,
        pname: &str,
        id: u64,
        meta: &LayerMeta,
    ) -> Result<VerifiedLayer> {
        self.integrity.open_verified(
            &self.layout.fsmeta(id),
            LayerState::Committed(Some(meta)),
            &format!("fsmeta of {pname:?}"),
        )
    }
}

fn fsmeta_lock(id: u64) -> String {
    format!("fsmeta/{id}")
}

/// What [`merge_chain`] wrote.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    /// Bytes of the image.
    pub len: u64,
    /// Its block size.
    pub block_size: u32,
    /// Its device table: blocks and first block in the flat address space, per layer.
    pub devices: Vec<(u64, u64)>,
}

/// Build the merged metadata image of `layers` (bottom first, the verified handles) into
/// `out` (at `tmp`), and read back what its device table says.
fn merge_chain(out: &fs::File, tmp: &Path, layers: &[VerifiedLayer]) -> Result<Built> {
    let images = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let f = l
                .file()
                .try_clone()
                .map_err(|e| Error::io(format!("reopening {}", l.path().display()), e))?;
            erofs_image::Image::open(f).map_err(|e| {
                Error::from(e).context(format!("layer {} ({})", i + 1, l.path().display()))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut w = std::io::BufWriter::new(out);
    let summary = erofs_image::merge_layers(&images, &mut w, &erofs_image::MergeOptions::default())
        .map_err(|e| Error::from(e).context("building fsmeta"))?;
    w.flush().map_err(|e| Error::io("writing fsmeta", e))?;
    drop(w);
    tracing::debug!(
        inodes = summary.inodes,
        files = summary.files,
        copied_bytes = summary.copied_bytes,
        "fsmeta written"
    );
    built_of(tmp)
}

/// What the image at `path` is: its length, block size and device table.
fn built_of(path: &Path) -> Result<Built> {
    let f =
        fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io("stat of fsmeta", e))?
        .len();
    let img =
        erofs_image::Image::open(f).map_err(|e| Error::from(e).context("reading fsmeta back"))?;
    Ok(Built {
        len,
        block_size: img.block_size() as u32,
        devices: img
            .device_slots()
            .iter()
            .map(|d| (d.blocks as u64, d.uniaddr as u64))
            .collect(),
    })
}

/// Write the VMDK descriptor of fsmeta (`fsmeta`, its first `data_len` bytes) followed by
/// each layer, as one disk: to `tmp`, fsynced, renamed to `target`. The layers sit where the
/// device table places them in the flat address space (`uniaddr`), with zero extents for any
/// gap; a device table without flat addresses gets no descriptor (a guest could not mount
/// the disk as one filesystem).
fn write_vmdk(
    tmp: &Path,
    target: &Path,
    fsmeta: &Path,
    data_len: u64,
    built: &Built,
    layers: &[PathBuf],
) -> Result<()> {
    let Some(text) = vmdk_descriptor(fsmeta, data_len, built, layers) else {
        tracing::info!(fsmeta = %fsmeta.display(), "device table has no flat addresses: no VMDK descriptor");
        return Ok(());
    };
    let mut f = create_scratch(tmp)?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::rename(tmp, target).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))
}

/// The descriptor text, in the shape erofs-utils' `mkfs.erofs --vmdk-desc` writes
/// (`twoGbMaxExtentFlat`, flat extents of at most 2 GiB, IDE geometry), which qemu, libkrun
/// (imago) and nerdbox read.
pub(crate) fn vmdk_descriptor(
    fsmeta: &Path,
    data_len: u64,
    built: &Built,
    layers: &[PathBuf],
) -> Option<String> {
    const SECTOR: u64 = 512;
    const MAX_EXTENT: u64 = (2u64 << 30) / SECTOR;
    let bs = built.block_size as u64;
    if built.devices.len() != layers.len() || built.devices.iter().any(|&(_, at)| at == 0) {
        return None;
    }
    let mut extents = String::new();
    let mut add = |kind: &str, mut sectors: u64, file: Option<&Path>| {
        let mut offset = 0;
        while sectors > 0 {
            let n = sectors.min(MAX_EXTENT);
            match file {
                Some(f) => extents.push_str(&format!("RW {n} FLAT \"{}\" {offset}\n", f.display())),
                None => extents.push_str(&format!("RW {n} {kind}\n")),
            }
            offset += n;
            sectors -= n;
        }
    };
    let primary = data_len.div_ceil(SECTOR);
    add("FLAT", primary, Some(fsmeta));
    let mut at = primary;
    for (&(blocks, start), layer) in built.devices.iter().zip(layers) {
        let start = start * bs / SECTOR;
        if start < at {
            return None;
        }
        add("ZERO", start - at, None);
        let sectors = blocks * bs / SECTOR;
        add("FLAT", sectors, Some(layer));
        at = start + sectors;
    }
    let cylinders = at.div_ceil(16 * 63);
    let cid = built.devices.iter().fold(data_len as u32, |h, &(b, s)| {
        h.rotate_left(5) ^ (b as u32) ^ (s as u32)
    });
    Some(format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n{extents}\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_keys_directly_and_through_containerd() {
        assert!(is_unpack_key("extract-123-abc sha256:x"));
        assert!(is_unpack_key("default/17/extract-123-abc sha256:x"));
        assert!(!is_unpack_key("default/17/container-1"));
        assert!(!is_unpack_key("default/17/my/extract-thing"));
        assert!(!is_unpack_key("k8s.io/3/sha256:extract-"));
    }

    #[test]
    fn vmdk_places_layers_at_their_flat_addresses() {
        let built = Built {
            len: 8192,
            block_size: 4096,
            devices: vec![(3, 2), (1, 6)],
        };
        let layers = vec![
            PathBuf::from("/r/1/layer.erofs"),
            PathBuf::from("/r/2/layer.erofs"),
        ];
        let d = vmdk_descriptor(Path::new("/r/2/fsmeta.erofs"), 8192, &built, &layers).unwrap();
        let extents: Vec<&str> = d.lines().filter(|l| l.starts_with("RW ")).collect();
        assert_eq!(
            extents,
            [
                "RW 16 FLAT \"/r/2/fsmeta.erofs\" 0",
                "RW 24 FLAT \"/r/1/layer.erofs\" 0",
                "RW 8 ZERO",
                "RW 8 FLAT \"/r/2/layer.erofs\" 0",
            ]
        );
        assert!(d.starts_with("# Disk DescriptorFile\n"));
        assert!(d.contains("createType=\"twoGbMaxExtentFlat\""));
        // Overlapping fsmeta, or no flat addresses: no descriptor.
        assert!(vmdk_descriptor(Path::new("/f"), 3 * 4096, &built, &layers).is_none());
        let unaddressed = Built {
            devices: vec![(3, 0), (1, 0)],
            ..built.clone()
        };
        assert!(vmdk_descriptor(Path::new("/f"), 8192, &unaddressed, &layers).is_none());
    }

    #[test]
    fn vmdk_splits_extents_at_two_gib() {
        let built = Built {
            len: 4096,
            block_size: 4096,
            devices: vec![(3 << 18, 1)],
        };
        let layers = vec![PathBuf::from("/l")];
        let d = vmdk_descriptor(Path::new("/f"), 4096, &built, &layers).unwrap();
        let extents: Vec<&str> = d.lines().filter(|l| l.starts_with("RW ")).collect();
        assert_eq!(
            extents,
            [
                "RW 8 FLAT \"/f\" 0",
                "RW 4194304 FLAT \"/l\" 0",
                "RW 2097152 FLAT \"/l\" 4194304",
            ]
        );
    }
}
