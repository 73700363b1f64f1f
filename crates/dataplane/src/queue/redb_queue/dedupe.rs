//! Which dedupe keys the embedded queue remembers, and since when.
//!
//! The file holds each remembered key once, in time order (`DEDUPE_BY_TIME`): a new key
//! lands at the end of that B-tree, so a commit rewrites the same few pages however many
//! keys a day's window holds. The lookup by key is [`DedupeIndex`], in memory, rebuilt
//! from that table at open. Earlier versions kept a second table keyed by the key itself;
//! with random provider ids every new key rewrote a random leaf of it, so the bytes written
//! per event and the time per commit grew with the keys remembered (BENCHMARKS.md, "What
//! grew"). Opening such a file drops that table.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use redb::{ReadableTable, TableDefinition};

use super::storage;
use crate::queue::QueueError;

/// (received ms, dedupe entry) → (): every remembered key, oldest first.
pub(super) const DEDUPE_BY_TIME: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("dedupe_by_time");
/// dedupe entry → received ms: the table keyed by key of earlier versions.
pub(super) const DEDUPE_BY_KEY_V1: TableDefinition<&str, u64> = TableDefinition::new("dedupe");

/// Shards of the index. A map that grows rehashes every key it holds at once; at a
/// million keys that held the writer, and so every enqueue, for tens of milliseconds. A
/// shard's resize moves a sixty-fourth of them.
const SHARDS: usize = 64;

/// The digests are uniform already (and keyed per process, so no client can aim at one
/// bucket): the maps use them as their hash.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, digest: u64) {
        self.0 = digest;
    }
}

type Shard = HashMap<u64, u64, BuildHasherDefault<Prehashed>>;

/// The shard of `digest`, chosen by bits a map does not use itself: it places entries by
/// the low bits and tells them apart by the top seven.
fn shard_of(digest: u64) -> usize {
    (digest >> 32) as usize % SHARDS
}

/// A 64-bit digest of each remembered entry → when it was received (ms). Digests may
/// collide, so a match is confirmed in `DEDUPE_BY_TIME` before an event is called a
/// duplicate: a collision can only cost a duplicate delivery, never an event.
pub(super) struct DedupeIndex {
    hasher: RandomState,
    shards: Vec<Shard>,
    /// What the open batch changed (digest, value before), undone when it does not commit.
    undo: Vec<(u64, Option<u64>)>,
}

impl DedupeIndex {
    /// Reads every remembered key from the file.
    pub fn load(by_time: &impl ReadableTable<(u64, &'static str), ()>) -> Result<Self, QueueError> {
        let keys = usize::try_from(by_time.len().map_err(storage)?).unwrap_or(0);
        let shard = || Shard::with_capacity_and_hasher(keys / SHARDS, Default::default());
        let mut index = Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| shard()).collect(),
            undo: Vec::new(),
        };
        for item in by_time.iter().map_err(storage)? {
            let (k, _) = item.map_err(storage)?;
            let (ms, entry) = k.value();
            // Oldest first: a later entry with the same digest replaces an earlier one.
            let digest = index.hasher.hash_one(entry);
            index.shard(digest).insert(digest, ms);
        }
        Ok(index)
    }

    fn shard(&mut self, digest: u64) -> &mut Shard {
        &mut self.shards[shard_of(digest)]
    }

    /// When `entry` was last remembered, confirmed in `by_time` (the open transaction's
    /// view, so keys added earlier in the same batch count).
    pub fn received(
        &self,
        by_time: &impl ReadableTable<(u64, &'static str), ()>,
        entry: &str,
    ) -> Result<Option<u64>, QueueError> {
        let digest = self.hasher.hash_one(entry);
        let Some(&ms) = self.shards[shard_of(digest)].get(&digest) else {
            return Ok(None);
        };
        let stored = by_time.get((ms, entry)).map_err(storage)?.is_some();
        Ok(stored.then_some(ms))
    }

    /// Remembers `entry` as received at `ms`, until the batch is aborted.
    pub fn remember(&mut self, entry: &str, ms: u64) {
        let digest = self.hasher.hash_one(entry);
        let before = self.shard(digest).insert(digest, ms);
        self.undo.push((digest, before));
    }

    /// The batch committed: its keys stay.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// The batch did not commit: forgets what it remembered.
    pub fn abort(&mut self) {
        let undo = std::mem::take(&mut self.undo);
        for (digest, before) in undo.into_iter().rev() {
            let shard = self.shard(digest);
            match before {
                Some(ms) => shard.insert(digest, ms),
                None => shard.remove(&digest),
            };
        }
    }

    /// Forgets `entry` if `ms` is still when it was last remembered (its removal from the
    /// file has committed); false when a later receipt of it is remembered.
    pub fn forget(&mut self, entry: &str, ms: u64) -> bool {
        let digest = self.hasher.hash_one(entry);
        let shard = self.shard(digest);
        if shard.get(&digest) != Some(&ms) {
            return false;
        }
        shard.remove(&digest);
        true
    }

    /// Keys remembered.
    pub fn len(&self) -> u64 {
        self.shards.iter().map(|s| s.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase};

    use super::*;

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("d.redb")).unwrap();
        (dir, db)
    }

    #[test]
    fn a_key_counts_only_once_its_time_entry_is_in_the_file() {
        let (_dir, db) = db();
        let txn = db.begin_write().unwrap();
        {
            let mut by_time = txn.open_table(DEDUPE_BY_TIME).unwrap();
            let mut index = DedupeIndex::load(&by_time).unwrap();
            // In memory only (as a colliding digest would be): not a duplicate.
            index.remember("ns/ep\na", 5);
            assert_eq!(index.received(&by_time, "ns/ep\na").unwrap(), None);
            by_time.insert((5, "ns/ep\na"), ()).unwrap();
            assert_eq!(index.received(&by_time, "ns/ep\na").unwrap(), Some(5));
            assert_eq!(index.received(&by_time, "ns/ep\nb").unwrap(), None);
        }
        txn.commit().unwrap();
    }

    #[test]
    fn an_aborted_batch_leaves_nothing_remembered_and_a_committed_one_survives_reload() {
        let (_dir, db) = db();
        let txn = db.begin_write().unwrap();
        {
            let mut by_time = txn.open_table(DEDUPE_BY_TIME).unwrap();
            let mut index = DedupeIndex::load(&by_time).unwrap();
            by_time.insert((1, "k"), ()).unwrap();
            index.remember("k", 1);
            index.commit();
            // A later batch re-remembers k and adds j, then fails.
            index.remember("k", 9);
            index.remember("j", 9);
            index.abort();
            by_time.insert((9, "k"), ()).unwrap();
            by_time.insert((9, "j"), ()).unwrap();
            assert_eq!(index.received(&by_time, "k").unwrap(), Some(1));
            assert_eq!(index.received(&by_time, "j").unwrap(), None);
            assert_eq!(index.len(), 1);
            by_time.remove((9, "k")).unwrap();
            by_time.remove((9, "j")).unwrap();
        }
        txn.commit().unwrap();
        let read = db.begin_read().unwrap();
        let by_time = read.open_table(DEDUPE_BY_TIME).unwrap();
        let index = DedupeIndex::load(&by_time).unwrap();
        assert_eq!(index.received(&by_time, "k").unwrap(), Some(1));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn forgetting_an_old_receipt_keeps_a_newer_one() {
        let (_dir, db) = db();
        let read = db.begin_write().unwrap();
        let by_time = read.open_table(DEDUPE_BY_TIME).unwrap();
        let mut index = DedupeIndex::load(&by_time).unwrap();
        index.remember("k", 1);
        index.remember("k", 7);
        index.commit();
        assert!(
            !index.forget("k", 1),
            "the receipt at 7 is the one remembered"
        );
        assert_eq!(index.len(), 1);
        assert!(index.forget("k", 7));
        assert_eq!(index.len(), 0);
    }
}
