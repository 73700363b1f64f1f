//! The in-memory view of what the store holds: per endpoint, which events are due when,
//! which are leased and which are dead. Rebuilt from the file on open, changed only by the
//! writer after a commit, so a lease never sees an uncommitted event. Sharded per endpoint
//! so that endpoints never contend with each other.
//!
//! The index also keeps the records of ready events it was handed by the writer, up to a
//! memory budget, so that a lease usually needs no read of the file: the writer just
//! committed them. Records past the budget, and every record after a restart, are read
//! from the file at lease time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use super::record::Record;
use super::{EndpointKey, QueueDepth};

#[derive(Clone, Copy, Debug)]
pub(super) struct DeadMeta {
    pub dead_ms: u64,
    pub received_ms: u64,
}

#[derive(Default)]
pub(super) struct EndpointIndex {
    /// (due, seq): ordered so the earliest due comes first.
    pub ready: BTreeSet<(u64, u64)>,
    /// seq → due time it had, so a released lease goes back where it was.
    pub leased: HashMap<u64, u64>,
    pub dead: BTreeMap<u64, DeadMeta>,
    /// seq → committed record of a ready event, within the index's memory budget.
    cached: HashMap<u64, Record>,
}

pub(super) struct Shard {
    pub state: Mutex<EndpointIndex>,
    /// Woken when an event becomes due earlier than a waiter may think.
    pub notify: Notify,
}

#[derive(Default)]
pub(super) struct Index {
    shards: RwLock<HashMap<EndpointKey, Arc<Shard>>>,
    pending: AtomicU64,
    leased: AtomicU64,
    dead: AtomicU64,
    cached_bytes: AtomicU64,
    cache_budget: u64,
}

impl Index {
    /// An empty index that keeps at most `cache_budget` bytes of ready records in memory.
    pub fn new(cache_budget: u64) -> Self {
        Self {
            cache_budget,
            ..Self::default()
        }
    }

    pub fn shard(&self, key: &EndpointKey) -> Arc<Shard> {
        if let Some(s) = self.shards.read().expect("index lock").get(key) {
            return s.clone();
        }
        self.shards
            .write()
            .expect("index lock")
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Shard {
                    state: Mutex::new(EndpointIndex::default()),
                    notify: Notify::new(),
                })
            })
            .clone()
    }

    pub fn existing_shard(&self, key: &EndpointKey) -> Option<Arc<Shard>> {
        self.shards.read().expect("index lock").get(key).cloned()
    }

    pub fn keys(&self) -> Vec<EndpointKey> {
        self.shards
            .read()
            .expect("index lock")
            .iter()
            .filter(|(_, s)| {
                let st = s.state.lock().expect("shard lock");
                !(st.ready.is_empty() && st.leased.is_empty() && st.dead.is_empty())
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// An event is due at `due_ms`; its committed `record`, when given and within the
    /// budget, is kept for the lease.
    pub fn add_ready(&self, key: &EndpointKey, due_ms: u64, seq: u64, record: Option<Record>) {
        let shard = self.shard(key);
        {
            let mut st = shard.state.lock().expect("shard lock");
            st.ready.insert((due_ms, seq));
            if let Some(rec) = record {
                let weight = rec.weight();
                let used = self.cached_bytes.fetch_add(weight, Ordering::Relaxed);
                if used + weight <= self.cache_budget {
                    st.cached.insert(seq, rec);
                } else {
                    self.cached_bytes.fetch_sub(weight, Ordering::Relaxed);
                }
            }
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        shard.notify.notify_one();
    }

    pub fn add_dead(&self, key: &EndpointKey, seq: u64, meta: DeadMeta) {
        self.shard(key)
            .state
            .lock()
            .expect("shard lock")
            .dead
            .insert(seq, meta);
        self.dead.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes up to `max` due events into the leased set, with their records where cached.
    pub fn lease(&self, key: &EndpointKey, max: usize, now_ms: u64) -> Vec<(u64, Option<Record>)> {
        let Some(shard) = self.existing_shard(key) else {
            return Vec::new();
        };
        let mut st = shard.state.lock().expect("shard lock");
        let mut out = Vec::new();
        while out.len() < max {
            match st.ready.first() {
                Some(&(due, seq)) if due <= now_ms => {
                    st.ready.pop_first();
                    st.leased.insert(seq, due);
                    let rec = st.cached.remove(&seq);
                    if let Some(r) = &rec {
                        self.cached_bytes.fetch_sub(r.weight(), Ordering::Relaxed);
                    }
                    out.push((seq, rec));
                }
                _ => break,
            }
        }
        let n = out.len() as u64;
        self.pending.fetch_sub(n, Ordering::Relaxed);
        self.leased.fetch_add(n, Ordering::Relaxed);
        out
    }

    /// Ends a lease; returns whether it existed.
    pub fn unlease(&self, key: &EndpointKey, seq: u64) -> bool {
        let removed = self.existing_shard(key).is_some_and(|s| {
            s.state
                .lock()
                .expect("shard lock")
                .leased
                .remove(&seq)
                .is_some()
        });
        if removed {
            self.leased.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Ends a lease without an attempt: the event is due again when it was.
    pub fn release(&self, key: &EndpointKey, seq: u64) -> bool {
        let Some(shard) = self.existing_shard(key) else {
            return false;
        };
        let mut st = shard.state.lock().expect("shard lock");
        let Some(due) = st.leased.remove(&seq) else {
            return false;
        };
        st.ready.insert((due, seq));
        drop(st);
        self.leased.fetch_sub(1, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Relaxed);
        shard.notify.notify_one();
        true
    }

    pub fn remove_dead(&self, key: &EndpointKey, seq: u64) -> bool {
        let removed = self.existing_shard(key).is_some_and(|s| {
            s.state
                .lock()
                .expect("shard lock")
                .dead
                .remove(&seq)
                .is_some()
        });
        if removed {
            self.dead.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    pub fn dead_matching(&self, key: &EndpointKey, pred: impl Fn(&DeadMeta) -> bool) -> Vec<u64> {
        self.existing_shard(key)
            .map(|s| {
                s.state
                    .lock()
                    .expect("shard lock")
                    .dead
                    .iter()
                    .filter(|(_, m)| pred(m))
                    .map(|(seq, _)| *seq)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every event of `key`: ready, leased and dead.
    pub fn all_seqs(&self, key: &EndpointKey) -> Vec<u64> {
        self.existing_shard(key)
            .map(|s| {
                let st = s.state.lock().expect("shard lock");
                st.ready
                    .iter()
                    .map(|(_, seq)| *seq)
                    .chain(st.leased.keys().copied())
                    .chain(st.dead.keys().copied())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops `key`'s events from the index (they were deleted from the file).
    pub fn forget(&self, key: &EndpointKey, seqs: &[u64]) {
        let Some(shard) = self.existing_shard(key) else {
            return;
        };
        let mut st = shard.state.lock().expect("shard lock");
        let (mut ready, mut leased, mut dead, mut bytes) = (0u64, 0u64, 0u64, 0u64);
        let gone: std::collections::HashSet<u64> = seqs.iter().copied().collect();
        st.ready.retain(|(_, seq)| {
            let keep = !gone.contains(seq);
            ready += u64::from(!keep);
            keep
        });
        st.leased.retain(|seq, _| {
            let keep = !gone.contains(seq);
            leased += u64::from(!keep);
            keep
        });
        st.dead.retain(|seq, _| {
            let keep = !gone.contains(seq);
            dead += u64::from(!keep);
            keep
        });
        st.cached.retain(|seq, rec| {
            let keep = !gone.contains(seq);
            if !keep {
                bytes += rec.weight();
            }
            keep
        });
        self.pending.fetch_sub(ready, Ordering::Relaxed);
        self.leased.fetch_sub(leased, Ordering::Relaxed);
        self.dead.fetch_sub(dead, Ordering::Relaxed);
        self.cached_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The earliest due time of `key`, if anything is waiting.
    pub fn next_due(&self, key: &EndpointKey) -> Option<u64> {
        self.existing_shard(key).and_then(|s| {
            s.state
                .lock()
                .expect("shard lock")
                .ready
                .first()
                .map(|(d, _)| *d)
        })
    }

    /// Records of `key` held in memory.
    #[cfg(test)]
    pub fn cached_len(&self, key: &EndpointKey) -> usize {
        self.existing_shard(key)
            .map_or(0, |s| s.state.lock().expect("shard lock").cached.len())
    }

    pub fn depth(&self) -> QueueDepth {
        QueueDepth {
            pending: self.pending.load(Ordering::Relaxed),
            leased: self.leased.load(Ordering::Relaxed),
            dead_lettered: self.dead.load(Ordering::Relaxed),
        }
    }

    pub fn endpoint_depth(&self, key: &EndpointKey) -> QueueDepth {
        self.existing_shard(key)
            .map(|s| {
                let st = s.state.lock().expect("shard lock");
                QueueDepth {
                    pending: st.ready.len() as u64,
                    leased: st.leased.len() as u64,
                    dead_lettered: st.dead.len() as u64,
                }
            })
            .unwrap_or_default()
    }
}
