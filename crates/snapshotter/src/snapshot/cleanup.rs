//! Cleanup (containerd's optional Cleaner) and start-up recovery.

use std::fs;

use super::Snapshotter;
use super::commit::empty_dir;
use crate::error::{Error, Result};
use crate::integrity::LayerState;
use crate::layout::{LAYER_PENDING, LAYER_TMP, REMOVING_PREFIX, STAGING_PREFIX};
use crate::store::{Kind, Record};

impl Snapshotter {
    /// Remove every directory under `snapshots/` that no record owns (and its mounts):
    /// leftovers of crashes and of removals whose directory could not be deleted.
    pub fn cleanup(&self) -> Result<()> {
        let _g = self.sweep_lock.write().unwrap_or_else(|p| p.into_inner());
        self.sweep()
    }

    fn sweep(&self) -> Result<()> {
        let live = self.store.read(|tx| tx.id_map())?;
        let dir = self.layout.snapshots();
        for e in
            fs::read_dir(&dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?
        {
            let e = e.map_err(|e| Error::io("reading the snapshots directory", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let orphan = match name.parse::<u64>() {
                Ok(id) => !live.contains_key(&id),
                // Creations hold the sweep lock from staging to recording, so any staging dir
                // seen here belongs to a creation that died.
                Err(_) => name.starts_with(REMOVING_PREFIX) || name.starts_with(STAGING_PREFIX),
            };
            if orphan {
                tracing::info!(dir = %e.path().display(), "removing orphaned snapshot directory");
                if let Err(err) = self.destroy_dir(&e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cleanup");
                }
            }
        }
        // Mounts left on directories that no longer exist or belong to no record.
        let snapshots = self.layout.snapshots();
        for target in self.mounter.mounts_under(&snapshots)? {
            if self
                .layout
                .id_of(&target)
                .is_none_or(|id| !live.contains_key(&id))
            {
                let _ = self.mounter.unmount(&target);
            }
        }
        Ok(())
    }

    /// After a crash: sweep orphans, drop half-written layers, finish interrupted commits
    /// (empty upper directories of committed snapshots).
    /// At start-up, before any request: diffs on their way to the content store live in
    /// `ROOT/tmp` only while a Compare runs, so whatever a crash left there is garbage.
    fn sweep_scratch(&self) -> Result<()> {
        let dir = self.layout.root().join("tmp");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        for e in entries {
            let e = e.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
            tracing::info!(file = %e.path().display(), "removing a diff left by a crash");
            if let Err(err) = fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), error = %err, "removing a leftover diff");
            }
        }
        Ok(())
    }

    pub(crate) fn recover(&self) -> Result<()> {
        self.sweep()?;
        self.sweep_scratch()?;
        let all = self.store.read(|tx| tx.all())?;
        for (key, rec) in all {
            let dir = self.layout.dir(rec.id);
            if !dir.is_dir() {
                tracing::error!(snapshot = %key, dir = %dir.display(), "snapshot directory is missing");
                continue;
            }
            let _ = fs::remove_file(dir.join(LAYER_TMP));
            if rec.fsmeta.is_none() {
                // A build of this chain's fsmeta that was never recorded (a crash midway): its
                // files are not trusted or used; the next flattened Prepare builds it anew.
                self.discard_fsmeta(rec.id);
            }
            let pending = dir.join(LAYER_PENDING);
            if rec.kind == Kind::Committed
                && !self.layout.layer(rec.id).exists()
                && pending.exists()
            {
                // The commit was recorded but the layer not yet renamed into place.
                fs::rename(&pending, self.layout.layer(rec.id))
                    .map_err(|e| Error::io(format!("finishing the commit of {key:?}"), e))?;
                crate::snapshot::sync_dir(&dir)?;
                self.integrity.set_immutable(&self.layout.layer(rec.id));
            } else if rec.kind != Kind::Committed {
                // A commit that was never recorded.
                let _ = fs::remove_file(&pending);
            }
            if rec.kind == Kind::Committed {
                if !self.layout.layer(rec.id).exists() {
                    tracing::error!(snapshot = %key, "committed snapshot has no layer.erofs");
                    continue;
                }
                let block_leftover = self.layout.rwlayer(rec.id).exists();
                if let Err(e) = self.release_writable(rec.id, block_leftover) {
                    tracing::warn!(snapshot = %key, error = %e, "finishing an interrupted commit");
                }
                if block_leftover {
                    let fs_dir = self.layout.fs(rec.id);
                    if !self.mounter.is_mountpoint(&fs_dir)? {
                        empty_dir(&fs_dir)?;
                    }
                }
                self.reverify_mounted(&key, &rec)?;
                self.reverify_fsmeta_mounted(&key, &rec)?;
            }
        }
        Ok(())
    }

    /// As [`Self::reverify_mounted`], for a flattened chain's fsmeta mount: fsmeta and the
    /// layers it reads are checked again, and the mount is detached if one fails.
    fn reverify_fsmeta_mounted(&self, key: &str, rec: &Record) -> Result<()> {
        let merged = self.layout.merged(rec.id);
        let Some(meta) = rec.fsmeta.as_ref() else {
            return Ok(());
        };
        if !self.mounter.is_mountpoint(&merged)? {
            return Ok(());
        }
        let checked = self
            .integrity
            .open_verified(
                &self.layout.fsmeta(rec.id),
                LayerState::Committed(Some(meta)),
                &format!("fsmeta of {key:?}"),
            )
            .and_then(|_| {
                let chain = self.store.read(|tx| tx.parents(rec))?;
                self.integrity.open_verified(
                    &self.layout.layer(rec.id),
                    LayerState::Committed(rec.layer.as_ref()),
                    key,
                )?;
                for (name, p) in chain {
                    self.integrity.open_verified(
                        &self.layout.layer(p.id),
                        LayerState::Committed(p.layer.as_ref()),
                        &name,
                    )?;
                }
                Ok(())
            });
        if let Err(e) = checked {
            tracing::error!(snapshot = %key, error = %e, "a mounted flattened chain fails its integrity check: unmounting it");
            self.mounter.unmount(&merged)?;
        }
        Ok(())
    }

    /// A layer mounted by an earlier run was checked before that mount, not since: whoever
    /// could change the file while no daemon watched could have. Check it again; one that
    /// fails is unmounted (lazily: containers already on it keep what they have) so the next
    /// mount checks it and refuses it. In userspace fs-verity mode this re-hashes every
    /// mounted layer at start-up.
    fn reverify_mounted(&self, key: &str, rec: &Record) -> Result<()> {
        let fs_dir = self.layout.fs(rec.id);
        if !self.mounter.is_mountpoint(&fs_dir)? {
            return Ok(());
        }
        let state = LayerState::Committed(rec.layer.as_ref());
        if let Err(e) = self
            .integrity
            .open_verified(&self.layout.layer(rec.id), state, key)
        {
            tracing::error!(snapshot = %key, error = %e, "a mounted layer fails its integrity check: unmounting it");
            self.mounter.unmount(&fs_dir)?;
        }
        Ok(())
    }
}
