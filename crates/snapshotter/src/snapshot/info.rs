//! Stat, Update, List (Walk) and Usage.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Snapshotter, validate_key, validate_labels};
use crate::error::{Error, Result};
use crate::filter::{self, Adaptor};
use crate::store::{Kind, Record, Timestamp};

/// What Stat and List report about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Key (or name, once committed).
    pub name: String,
    /// Parent key, empty if none.
    pub parent: String,
    /// Kind.
    pub kind: Kind,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Created.
    pub created: Timestamp,
    /// Last updated.
    pub updated: Timestamp,
}

/// Disk usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes.
    pub size: u64,
    /// Inodes.
    pub inodes: u64,
}

impl Info {
    fn from_record(name: &str, r: &Record) -> Self {
        Info {
            name: name.to_string(),
            parent: r.parent.clone().unwrap_or_default(),
            kind: r.kind,
            labels: r.labels.clone(),
            created: r.created,
            updated: r.updated,
        }
    }
}

impl Adaptor for Info {
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str) {
            Some("name") if path.len() == 1 => Some(self.name.clone()),
            Some("parent") if path.len() == 1 => Some(self.parent.clone()),
            Some("kind") if path.len() == 1 => Some(self.kind.as_str().to_string()),
            Some("labels") if path.len() > 1 => self.labels.get(&path[1..].join(".")).cloned(),
            _ => None,
        }
    }
}

impl Snapshotter {
    /// Information about `key`.
    pub fn stat(&self, key: &str) -> Result<Info> {
        validate_key("key", key)?;
        let r = self.store.read(|tx| tx.require(key))?;
        Ok(Info::from_record(key, &r))
    }

    /// Update labels. `paths` are field-mask paths: `labels` replaces all labels,
    /// `labels.KEY` sets or deletes one; none replaces all labels. Other fields cannot change.
    pub fn update(&self, info: Info, paths: &[String]) -> Result<Info> {
        validate_key("key", &info.name)?;
        validate_labels(&info.labels)?;
        for p in paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(Error::invalid_argument(format!(
                    "cannot update {p:?} field"
                )));
            }
        }
        let _g = self.locks.lock(&[&info.name]);
        let idmap_of = |l: &BTreeMap<String, String>| {
            (
                l.get(super::LABEL_UIDMAPPING).cloned(),
                l.get(super::LABEL_GIDMAPPING).cloned(),
            )
        };
        let rec = self.store.write(|tx| {
            let mut rec = tx.require(&info.name)?;
            let idmap_before = idmap_of(&rec.labels);
            if paths.is_empty() {
                rec.labels = info.labels.clone();
            }
            for p in paths {
                if p == "labels" {
                    rec.labels = info.labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match info.labels.get(k) {
                        Some(v) if !v.is_empty() => {
                            rec.labels.insert(k.to_string(), v.clone());
                        }
                        _ => {
                            rec.labels.remove(k);
                        }
                    }
                }
            }
            validate_labels(&rec.labels)?;
            // Mounts reads the id-mapping labels on every call: refuse a changed pair it
            // could not use, rather than store it and fail every later Mounts. (An Update
            // that leaves the pair alone is not blamed for what Commit stored.)
            let idmap_after = idmap_of(&rec.labels);
            if idmap_after != idmap_before {
                crate::mount::IdMap::from_labels(idmap_after.0.as_ref(), idmap_after.1.as_ref())?;
            }
            rec.updated = Timestamp::now();
            tx.replace(&info.name, &rec)?;
            Ok(rec)
        })?;
        Ok(Info::from_record(&info.name, &rec))
    }

    /// Every snapshot matching any of `filters` (containerd's filter grammar), in key order.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let set = filter::parse_all(filters).map_err(|e| Error::invalid_argument(e.to_string()))?;
        let all = self.store.read(|tx| tx.all())?;
        Ok(all
            .iter()
            .map(|(k, r)| Info::from_record(k, r))
            .filter(|i| set.matches(i))
            .collect())
    }

    /// Disk usage: for active snapshots what the upper directory holds now, for committed
    /// ones the layer recorded at commit, for views nothing.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        validate_key("key", key)?;
        let rec = self.store.read(|tx| tx.require(key))?;
        match rec.kind {
            Kind::Committed => Ok(Usage {
                size: rec.size,
                inodes: rec.inodes,
            }),
            Kind::View => Ok(Usage::default()),
            Kind::Active => {
                if rec.writable_size.is_some()
                    && self.cfg.mount_mode == crate::config::MountMode::Host
                {
                    // After a reboot the ext4 image is not mounted until someone asks.
                    let parents = self.store.read(|tx| tx.parents(&rec))?;
                    let owner = parents
                        .first()
                        .and_then(|(_, p)| p.layer.as_ref().map(|l| (l.root_uid, l.root_gid)));
                    self.ensure_writable_mounted(rec.id, owner)?;
                }
                let upper = if rec.writable_size.is_some() {
                    self.layout.fs(rec.id).join("upper")
                } else {
                    self.layout.fs(rec.id)
                };
                let mut u = disk_usage(&upper)?;
                let layer = self.layout.layer(rec.id);
                if let Ok(md) = std::fs::metadata(&layer) {
                    // A layer the differ wrote into this active snapshot counts too.
                    u.size += md.blocks() * 512;
                    u.inodes += 1;
                }
                Ok(u)
            }
        }
    }
}

/// Allocated bytes and inodes under `root` (hardlinks counted once, no crossing of mounts).
/// The tree may be a running container's: it is walked with [`fdwalk`] (nothing followed,
/// nothing outside counted), and a directory removed or replaced while it is walked is left
/// out rather than failing the request.
fn disk_usage(root: &Path) -> Result<Usage> {
    let tree = match fdwalk::Tree::open(root) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(Usage::default()),
        Err(e) => return Err(e.into()),
    };
    let m = tree.meta();
    let mut u = Usage {
        size: m.blocks * 512,
        inodes: 1,
    };
    let mut seen = std::collections::HashSet::from([m.ino]);
    for e in tree.walk().skip_mounts().skip_changed() {
        let m = *e?.meta();
        if seen.insert(m.ino) {
            u.size += m.blocks * 512;
            u.inodes += 1;
        }
    }
    Ok(u)
}
