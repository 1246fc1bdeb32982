//! What the differ ([`crate::diff`]) may do with snapshots, and nothing more: find the active
//! snapshot a mount list belongs to and write its layer in place durably (Apply), and open
//! the layers and upper directory two mount lists name, through the integrity gate (Compare).
//! The differ knows media types, blobs and tar; this module knows the store, the layout,
//! the key locks and the order in which a layer becomes durable.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::{Snapshotter, sync_dir};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::integrity::{LayerState, VerifiedLayer, ahead};
use crate::layout::{LAYER, LAYER_TMP, MARKER};
use crate::mount::Mount;
use crate::store::{Kind, Record};

/// Where a layer being applied is written: the temporary file and its path, and whether its
/// data may skip the page cache (not when it is hashed while written).
#[derive(Debug)]
pub(crate) struct LayerOut<'a> {
    /// The temporary file, open for reading and writing.
    pub file: &'a File,
    /// Its path.
    pub path: &'a Path,
    /// Whether the data may be written with O_DIRECT.
    pub direct: bool,
}

/// Where the changes of a diff come from.
#[derive(Debug)]
pub(crate) enum ChangeSource {
    /// An active snapshot's upper directory (overlayfs format).
    Dir(PathBuf),
    /// A layer image: one the differ wrote into an active snapshot, or a view's committed
    /// layer.
    Layer(VerifiedLayer),
}

/// The two sides of a diff, opened.
#[derive(Debug)]
pub(crate) struct DiffInputs {
    /// The changes.
    pub upper: ChangeSource,
    /// The lower layers, top first.
    pub lowers: Vec<VerifiedLayer>,
}

/// A lower a mount names: a snapshot id, and whether it stands for that snapshot's whole
/// chain (a flattened chain's mount).
type Lower = (u64, bool);

/// A dm-verity tree fetched for a layer, and how to check it.
#[derive(Debug)]
pub(crate) struct TreePlan {
    /// The tree.
    pub tree: crate::artifacts::FetchedTree,
    /// How much of it to check.
    pub check: crate::artifacts::TreeCheck,
    /// Whether the Apply must fail when it does not pass (a required signed root).
    pub required: bool,
}

/// Whether a fetched tree was used: `None` when none was given, else `Ok` or why not.
pub(crate) type TreeUse = Option<std::result::Result<(), String>>;

fn not_ours(why: impl std::fmt::Display) -> Error {
    Error::unimplemented(format!("mounts are not erofs-snapshotter snapshots: {why}"))
}

impl Snapshotter {
    /// Which active snapshot of ours `mounts` (as returned by Prepare) belong to, or
    /// Unimplemented so containerd falls through to the next differ.
    fn apply_target(&self, mounts: &[Mount]) -> Result<(u64, String)> {
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
                other => return Err(not_ours(format!("mount type {other:?}"))),
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
        Ok((id, key))
    }

    /// The labels of the active snapshot `mounts` describe (what Prepare was given); empty
    /// when it is not ours.
    pub(crate) fn apply_labels(
        &self,
        mounts: &[Mount],
    ) -> std::collections::BTreeMap<String, String> {
        self.apply_target(mounts)
            .and_then(|(_, key)| self.store.read(|tx| tx.get(&key)))
            .ok()
            .flatten()
            .map(|r| r.labels)
            .unwrap_or_default()
    }

    /// Apply: write the layer of the active snapshot `mounts` describe. `write` fills the
    /// temporary file; then the integrity trees are added, the file is fsynced, renamed to
    /// `layer.erofs` (its dm-verity sidecar first) and the directory fsynced, all under the
    /// snapshot's key lock and a heavy-request slot. On failure (also when `work` trips)
    /// nothing is left. Returns the snapshot's key and what `write` returned.
    ///
    /// `write` may also return a dm-verity tree fetched for the layer ([`TreePlan`]), used
    /// instead of one computed if it passes its check; the third value says whether it did.
    pub(crate) fn write_applied_layer<T>(
        &self,
        mounts: &[Mount],
        tar_index: bool,
        work: &Cancel,
        write: impl FnOnce(&LayerOut<'_>) -> Result<(T, Option<TreePlan>)>,
    ) -> Result<(String, T, TreeUse)> {
        let (id, key) = self.apply_target(mounts)?;
        let _g = self.locks.lock(&[&key]);
        // Checked under the key lock, so a Commit racing this Apply cannot have made it a
        // committed snapshot in between.
        let rec = self.store.read(|tx| tx.get(&key))?;
        if !rec.is_some_and(|r| r.id == id && r.kind == Kind::Active) {
            return Err(not_ours("snapshot is not active"));
        }
        let _slot = self.heavy_slot(work, "Apply")?;
        work.check()?;
        let dir = self.layout.dir(id);
        let tmp = dir.join(LAYER_TMP);
        let out = super::create_scratch(&tmp)?;
        // Written back to disk as it is produced, so the fsync below only waits for the tail,
        // and hashed for its integrity trees as it is produced, so they cost little more.
        let trees = self.integrity.ahead_trees(tar_index);
        let (result, hashed) = crate::writeback::during(&out, || {
            ahead::during(&out, trees, || {
                write(&LayerOut {
                    file: &out,
                    path: &tmp,
                    direct: trees == ahead::Trees::default(),
                })
            })
        });
        let sidecar = dir.join(crate::layout::DMVERITY_SIDECAR);
        let sidecar_tmp = crate::integrity::dmverity::sidecar_tmp(&tmp);
        let mut tree_use = None;
        let result = result.and_then(|(written, plan)| {
            work.check()?;
            // The layer is written back to disk while the integrity hashes are computed (the
            // Merkle trees read it from the page cache), so they cost little more than the
            // fsync that has to happen anyway. That fsync's error must not be lost: a later
            // fsync of the same file may not report it again.
            let anchors = std::thread::scope(|sc| {
                let early = sc.spawn(|| out.sync_data());
                let fetched = plan.as_ref().map(|p| (&p.tree, p.check));
                let r = self.integrity.after_apply(&tmp, tar_index, &hashed, fetched);
                let synced = early
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked")));
                synced.map_err(|e| Error::io("fsync of the layer", e))?;
                r
            })?;
            let (anchors, used) = anchors;
            if let (Some(p), Some(Err(why))) = (&plan, &used)
                && p.required
            {
                return Err(Error::failed_precondition(format!(
                    "artifacts.require_signed_root_hash: the signed dm-verity tree fetched for the layer is not valid: {why}"
                )));
            }
            tree_use = used;
            crate::failpoint::hit("apply:before-rename");
            // The last moment the Apply can still stop without a trace; the finished layer must
            // leave the reserve free too.
            work.check()?;
            self.require_space("Apply")?;
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
            // What the layer is checked against is recorded before the layer is in place, so
            // a layer the differ put in place always has its anchors in the store (a crash in
            // between leaves anchors of a layer that is not there: Commit then converts the
            // upper directory and ignores them, a new Apply replaces them).
            self.store
                .write(|tx| tx.record_applied(&key, id, anchors.clone()))?;
            let bytes = out.metadata().map_or(0, |m| m.len());
            fs::rename(&tmp, dir.join(LAYER)).map_err(|e| Error::io("renaming the layer", e))?;
            sync_dir(&dir)?;
            self.counters
                .converted(crate::stats::Conversion::Apply, bytes);
            Ok(written)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&sidecar_tmp);
        }
        result.map(|w| (key, w, tree_use))
    }

    /// Resolve mounts to our snapshot ids, top first: `bind` of an `fs` dir is one layer,
    /// `overlay` lists `lowerdir` entries and may have an `upperdir`. A flattened chain's
    /// mount (`snapshots/ID/merged`) stands for snapshot ID and every parent of it: the ids
    /// come back with `true` ("and its parents"), expanded by the caller.
    fn mount_ids(&self, mounts: &[Mount]) -> Result<(Vec<Lower>, Option<u64>)> {
        let mut lowers = Vec::new();
        let mut upper = None;
        let id_of = |p: &str| {
            self.layout
                .id_of(Path::new(p))
                .ok_or_else(|| not_ours(format!("{p} is not under the snapshotter root")))
        };
        let lower = |p: &str| -> Result<Lower> {
            let id = id_of(p)?;
            let flat = Path::new(p)
                .strip_prefix(self.layout.dir(id))
                .ok()
                .and_then(|rest| rest.components().next())
                .is_some_and(|c| {
                    c.as_os_str()
                        .to_string_lossy()
                        .starts_with(crate::layout::MERGED_DIR)
                });
            Ok((id, flat))
        };
        for m in mounts {
            match m.kind.rsplit('/').next().unwrap_or_default() {
                "bind" => {
                    if m.options.iter().any(|o| o == "ro") {
                        lowers.push(lower(&m.source)?);
                    } else {
                        upper = Some(id_of(&m.source)?);
                    }
                }
                "overlay" => {
                    for o in &m.options {
                        if let Some(list) = o.strip_prefix("lowerdir=") {
                            for d in list.split(':') {
                                lowers.push(lower(d)?);
                            }
                        } else if let Some(u) = o.strip_prefix("upperdir=") {
                            upper = Some(id_of(u)?);
                        }
                    }
                }
                other => return Err(not_ours(format!("mount type {other:?}"))),
            }
        }
        Ok((lowers, upper))
    }

    /// Open the layer of a snapshot through the integrity gate.
    fn open_layer(&self, rec: &Record, name: &str) -> Result<VerifiedLayer> {
        let state = match rec.kind {
            Kind::Committed => LayerState::Committed(rec.layer.as_ref()),
            _ => LayerState::Applied(rec.layer.as_ref()),
        };
        self.integrity
            .open_verified(&self.layout.layer(rec.id), state, name)
    }

    /// Compare: the change set `upper` mounts describe and the lower layers `lower` mounts
    /// name, opened (layers through the integrity gate).
    pub(crate) fn diff_inputs(&self, lower: &[Mount], upper: &[Mount]) -> Result<DiffInputs> {
        let (lower_ids, _) = self.mount_ids(lower)?;
        let (upper_lowers, upper_id) = self.mount_ids(upper)?;
        let live: HashMap<u64, (String, Record)> = self.store.read(|tx| {
            let mut recs = HashMap::new();
            for (id, key) in tx.id_map()? {
                let rec = tx.require(&key)?;
                recs.insert(id, (key, rec));
            }
            Ok(recs)
        })?;
        let record = |id: u64| {
            live.get(&id)
                .ok_or_else(|| Error::not_found(format!("snapshot {id} does not exist")))
        };
        // A flattened chain's mount is its top snapshot and all of that one's parents.
        let by_key: HashMap<&str, u64> =
            live.iter().map(|(id, (k, _))| (k.as_str(), *id)).collect();
        let expand = |ids: Vec<Lower>| -> Result<Vec<u64>> {
            let mut out = Vec::with_capacity(ids.len());
            for (id, chain) in ids {
                out.push(id);
                if !chain {
                    continue;
                }
                let mut next = record(id)?.1.parent.clone();
                while let Some(p) = next {
                    let pid = *by_key.get(p.as_str()).ok_or_else(|| {
                        Error::not_found(format!("parent snapshot {p:?} does not exist"))
                    })?;
                    out.push(pid);
                    next = record(pid)?.1.parent.clone();
                    if out.len() > live.len() {
                        return Err(Error::internal("parent chain loops"));
                    }
                }
            }
            Ok(out)
        };
        let lower_ids = expand(lower_ids)?;
        let upper_lowers = expand(upper_lowers)?;
        let upper = match upper_id {
            Some(id) => {
                let (key, rec) = record(id)
                    .map_err(|_| Error::not_found(format!("upper snapshot {id} does not exist")))?;
                if rec.kind != Kind::Active {
                    return Err(Error::invalid_argument(
                        "the upper mounts are not of an active snapshot",
                    ));
                }
                if self.layout.layer(id).exists() {
                    // The differ filled this snapshot: its layer is the change set.
                    ChangeSource::Layer(self.open_layer(rec, key)?)
                } else if rec.writable_size.is_some() {
                    ChangeSource::Dir(self.layout.fs(id).join("upper"))
                } else {
                    ChangeSource::Dir(self.layout.fs(id))
                }
            }
            // A read-only view of a committed layer: its own layer is the change set.
            None => {
                let top = *upper_lowers
                    .first()
                    .ok_or_else(|| Error::invalid_argument("no upper mounts"))?;
                let (key, rec) = record(top)?;
                if rec.kind != Kind::Committed && !self.layout.layer(top).exists() {
                    // A read-only mount of a snapshot the differ never filled (a parentless
                    // view, an active snapshot's directory mounted `ro`): no layer of ours
                    // holds its changes, so the next differ reads the mounts themselves.
                    return Err(not_ours(format!(
                        "snapshot {key:?} has no layer to take the changes from"
                    )));
                }
                ChangeSource::Layer(self.open_layer(rec, key)?)
            }
        };
        let mut lowers = Vec::with_capacity(lower_ids.len());
        for id in lower_ids {
            let (key, rec) = record(id)?;
            // The read-only bind of a parentless View or Active snapshot (containerd views the
            // empty parent "" when it diffs a base layer) is an empty directory: no layer.
            let empty = rec.kind != Kind::Committed && rec.parent.is_none();
            if empty && !self.layout.layer(id).exists() {
                continue;
            }
            if rec.kind != Kind::Committed && !self.layout.layer(id).exists() {
                // An uncommitted snapshot named as a lower (its directory mounted `ro`): its
                // files are not in a layer of ours.
                return Err(not_ours(format!("lower snapshot {key:?} has no layer")));
            }
            lowers.push(self.open_layer(rec, key)?);
        }
        Ok(DiffInputs { upper, lowers })
    }

    /// A new scratch file under `ROOT/tmp` (for diffs on their way to the content store).
    pub(crate) fn scratch_file(&self, prefix: &str) -> Result<(PathBuf, File)> {
        let tmp_dir = self.layout.root().join("tmp");
        fs::create_dir_all(&tmp_dir)
            .map_err(|e| Error::io(format!("creating {}", tmp_dir.display()), e))?;
        let path = tmp_dir.join(format!("{prefix}{:016x}", super::rand_u64()));
        let file = File::create(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok((path, file))
    }
}
