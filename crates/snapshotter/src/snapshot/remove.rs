//! Remove: the record goes first (in one transaction), then the directory.

use std::fs;
use std::path::Path;

use super::Snapshotter;
use crate::error::{ErrorKind, Result};

impl Snapshotter {
    /// Remove `key`. A missing snapshot is not an error (containerd's GC may retry);
    /// a snapshot with children is FailedPrecondition.
    pub fn remove(&self, key: &str) -> Result<()> {
        super::validate_key("key", key)?;
        let _g = self.locks.lock(&[key]);
        let rec = match self.store.write(|tx| tx.remove(key)) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.context(format!("failed to remove snapshot {key:?}"))),
        };
        crate::failpoint::hit("remove:after-db-commit");
        self.manager_verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.id);
        if let Err(e) = self.destroy_dir(&self.layout.dir(rec.id)) {
            // The record is gone; Cleanup and the next start-up sweep the directory.
            tracing::warn!(snapshot = key, error = %e, "removing the snapshot directory");
        }
        Ok(())
    }

    /// Unmount everything under a snapshot directory, clear the immutable flag on its layer,
    /// and delete it (renamed to `rm-*` first, so a crash midway leaves an obvious orphan).
    pub(crate) fn destroy_dir(&self, dir: &Path) -> Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        {
            let _g = self.mount_lock.lock().unwrap_or_else(|p| p.into_inner());
            for target in self.mounter.mounts_under(dir)? {
                self.mounter.unmount(&target)?;
            }
        }
        let layer = dir.join(crate::layout::LAYER);
        let fsmeta = dir.join(crate::layout::FSMETA);
        match self.layout.id_of(dir) {
            Some(id) => {
                self.integrity.release_fsmeta(id, &fsmeta);
                self.integrity.release(id, &layer);
            }
            None => {
                crate::integrity::clear_immutable(&fsmeta);
                crate::integrity::clear_immutable(&layer);
            }
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let doomed = if name.starts_with(crate::layout::REMOVING_PREFIX) {
            dir.to_path_buf()
        } else {
            let d = self.layout.snapshots().join(format!(
                "{}{name}-{:08x}",
                crate::layout::REMOVING_PREFIX,
                super::rand_u64() as u32
            ));
            fs::rename(dir, &d)
                .map_err(|e| crate::error::Error::io(format!("renaming {}", dir.display()), e))?;
            crate::failpoint::hit("remove:after-rename");
            d
        };
        fs::remove_dir_all(&doomed)
            .map_err(|e| crate::error::Error::io(format!("removing {}", doomed.display()), e))
    }
}
