//! Per-key locks: a Commit and a Remove of the same snapshot never overlap, so a layer is
//! never converted while its directory is being deleted.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
pub(crate) struct KeyLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

pub(crate) struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    keys: Vec<String>,
}

impl KeyLocks {
    /// Lock every key in `keys` (sorted, so two callers cannot deadlock).
    pub(crate) fn lock(&self, keys: &[&str]) -> KeyGuard<'_> {
        let mut keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        keys.sort();
        keys.dedup();
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while keys.iter().any(|k| busy.contains(k)) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        for k in &keys {
            busy.insert(k.clone());
        }
        KeyGuard { locks: self, keys }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            busy.remove(k);
        }
        self.locks.freed.notify_all();
    }
}
