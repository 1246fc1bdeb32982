//! The metadata store: snapshot records in a redb database (one ACID file, copy-on-write
//! B-trees, checksummed commits, one fsync per durable commit).
//!
//! The API speaks in snapshotter terms, like containerd's bolt `MetaStore`: create, commit an
//! active snapshot, remove, update labels, walk. Work runs inside [`Store::read`] /
//! [`Store::write`] closures; a write commits only when its closure returns `Ok`.

mod schema;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};

use schema::*;
pub use schema::{DmVerityRecord, Kind, LayerMeta, Record, Timestamp};

use crate::error::{Error, Result};

/// The metadata database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

/// A read transaction.
pub struct ReadTx {
    tx: redb::ReadTransaction,
}

/// A write transaction.
pub struct WriteTx {
    tx: redb::WriteTransaction,
}

impl std::fmt::Debug for ReadTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadTx")
    }
}
impl std::fmt::Debug for WriteTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteTx")
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Store(format!("snapshot {key:?}: bad record: {e}")))
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(r).expect("records serialize")
}

impl Store {
    /// Open (creating if needed) the database at `path`, checking the schema version.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let version = meta.get(SCHEMA_KEY)?.map(|v| v.value());
            match version {
                None => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                    meta.insert(NEXT_ID_KEY, 1)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(v) => {
                    return Err(Error::Store(format!(
                        "{} has schema version {v}; this build reads version {SCHEMA_VERSION}",
                        path.display()
                    )));
                }
            }
            tx.open_table(SNAPSHOTS)?;
            tx.open_table(IDS)?;
            tx.open_table(CHILDREN)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// Run `f` in a read transaction.
    pub fn read<T>(&self, f: impl FnOnce(&ReadTx) -> Result<T>) -> Result<T> {
        let tx = ReadTx {
            tx: self.db.begin_read()?,
        };
        f(&tx)
    }

    /// Run `f` in a write transaction, committed (durably) only if `f` succeeds.
    pub fn write<T>(&self, f: impl FnOnce(&mut WriteTx) -> Result<T>) -> Result<T> {
        let mut tx = WriteTx {
            tx: self.db.begin_write()?,
        };
        match f(&mut tx) {
            Ok(v) => {
                tx.tx.commit()?;
                Ok(v)
            }
            Err(e) => {
                if let Err(abort) = tx.tx.abort() {
                    tracing::error!(%abort, "aborting a metadata transaction failed");
                }
                Err(e)
            }
        }
    }
}

macro_rules! reads {
    () => {
        /// The record of `key`, if any.
        pub fn get(&self, key: &str) -> Result<Option<Record>> {
            let t = self.tx.open_table(SNAPSHOTS)?;
            let v = t.get(key)?;
            v.map(|v| decode(key, v.value())).transpose()
        }

        /// The record of `key`, or NotFound.
        pub fn require(&self, key: &str) -> Result<Record> {
            self.get(key)?
                .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))
        }

        /// The parent chain of a record, immediate parent first.
        pub fn parents(&self, rec: &Record) -> Result<Vec<(String, Record)>> {
            let mut out = Vec::new();
            let mut next = rec.parent.clone();
            while let Some(p) = next {
                let r = self.get(&p)?.ok_or_else(|| {
                    Error::not_found(format!("parent snapshot {p:?} does not exist"))
                })?;
                if out.len() > 1_000_000 {
                    return Err(Error::Store("parent chain loops".into()));
                }
                next = r.parent.clone();
                out.push((p, r));
            }
            Ok(out)
        }

        /// Whether snapshot `id` has children.
        pub fn has_children(&self, id: u64) -> Result<bool> {
            let t = self.tx.open_table(CHILDREN)?;
            let mut r = t.range((id, 0)..=(id, u64::MAX))?;
            Ok(r.next().transpose()?.is_some())
        }

        /// Every snapshot, in key order.
        pub fn all(&self) -> Result<Vec<(String, Record)>> {
            let t = self.tx.open_table(SNAPSHOTS)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.push((k.value().to_string(), decode(k.value(), v.value())?));
            }
            Ok(out)
        }

        /// Whether snapshot `id` exists (one lookup, not a scan).
        pub fn is_live(&self, id: u64) -> Result<bool> {
            let t = self.tx.open_table(IDS)?;
            Ok(t.get(id)?.is_some())
        }

        /// Live ids and their keys.
        pub fn id_map(&self) -> Result<HashMap<u64, String>> {
            let t = self.tx.open_table(IDS)?;
            let mut out = HashMap::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.insert(k.value(), v.value().to_string());
            }
            Ok(out)
        }
    };
}

impl ReadTx {
    reads!();
}

impl WriteTx {
    reads!();

    fn put(&mut self, key: &str, rec: &Record) -> Result<()> {
        let mut t = self.tx.open_table(SNAPSHOTS)?;
        t.insert(key, encode(rec).as_slice())?;
        Ok(())
    }

    /// Create an active snapshot or a view. The parent, if any, must be committed.
    pub fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        writable_size: Option<u64>,
    ) -> Result<Record> {
        if kind == Kind::Committed {
            return Err(Error::invalid_argument(
                "snapshot kind must be active or view",
            ));
        }
        let parent_rec = match parent {
            Some(p) => {
                let r = self.get(p)?.ok_or_else(|| {
                    Error::not_found(format!("parent snapshot {p:?} does not exist"))
                })?;
                if r.kind != Kind::Committed {
                    return Err(Error::invalid_argument(format!(
                        "parent {p:?} is not a committed snapshot"
                    )));
                }
                Some(r)
            }
            None => None,
        };
        if self.get(key)?.is_some() {
            return Err(Error::already_exists(format!(
                "snapshot {key:?} already exists"
            )));
        }
        let id = {
            let mut meta = self.tx.open_table(META)?;
            let id = meta.get(NEXT_ID_KEY)?.map(|v| v.value()).unwrap_or(1);
            meta.insert(NEXT_ID_KEY, id + 1)?;
            id
        };
        let now = Timestamp::now();
        let rec = Record {
            id,
            kind,
            parent: parent.map(str::to_string),
            labels,
            created: now,
            updated: now,
            size: 0,
            inodes: 0,
            layer: None,
            writable_size,
            flattened: false,
            fsmeta: None,
        };
        self.put(key, &rec)?;
        self.tx.open_table(IDS)?.insert(id, key)?;
        if let Some(p) = parent_rec {
            self.tx.open_table(CHILDREN)?.insert((p.id, id), ())?;
        }
        Ok(rec)
    }

    /// Turn active snapshot `key` into committed snapshot `name` (same id). Labels are
    /// replaced by `labels`. `rebase` gives a parent to a parentless snapshot (parallel
    /// unpack); naming a different parent than it has is an error.
    pub fn commit_active(
        &mut self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        rebase: Option<&str>,
        usage: (u64, u64),
        layer: LayerMeta,
    ) -> Result<Record> {
        if self.get(name)?.is_some() {
            return Err(Error::already_exists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let mut rec = self.require(key)?;
        if rec.kind != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        if let Some(p) = rebase.filter(|p| !p.is_empty()) {
            match &rec.parent {
                Some(cur) if cur == p => {}
                Some(cur) => {
                    return Err(Error::invalid_argument(format!(
                        "cannot rebase snapshot {key:?} onto {p:?}: it already has parent {cur:?}"
                    )));
                }
                None => {
                    let pr = self.get(p)?.ok_or_else(|| {
                        Error::not_found(format!("parent snapshot {p:?} does not exist"))
                    })?;
                    if pr.kind != Kind::Committed {
                        return Err(Error::invalid_argument(format!(
                            "parent {p:?} is not a committed snapshot"
                        )));
                    }
                    self.tx.open_table(CHILDREN)?.insert((pr.id, rec.id), ())?;
                    rec.parent = Some(p.to_string());
                }
            }
        }
        let now = Timestamp::now();
        rec.kind = Kind::Committed;
        rec.labels = labels;
        rec.created = now;
        rec.updated = now;
        rec.size = usage.0;
        rec.inodes = usage.1;
        rec.layer = Some(layer);
        rec.writable_size = None;
        self.tx.open_table(SNAPSHOTS)?.remove(key)?;
        self.put(name, &rec)?;
        self.tx.open_table(IDS)?.insert(rec.id, name)?;
        Ok(rec)
    }

    /// Record what Apply measured of the layer it wrote into active snapshot `key` (id `id`):
    /// the anchors later reads and its Commit are checked against.
    pub fn record_applied(&mut self, key: &str, id: u64, layer: LayerMeta) -> Result<()> {
        let mut rec = self.require(key)?;
        if rec.id != id || rec.kind != Kind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is no longer the active snapshot the layer was written for"
            )));
        }
        rec.layer = Some(layer);
        rec.updated = Timestamp::now();
        self.put(key, &rec)
    }

    /// Remove `key`; FailedPrecondition if it has children.
    pub fn remove(&mut self, key: &str) -> Result<Record> {
        let rec = self.require(key)?;
        if self.has_children(rec.id)? {
            return Err(Error::failed_precondition(format!(
                "cannot remove snapshot {key:?}: it has children"
            )));
        }
        if let Some(p) = &rec.parent
            && let Some(pr) = self.get(p)?
        {
            self.tx.open_table(CHILDREN)?.remove((pr.id, rec.id))?;
        }
        self.tx.open_table(SNAPSHOTS)?.remove(key)?;
        self.tx.open_table(IDS)?.remove(rec.id)?;
        Ok(rec)
    }

    /// Record the flattened chain built for committed snapshot `key` (id `id`), once its file is
    /// durable; refused when the snapshot is gone or is another one by now.
    pub fn record_fsmeta(&mut self, key: &str, id: u64, meta: LayerMeta) -> Result<()> {
        let mut rec = self.require(key)?;
        if rec.id != id || rec.kind != Kind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is no longer the committed snapshot fsmeta was built for"
            )));
        }
        rec.fsmeta = Some(meta);
        self.put(key, &rec)
    }

    /// Replace a record (labels and times; the caller keeps id, kind and parent).
    pub fn replace(&mut self, key: &str, rec: &Record) -> Result<()> {
        self.put(key, rec)
    }
}

#[cfg(test)]
mod tests;
