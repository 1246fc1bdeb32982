//! Prepare and View.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{
    LABEL_GIDMAPPING, LABEL_MAX_SIZE, LABEL_UIDMAPPING, Snapshotter, sync_dir, validate_key,
    validate_labels,
};
use crate::error::{Error, Result};
use crate::layout::MARKER;
use crate::mount::Mount;
use crate::store::Kind;

impl Snapshotter {
    /// Create an active snapshot `key` on `parent` (empty = none) and return its mounts.
    /// Refused (ResourceExhausted) while free space under the root is below the reserve: the
    /// container would write there.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        validate_key("key", key)?;
        self.require_space(&format!("Prepare of {key:?}"))?;
        self.create(Kind::Active, key, parent, labels)
    }

    /// Create a read-only view `key` of `parent` and return its mounts.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// The writable-layer size of a new active snapshot: the `max-size` label when valid,
    /// otherwise `default_size` (0 = unlimited).
    fn writable_size(&self, labels: &BTreeMap<String, String>) -> u64 {
        // As upstream: the label only matters when size limits are on (default_size > 0).
        if self.default_size == 0 {
            return 0;
        }
        if let Some(v) = labels.get(LABEL_MAX_SIZE) {
            match v.trim().parse::<i64>() {
                Ok(n) if n > 0 => return n as u64,
                _ => {
                    tracing::warn!(label = LABEL_MAX_SIZE, value = %v, "invalid size label; using default_size")
                }
            }
        }
        self.default_size
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        validate_key("key", key)?;
        if !parent.is_empty() {
            validate_key("parent", parent)?;
        }
        validate_labels(&labels)?;
        let idmap = crate::mount::IdMap::from_labels(
            labels.get(LABEL_UIDMAPPING),
            labels.get(LABEL_GIDMAPPING),
        )?;
        let writable = match kind {
            Kind::Active => Some(self.writable_size(&labels)).filter(|&s| s > 0),
            _ => None,
        };
        let _key_guard = self.locks.lock(&[key]);
        if self.store.read(|tx| tx.get(key))?.is_some() {
            return Err(Error::already_exists(format!(
                "snapshot {key:?} already exists"
            )));
        }

        let sweep = self.sweep_lock.read().unwrap_or_else(|p| p.into_inner());
        let staging = self.staging_dir();
        let built = self.build_staging(&staging, kind, writable);
        if let Err(e) = built {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        let mut moved_to = None;
        let parent_opt = (!parent.is_empty()).then_some(parent);
        let result = self.store.write(|tx| {
            let mut rec = tx.create(kind, key, parent_opt, labels.clone(), writable)?;
            let parents = tx.parents(&rec)?;
            // Decided once, with the record: the snapshot's mounts never change after.
            if self.flatten_wanted(key, &parents) {
                rec.flattened = true;
                tx.replace(key, &rec)?;
            }
            // The upper dir's owner shows as the owner of the container's root: take the
            // image root's owner, or root of the user namespace.
            let owner = match (&idmap, parents.first()) {
                (Some(m), _) => Some(m.root_pair()),
                (None, Some((_, p))) => p.layer.as_ref().map(|l| (l.root_uid, l.root_gid)),
                _ => None,
            };
            if let Some((uid, gid)) = owner {
                let upper = if writable.is_some() {
                    None
                } else {
                    Some(staging.join("fs"))
                };
                if let Some(upper) = upper {
                    rustix::fs::chown(
                        &upper,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )
                    .map_err(|e| Error::io(format!("chown {}", upper.display()), e.into()))?;
                }
            }
            let dir = self.layout.dir(rec.id);
            fs::rename(&staging, &dir).map_err(|e| {
                Error::io(
                    format!("renaming {} to {}", staging.display(), dir.display()),
                    e,
                )
            })?;
            moved_to = Some(dir);
            // The directory's new name is durable before the record that points at it: a
            // power loss after the commit must not leave a record without its directory.
            sync_dir(&self.layout.snapshots())?;
            crate::failpoint::hit("prepare:before-db-commit");
            Ok((rec, parents, owner))
        });
        let (rec, parents, owner) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_dir_all(moved_to.as_deref().unwrap_or(&staging));
                return Err(e);
            }
        };
        drop(sweep);
        crate::failpoint::hit("prepare:after-db-commit");
        let mounted = if writable.is_some() && kind == Kind::Active {
            self.ensure_writable_mounted(rec.id, owner)
        } else {
            Ok(())
        }
        .and_then(|_| self.mounts_of(key, &rec, &parents));
        match mounted {
            Ok(m) => Ok(m),
            Err(e) => {
                // A snapshot whose mounts cannot be given (a layer failing its integrity
                // check, a mount error) is not left half-created.
                if let Err(re) = self.store.write(|tx| tx.remove(key).map(|_| ())) {
                    tracing::error!(snapshot = key, error = %re, "rolling back a failed creation");
                }
                if let Err(re) = self.destroy_dir(&self.layout.dir(rec.id)) {
                    tracing::warn!(snapshot = key, error = %re, "removing the directory of a failed creation");
                }
                Err(e)
            }
        }
    }

    /// Build the directory of a new snapshot under a temporary name.
    fn build_staging(&self, staging: &Path, kind: Kind, writable: Option<u64>) -> Result<()> {
        let mk = |p: &Path, mode: u32| -> Result<()> {
            fs::create_dir(p).map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(format!("chmod {}", p.display()), e))
        };
        mk(staging, 0o700)?;
        mk(&staging.join("fs"), 0o755)?;
        if kind == Kind::Active {
            if writable.is_none() {
                mk(&staging.join("work"), 0o711)?;
            }
            fs::write(staging.join(MARKER), b"")
                .map_err(|e| Error::io("writing the layer marker", e))?;
        }
        if let Some(size) = writable {
            crate::integrity::quota::create_image(&staging.join(crate::layout::RWLAYER), size)?;
        }
        Ok(())
    }
}
