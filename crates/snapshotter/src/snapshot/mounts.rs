//! Mounts(key), and making sure every layer a mount list names is mounted (host mode).

use std::path::PathBuf;

use super::Snapshotter;
use crate::config::MountMode;
use crate::error::{Error, Result};
use crate::mount::Mount;
use crate::mount::spec::{BlockShape, Shape};
use crate::store::{Kind, LayerMeta, Record};

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
        self.mounts_of(&rec, &parents)
    }

    /// Compute the mounts of `rec` (with its parent chain), mounting lower layers first in
    /// host mode.
    pub(crate) fn mounts_of(
        &self,
        rec: &Record,
        parents: &[(String, Record)],
    ) -> Result<Vec<Mount>> {
        let own_layer = self.layout.layer(rec.id);
        let own_layer = (parents.is_empty() && own_layer.exists()).then_some(own_layer);
        let host = self.cfg.mount_mode == MountMode::Host;
        if host {
            for (name, p) in parents {
                self.ensure_layer_mounted(p.id, p.layer.as_ref(), name)?;
            }
            if own_layer.is_some() {
                self.ensure_layer_mounted(rec.id, None, "")?;
            }
        }
        let idmap = crate::integrity::IdMap::from_labels(
            rec.labels.get(super::LABEL_UIDMAPPING),
            rec.labels.get(super::LABEL_GIDMAPPING),
        )?;
        let shape = Shape {
            writable: rec.kind == Kind::Active,
            fs: self.layout.fs(rec.id),
            work: self.layout.work(rec.id),
            own_sidecar: match &own_layer {
                Some(_) if !host => self.sidecar_for(rec.id, "")?,
                _ => None,
            },
            own_layer,
            lower_dirs: parents
                .iter()
                .map(|(_, p)| self.lower_dir(p.id, idmap.as_ref()))
                .collect::<Result<Vec<PathBuf>>>()?,
            lower_layers: parents
                .iter()
                .map(|(_, p)| self.layout.layer(p.id))
                .collect(),
            lower_sidecars: if host {
                Vec::new()
            } else {
                parents
                    .iter()
                    .map(|(n, p)| self.sidecar_for(p.id, n))
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
        };
        Ok(if host { shape.host() } else { shape.manager() })
    }

    /// Where a lower layer is seen from: its `fs` mount, or an idmapped clone of it.
    fn lower_dir(&self, id: u64, idmap: Option<&crate::integrity::IdMap>) -> Result<PathBuf> {
        match idmap {
            Some(m) if self.cfg.mount_mode == MountMode::Host => self.ensure_idmapped(id, m),
            _ => Ok(self.layout.fs(id)),
        }
    }

    /// Mount `layer.erofs` of snapshot `id` read-only at its `fs` directory unless it is
    /// already, verifying its integrity first.
    pub(crate) fn ensure_layer_mounted(
        &self,
        id: u64,
        meta: Option<&LayerMeta>,
        name: &str,
    ) -> Result<()> {
        let fs_dir = self.layout.fs(id);
        let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.mounter.is_mountpoint(&fs_dir)? {
            return Ok(());
        }
        let layer = self.layout.layer(id);
        if !layer.exists() {
            return Err(Error::not_found(format!(
                "layer {name:?} (snapshot {id}) has no {}",
                layer.display()
            )));
        }
        crate::integrity::verify_before_mount(self, id, meta, name)?;
        let source = self.layer_source(id, name)?;
        self.mounter
            .mount_erofs(&source, &fs_dir)
            .map_err(|e| e.context(format!("layer {name:?}")))
    }

    /// What to mount for layer `id`: a dm-verity device over it when it has a tree and the
    /// kernel can verify it, the file otherwise (refused when `dmverity_mode = "on"`).
    fn layer_source(&self, id: u64, name: &str) -> Result<PathBuf> {
        use crate::config::Toggle;
        use crate::integrity::dmverity;
        let layer = self.layout.layer(id);
        let mode = self.cfg.snapshotter.dmverity_mode;
        if mode == Toggle::Off {
            return Ok(layer);
        }
        match dmverity::read_sidecar(&self.layout.dir(id))? {
            Some(meta) if dmverity::supported() => dmverity::activate(
                &layer,
                &meta,
                &dmverity::device_name(self.layout.root(), id),
            ),
            Some(_) => Ok(layer),
            None if mode == Toggle::On => Err(Error::failed_precondition(format!(
                "dmverity_mode is \"on\" but layer {name:?} has no dm-verity metadata ({})",
                self.layout.dmverity(id).display()
            ))),
            None => Ok(layer),
        }
    }

    /// The sidecar of layer `id` for manager-mode mounts (`X-containerd.dmverity=`).
    fn sidecar_for(&self, id: u64, name: &str) -> Result<Option<PathBuf>> {
        use crate::config::Toggle;
        let p = self.layout.dmverity(id);
        match self.cfg.snapshotter.dmverity_mode {
            Toggle::Off => Ok(None),
            _ if p.exists() => Ok(Some(p)),
            Toggle::On => Err(Error::failed_precondition(format!(
                "dm-verity mode is 'on' but .dmverity metadata not found for layer {name:?} ({})",
                p.display()
            ))),
            Toggle::Auto => Ok(None),
        }
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
