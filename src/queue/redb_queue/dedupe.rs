//! The lookup side of the embedded queue's dedupe keys, in memory.
//!
//! The file keeps each key once, in `dedupe_by_time` ((received ms, entry) → ()), which is
//! written in time order: an insert touches the table's last page only. A table keyed by
//! the entry itself, which the queue had before, is written at a random place per new key:
//! each commit copied and wrote about one page per event, more as the table grew, and the
//! queue's rate fell within seconds of sustained load (BENCHMARKS.md).
//!
//! This map, rebuilt from `dedupe_by_time` on open, holds a 64-bit hash of each entry and
//! its received time. A hit is confirmed in the table before an event is called a
//! duplicate, so a hash collision never drops an event: at worst the other key of the
//! pair loses its dedupe, and a retry of it is delivered again. About 20 bytes a key.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

#[derive(Default)]
pub(super) struct DedupeMap {
    hasher: RandomState,
    by_hash: HashMap<u64, u64>,
    /// Changes since [`DedupeMap::begin`], to undo when the batch's commit fails.
    undo: Vec<(u64, Option<u64>)>,
}

impl DedupeMap {
    fn hash(&self, entry: &str) -> u64 {
        self.hasher.hash_one(entry)
    }

    pub fn len(&self) -> u64 {
        self.by_hash.len() as u64
    }

    /// The received time of `entry`, or of another entry with the same hash: confirm it.
    pub fn get(&self, entry: &str) -> Option<u64> {
        self.by_hash.get(&self.hash(entry)).copied()
    }

    /// Starts a batch whose changes [`DedupeMap::rollback`] can undo.
    pub fn begin(&mut self) {
        self.undo.clear();
    }

    pub fn insert(&mut self, entry: &str, received_ms: u64) {
        let h = self.hash(entry);
        let old = self.by_hash.insert(h, received_ms);
        self.undo.push((h, old));
    }

    /// The batch did not commit: the map goes back to what the file holds.
    pub fn rollback(&mut self) {
        while let Some((h, old)) = self.undo.pop() {
            match old {
                Some(ms) => self.by_hash.insert(h, ms),
                None => self.by_hash.remove(&h),
            };
        }
    }

    /// Forgets `entry` if it still maps to `received_ms` (it was not seen again since).
    pub fn forget(&mut self, entry: &str, received_ms: u64) {
        let h = self.hash(entry);
        if self.by_hash.get(&h) == Some(&received_ms) {
            self.by_hash.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_restores_what_the_batch_changed() {
        let mut m = DedupeMap::default();
        m.begin();
        m.insert("a", 1);
        m.begin();
        m.insert("a", 5);
        m.insert("b", 2);
        m.rollback();
        assert_eq!(m.get("a"), Some(1));
        assert_eq!(m.get("b"), None);
        m.forget("a", 2);
        assert_eq!(m.get("a"), Some(1), "a newer time is kept");
        m.forget("a", 1);
        assert_eq!(m.len(), 0);
    }
}
