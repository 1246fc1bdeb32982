//! Mounts(key), and making sure every layer a mount list names is mounted (host mode).

use std::path::{Path, PathBuf};

use super::Snapshotter;
use crate::config::MountMode;
use crate::error::{Error, Result};
use crate::integrity::LayerState;
use crate::mount::spec::{BlockShape, FlatShape, Shape};
use crate::mount::{IdMap, Mount};
use crate::store::{DmVerityRecord, Kind, Record};

impl Snapshotter {
    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        super::validate_key("key", key)?;
        let (rec, parents) = self.store.read(|tx| {
            let rec = tx.require(key)?;
            let parents = tx.parents(&rec)?;
            Ok((rec, parents))
        })?;
        if rec.kind == Kind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        if rec.writable_size.is_some() && self.cfg.mount_mode == MountMode::Host {
            let owner = parents
                .first()
                .and_then(|(_, p)| p.layer.as_ref().map(|l| (l.root_uid, l.root_gid)));
            self.ensure_writable_mounted(rec.id, owner)?;
        }
        self.mounts_of(key, &rec, &parents)
    }

    /// Compute the mounts of `rec` (snapshot `key`, with its parent chain), mounting lower
    /// layers first in host mode.
    pub(crate) fn mounts_of(
        &self,
        key: &str,
        rec: &Record,
        parents: &[(String, Record)],
    ) -> Result<Vec<Mount>> {
        let own_layer = self.layout.layer(rec.id);
        let own_layer = (parents.is_empty() && own_layer.exists()).then_some(own_layer);
        let host = self.cfg.mount_mode == MountMode::Host;
        let idmap = IdMap::from_labels(
            rec.labels.get(super::LABEL_UIDMAPPING),
            rec.labels.get(super::LABEL_GIDMAPPING),
        )?;
        // A flattened snapshot's lower is its parent's fsmeta (built now if a crash came
        // between recording the snapshot and recording fsmeta), not the layers one by one.
        let flat = if rec.flattened && !parents.is_empty() {
            let meta = self.ensure_fsmeta(parents)?;
            let (pname, prec) = &parents[0];
            let dir = if host {
                let merged = self.ensure_fsmeta_mounted(parents, &meta)?;
                match &idmap {
                    Some(m) => self.ensure_idmapped(
                        &merged,
                        &self
                            .layout
                            .dir(prec.id)
                            .join(format!("merged-idmap-{}", m.tag())),
                        m,
                    )?,
                    None => merged,
                }
            } else {
                self.verify_fsmeta_for_manager(pname, prec.id, &meta)?;
                for (name, p) in parents {
                    self.verify_for_manager(name, p, LayerState::Committed(p.layer.as_ref()))?;
                }
                self.layout.merged(prec.id)
            };
            Some(FlatShape {
                dir,
                fsmeta: self.layout.fsmeta(prec.id),
                devices: parents
                    .iter()
                    .rev()
                    .map(|(_, p)| self.layout.layer(p.id))
                    .collect(),
            })
        } else {
            None
        };
        // The stacked lowers, one per parent layer.
        let stacked: &[(String, Record)] = if flat.is_some() { &[] } else { parents };
        if host {
            for (name, p) in stacked {
                self.ensure_layer_mounted(name, p, LayerState::Committed(p.layer.as_ref()))?;
            }
            if own_layer.is_some() {
                self.ensure_layer_mounted(key, rec, LayerState::Applied(rec.layer.as_ref()))?;
            }
        } else {
            for (name, p) in stacked {
                self.verify_for_manager(name, p, LayerState::Committed(p.layer.as_ref()))?;
            }
            if own_layer.is_some() {
                self.verify_for_manager(key, rec, LayerState::Applied(rec.layer.as_ref()))?;
            }
        }
        let shape = Shape {
            writable: rec.kind == Kind::Active,
            fs: self.layout.fs(rec.id),
            work: self.layout.work(rec.id),
            own_sidecar: match &own_layer {
                Some(_) if !host => self.manager_sidecar(key, rec)?,
                _ => None,
            },
            own_layer,
            lower_dirs: stacked
                .iter()
                .map(|(_, p)| self.lower_dir(p.id, idmap.as_ref()))
                .collect::<Result<Vec<PathBuf>>>()?,
            lower_layers: stacked
                .iter()
                .map(|(_, p)| self.layout.layer(p.id))
                .collect(),
            lower_sidecars: if host {
                Vec::new()
            } else {
                stacked
                    .iter()
                    .map(|(n, p)| self.manager_sidecar(n, p))
                    .collect::<Result<_>>()?
            },
            block: rec.writable_size.map(|size| BlockShape {
                image: self.layout.rwlayer(rec.id),
                size,
            }),
            ovl_options: &self.cfg.snapshotter.ovl_mount_options,
            idmap_options: if host {
                Vec::new()
            } else {
                idmap
                    .as_ref()
                    .map(|m| m.overlay_options())
                    .unwrap_or_default()
            },
            flat,
        };
        Ok(if host { shape.host() } else { shape.manager() })
    }

    /// Where a lower layer is seen from: its `fs` mount, or an idmapped clone of it.
    fn lower_dir(&self, id: u64, idmap: Option<&IdMap>) -> Result<PathBuf> {
        match idmap {
            Some(m) if self.cfg.mount_mode == MountMode::Host => self.ensure_idmapped(
                &self.layout.fs(id),
                &self.layout.dir(id).join(format!("idmap-{}", m.tag())),
                m,
            ),
            _ => Ok(self.layout.fs(id)),
        }
    }

    /// Host mode with id mappings: an idmapped clone of the mount at `source` (a layer's, at
    /// `snapshots/ID/idmap-TAG`, or a flattened chain's, at `snapshots/ID/merged-idmap-TAG`:
    /// gone with the snapshot directory).
    fn ensure_idmapped(&self, source: &Path, target: &Path, map: &IdMap) -> Result<PathBuf> {
        let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.mounter.is_mountpoint(target)? {
            return Ok(target.to_path_buf());
        }
        std::fs::create_dir_all(target)
            .map_err(|e| Error::io(format!("creating {}", target.display()), e))?;
        crate::mount::idmap::mount_clone(source, target, map)
            .map_err(|e| e.context(format!("{}", source.display())))?;
        Ok(target.to_path_buf())
    }

    /// Manager mode: containerd mounts the layer files itself, so each is checked against its
    /// recorded digest before its path is handed out, as host mode checks before mounting.
    /// A layer checked before and unchanged since (same inode, size and ctime: a write, a
    /// rename over it or `chattr` all change them) is not re-hashed. What containerd then
    /// opens is the path: with kernel fs-verity the kernel checks every read; in userspace
    /// mode this check is the last one.
    pub(crate) fn verify_for_manager(
        &self,
        name: &str,
        rec: &Record,
        state: LayerState<'_>,
    ) -> Result<()> {
        let layer = self.layout.layer(rec.id);
        let _layer = self.layer_locks.lock(&[&rec.id.to_string()]);
        let now = std::fs::symlink_metadata(&layer)
            .map_err(|e| Error::io(format!("stat of layer {name:?} ({})", layer.display()), e))?;
        let stamp = super::FileStamp::of(&now);
        let cache = || {
            self.manager_verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if cache().get(&rec.id) == Some(&stamp) {
            return Ok(());
        }
        let verified = self.integrity.open_verified(&layer, state, name)?;
        let md = verified
            .file()
            .metadata()
            .map_err(|e| Error::io("stat of a verified layer", e))?;
        cache().insert(rec.id, super::FileStamp::of(&md));
        Ok(())
    }

    /// Manager mode: the sidecar containerd is to read for the layer of snapshot `name`
    /// (`rec`), once it is checked against the recorded tree.
    fn manager_sidecar(&self, name: &str, rec: &Record) -> Result<Option<PathBuf>> {
        let tree = self.integrity.dmverity_anchor(
            &self.layout.layer(rec.id),
            None,
            &self.layout.dir(rec.id),
            rec.layer.as_ref().and_then(|l| l.dmverity.as_ref()),
            name,
            true,
        )?;
        if let Some(a) = tree.as_ref().filter(|a| a.migrated) {
            self.record_dmverity(name, rec.id, &a.record)?;
        }
        self.integrity.sidecar_for(
            &self.layout.dmverity(rec.id),
            tree.as_ref().map(|a| &a.record),
            name,
        )
    }

    /// Record the dm-verity tree of an old record's layer, established at its first use.
    pub(crate) fn record_dmverity(&self, key: &str, id: u64, tree: &DmVerityRecord) -> Result<()> {
        self.store.write(|tx| {
            let Some(mut rec) = tx.get(key)?.filter(|r| r.id == id) else {
                return Ok(());
            };
            let layer = rec.layer.get_or_insert_with(Default::default);
            if layer.dmverity.is_none() {
                layer.dmverity = Some(tree.clone());
                tx.replace(key, &rec)?;
            }
            Ok(())
        })
    }

    /// Mount `layer.erofs` of snapshot `name` (`rec`) read-only at its `fs` directory unless
    /// it is already, through the integrity gate, from the file the gate checked.
    ///
    /// The layer is verified (in userspace fs-verity mode: re-hashed whole) before the global
    /// mount lock is taken, under a lock of this layer only, so mounting one large layer does
    /// not hold up the mounts of others. Under the mount lock the snapshot must still exist:
    /// Remove deletes the record before it unmounts (under the same lock), so either the
    /// record is gone and nothing is mounted, or the mount is made before Remove's unmount,
    /// which then takes it away.
    pub(crate) fn ensure_layer_mounted(
        &self,
        name: &str,
        rec: &Record,
        state: LayerState<'_>,
    ) -> Result<()> {
        let id = rec.id;
        let fs_dir = self.layout.fs(id);
        let _layer = self.layer_locks.lock(&[&id.to_string()]);
        {
            let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
            if self.mounter.is_mountpoint(&fs_dir)? {
                return Ok(());
            }
        }
        let layer = self.layout.layer(id);
        if !layer.exists() {
            return Err(Error::not_found(format!(
                "layer {name:?} (snapshot {id}) has no {}",
                layer.display()
            )));
        }
        let verified = self.integrity.open_verified(&layer, state, name)?;
        let tree = self.integrity.dmverity_anchor(
            &layer,
            Some(verified.file()),
            &self.layout.dir(id),
            state.meta().and_then(|m| m.dmverity.as_ref()),
            name,
            false,
        )?;
        if let Some(a) = tree.as_ref().filter(|a| a.migrated) {
            self.record_dmverity(name, id, &a.record)?;
        }
        let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !self.store.read(|tx| tx.is_live(id))? {
            return Err(Error::not_found(format!(
                "layer {name:?} (snapshot {id}) was removed while it was being mounted"
            )));
        }
        let source =
            self.integrity
                .mount_source(&verified, tree.as_ref().map(|a| &a.record), id, name)?;
        if tree.is_some()
            && self.integrity.dmverity_enabled()
            && matches!(source, crate::integrity::MountSource::Layer(_))
        {
            self.counters.dmverity_skipped();
        }
        self.mounter
            .mount_erofs(source.image(), &fs_dir)
            .map_err(|e| e.context(format!("layer {name:?}")))
    }

    /// Size-limited active snapshots: the ext4 image mounted at `fs`, with `upper` and `work`.
    pub(crate) fn ensure_writable_mounted(&self, id: u64, owner: Option<(u32, u32)>) -> Result<()> {
        let fs_dir = self.layout.fs(id);
        let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.mounter.is_mountpoint(&fs_dir)? {
            return Ok(());
        }
        if self.cfg.mount_mode != MountMode::Host {
            return Ok(());
        }
        self.mounter.mount_ext4(&self.layout.rwlayer(id), &fs_dir)?;
        crate::integrity::quota::prepare_dirs(&fs_dir, owner)
    }
}
