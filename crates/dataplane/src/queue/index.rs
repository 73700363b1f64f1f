//! The in-memory view of what the store holds, sized by work in flight rather than by
//! history: per endpoint, counts (waiting events, their bytes, dead letters), the leased
//! events, and a bounded *window* of the earliest due ready events. The file keeps the
//! whole ready set ordered by (endpoint, due, seq); the window is refilled from it when it
//! runs dry, so a restart with a million stored events loads counts, not events.
//!
//! Changed only by the writer after a commit, so a lease never sees an uncommitted event.
//! A refill reads the file under [`Index::gate`]'s read side, which the writer holds from
//! its commit until the commit's effects are applied: a refill sees either none or all of
//! a commit's changes together with their effects. Sharded per endpoint so that endpoints
//! never contend with each other.
//!
//! The index also keeps the records of ready events it was handed by the writer, up to a
//! memory budget, so that a lease usually needs no read of the file.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use foldhash::HashMap;
use tokio::sync::Notify;

use super::record::Record;
use super::{EndpointKey, QueueDepth};

/// (due ms, seq): the order events are leased in.
pub(super) type Slot = (u64, u64);

/// Reads up to `max` ready slots of an endpoint from the file, in order, strictly after
/// `after` (from the first when `None`).
pub(super) type Loader =
    Box<dyn Fn(&EndpointKey, Option<Slot>, usize) -> Result<Vec<Slot>, String> + Send + Sync>;

/// Persisted per-endpoint counts, as the file holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    /// Waiting events: ready or leased.
    pub waiting: u64,
    /// Stored size of the waiting events.
    pub bytes: u64,
    pub dead: u64,
}

/// What one [`Index::lease`] took.
pub(super) struct Leased {
    /// seq and, where the index held it, the committed record.
    pub events: Vec<(u64, Option<Record>)>,
    /// Fewer than asked for because the window ran dry while the file holds more.
    pub dry: bool,
}

/// What the window holds of the endpoint's ready slots in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loaded {
    /// Every ready slot up to and including this one (none yet when `None`).
    Upto(Option<Slot>),
    /// Every ready slot.
    All,
}

impl Loaded {
    fn covers(self, slot: Slot) -> bool {
        match self {
            Loaded::All => true,
            Loaded::Upto(u) => u.is_some_and(|u| slot <= u),
        }
    }
}

pub(super) struct EndpointIndex {
    window: BTreeSet<Slot>,
    loaded: Loaded,
    /// seq → the slot it was leased from, so a released lease goes back where it was.
    leased: HashMap<u64, Slot>,
    counts: Counts,
    /// seq → committed record of a window event, within the index's memory budget.
    cached: HashMap<u64, Record>,
}

impl EndpointIndex {
    fn dry(&self) -> bool {
        self.window.is_empty() && self.loaded != Loaded::All
    }
}

impl Default for EndpointIndex {
    fn default() -> Self {
        Self {
            window: BTreeSet::new(),
            // An endpoint the file had no counts for at open has nothing in the file.
            loaded: Loaded::All,
            leased: HashMap::default(),
            counts: Counts::default(),
            cached: HashMap::default(),
        }
    }
}

pub(super) struct Shard {
    pub state: Mutex<EndpointIndex>,
    /// Woken when an event becomes due earlier than a waiter may think.
    pub notify: Notify,
}

pub(super) struct Index {
    shards: RwLock<HashMap<EndpointKey, Arc<Shard>>>,
    waiting: AtomicU64,
    bytes: AtomicU64,
    leased: AtomicU64,
    dead: AtomicU64,
    cached_bytes: AtomicU64,
    cache_budget: u64,
    /// Most ready slots a window holds after a refill; it may grow to twice this before
    /// its latest slots are dropped back to the file.
    window: usize,
    /// Held for reading by a refill, for writing by the writer from commit to effects.
    pub gate: RwLock<()>,
    loader: Loader,
}

impl Index {
    /// An index that keeps at most `cache_budget` bytes of ready records and about
    /// `window` ready slots per endpoint in memory, and refills from `loader`.
    pub fn new(cache_budget: u64, window: usize, loader: Loader) -> Self {
        Self {
            shards: RwLock::default(),
            waiting: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            leased: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            cached_bytes: AtomicU64::new(0),
            cache_budget,
            window: window.max(1),
            gate: RwLock::new(()),
            loader,
        }
    }

    pub fn shard(&self, key: &EndpointKey) -> Arc<Shard> {
        super::per_endpoint(&self.shards, key, || Shard {
            state: Mutex::new(EndpointIndex::default()),
            notify: Notify::new(),
        })
    }

    pub fn existing_shard(&self, key: &EndpointKey) -> Option<Arc<Shard>> {
        self.shards.read().expect("index lock").get(key).cloned()
    }

    /// The counts the file holds for `key` at open.
    pub fn load_counts(&self, key: &EndpointKey, c: Counts) {
        {
            let shard = self.shard(key);
            let mut st = shard.state.lock().expect("shard lock");
            st.counts = c;
            if c.waiting > 0 {
                st.loaded = Loaded::Upto(None);
            }
        }
        self.waiting.fetch_add(c.waiting, Ordering::Relaxed);
        self.bytes.fetch_add(c.bytes, Ordering::Relaxed);
        self.dead.fetch_add(c.dead, Ordering::Relaxed);
    }

    pub fn keys(&self) -> Vec<EndpointKey> {
        self.shards
            .read()
            .expect("index lock")
            .iter()
            .filter(|(_, s)| {
                let st = s.state.lock().expect("shard lock");
                st.counts.waiting > 0 || st.counts.dead > 0
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Puts a ready slot into the window when the window covers it (otherwise the file
    /// holds it until a refill); drops the window's latest slots past twice its size.
    fn place(&self, st: &mut EndpointIndex, slot: Slot, record: Option<Record>) {
        if !st.loaded.covers(slot) {
            return;
        }
        st.window.insert(slot);
        if let Some(rec) = record {
            let weight = rec.weight();
            let used = self.cached_bytes.fetch_add(weight, Ordering::Relaxed);
            if used + weight <= self.cache_budget {
                st.cached.insert(slot.1, rec);
            } else {
                self.cached_bytes.fetch_sub(weight, Ordering::Relaxed);
            }
        }
        if st.window.len() > 2 * self.window {
            while st.window.len() > self.window {
                let Some((_, seq)) = st.window.pop_last() else {
                    break;
                };
                self.uncache(st, seq);
            }
            st.loaded = Loaded::Upto(st.window.last().copied());
        }
    }

    fn uncache(&self, st: &mut EndpointIndex, seq: u64) {
        if let Some(r) = st.cached.remove(&seq) {
            self.cached_bytes.fetch_sub(r.weight(), Ordering::Relaxed);
        }
    }

    /// Takes a ready slot out of the window or the leases, whichever holds it.
    fn unplace(&self, st: &mut EndpointIndex, slot: Slot) {
        if st.leased.remove(&slot.1).is_some() {
            self.leased.fetch_sub(1, Ordering::Relaxed);
        } else {
            st.window.remove(&slot);
        }
        self.uncache(st, slot.1);
    }

    fn add_counts(&self, st: &mut EndpointIndex, waiting: i64, bytes: i64, dead: i64) {
        fn apply(n: &mut u64, total: &AtomicU64, d: i64) {
            if d >= 0 {
                *n += d as u64;
                total.fetch_add(d as u64, Ordering::Relaxed);
            } else {
                let d = d.unsigned_abs().min(*n);
                *n -= d;
                total.fetch_sub(d, Ordering::Relaxed);
            }
        }
        apply(&mut st.counts.waiting, &self.waiting, waiting);
        apply(&mut st.counts.bytes, &self.bytes, bytes);
        apply(&mut st.counts.dead, &self.dead, dead);
    }

    /// A new event of `bytes` stored bytes is due at `slot`.
    pub fn added(&self, key: &EndpointKey, slot: Slot, bytes: u64, record: Option<Record>) {
        let shard = self.shard(key);
        {
            let mut st = shard.state.lock().expect("shard lock");
            self.add_counts(&mut st, 1, bytes as i64, 0);
            self.place(&mut st, slot, record);
        }
        shard.notify.notify_one();
    }

    /// A waiting event at `slot` is gone (acked or purged).
    pub fn removed(&self, key: &EndpointKey, slot: Slot, bytes: u64) {
        self.taken_out(key, slot, bytes, 0);
    }

    /// A waiting event at `slot` left the waiting ones, as `dead` more dead letters.
    fn taken_out(&self, key: &EndpointKey, slot: Slot, bytes: u64, dead: i64) {
        let shard = self.shard(key);
        let mut st = shard.state.lock().expect("shard lock");
        self.unplace(&mut st, slot);
        self.add_counts(&mut st, -1, -(bytes as i64), dead);
    }

    /// A waiting event moved from `old` to `new` and its stored size changed.
    pub fn moved(&self, key: &EndpointKey, old: Slot, new: Slot, bytes: (u64, u64), rec: Record) {
        let shard = self.shard(key);
        {
            let mut st = shard.state.lock().expect("shard lock");
            self.unplace(&mut st, old);
            self.add_counts(&mut st, 0, bytes.1 as i64 - bytes.0 as i64, 0);
            self.place(&mut st, new, Some(rec));
        }
        shard.notify.notify_one();
    }

    /// A waiting event at `slot` became a dead letter.
    pub fn died(&self, key: &EndpointKey, slot: Slot, bytes: u64) {
        self.taken_out(key, slot, bytes, 1);
    }

    /// A dead letter is waiting again at `slot` (replay).
    pub fn revived(&self, key: &EndpointKey, slot: Slot, bytes: u64) {
        let shard = self.shard(key);
        {
            let mut st = shard.state.lock().expect("shard lock");
            self.add_counts(&mut st, 1, bytes as i64, -1);
            self.place(&mut st, slot, None);
        }
        shard.notify.notify_one();
    }

    /// A dead letter was deleted (pruned or purged).
    pub fn dead_removed(&self, key: &EndpointKey) {
        let shard = self.shard(key);
        let mut st = shard.state.lock().expect("shard lock");
        self.add_counts(&mut st, 0, 0, -1);
    }

    /// The window of `key` ran dry while the file holds more of its ready events: a lease
    /// or a due time needs [`Index::refill`] first.
    pub fn dry(&self, key: &EndpointKey) -> bool {
        self.existing_shard(key)
            .is_some_and(|s| s.state.lock().expect("shard lock").dry())
    }

    /// Refills the dry window of `key` from the file; true when the window holds slots
    /// afterwards. It reads the file and waits out a commit in progress (the gate), so a
    /// caller on the async runtime runs it on a blocking thread: under a slow disk that
    /// wait lasts as long as the commit's sync.
    pub fn refill(&self, key: &EndpointKey) -> bool {
        let Some(shard) = self.existing_shard(key) else {
            return false;
        };
        let _gate = self.gate.read().expect("index gate");
        let after = {
            let st = shard.state.lock().expect("shard lock");
            match st.loaded {
                _ if !st.window.is_empty() => return true,
                Loaded::All => return false,
                Loaded::Upto(u) => u,
            }
        };
        let slots = match (self.loader)(key, after, self.window) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %key, "reading ready events from the queue file failed");
                return false;
            }
        };
        let mut st = shard.state.lock().expect("shard lock");
        st.loaded = if slots.len() < self.window {
            Loaded::All
        } else {
            Loaded::Upto(slots.last().copied())
        };
        for slot in slots {
            if !st.leased.contains_key(&slot.1) {
                st.window.insert(slot);
            }
        }
        !st.window.is_empty()
    }

    /// Takes up to `max` due events of the window into the leased set, with their records
    /// where cached. Never reads the file: when the window runs dry first and the file
    /// holds more, the answer says so and the caller refills.
    pub fn lease(&self, key: &EndpointKey, max: usize, now_ms: u64) -> Leased {
        let mut out = Leased {
            events: Vec::new(),
            dry: false,
        };
        let Some(shard) = self.existing_shard(key) else {
            return out;
        };
        let mut st = shard.state.lock().expect("shard lock");
        while out.events.len() < max {
            match st.window.first() {
                Some(&(due, seq)) if due <= now_ms => {
                    st.window.pop_first();
                    st.leased.insert(seq, (due, seq));
                    let rec = st.cached.remove(&seq);
                    if let Some(r) = &rec {
                        self.cached_bytes.fetch_sub(r.weight(), Ordering::Relaxed);
                    }
                    self.leased.fetch_add(1, Ordering::Relaxed);
                    out.events.push((seq, rec));
                }
                _ => break,
            }
        }
        out.dry = out.events.len() < max && st.dry();
        out
    }

    /// Ends a lease without an attempt: the event is due again when it was.
    pub fn release(&self, key: &EndpointKey, seq: u64) -> bool {
        let Some(shard) = self.existing_shard(key) else {
            return false;
        };
        let mut st = shard.state.lock().expect("shard lock");
        let Some(slot) = st.leased.remove(&seq) else {
            return false;
        };
        self.leased.fetch_sub(1, Ordering::Relaxed);
        self.place(&mut st, slot, None);
        drop(st);
        shard.notify.notify_one();
        true
    }

    /// Ends a lease whose event turned out to be gone from the file.
    pub fn forget_lease(&self, key: &EndpointKey, seq: u64) {
        if let Some(s) = self.existing_shard(key)
            && s.state
                .lock()
                .expect("shard lock")
                .leased
                .remove(&seq)
                .is_some()
        {
            self.leased.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The earliest due time in the window of `key`; `None` when the window is empty
    /// (see [`Index::dry`] for whether the file holds more).
    pub fn next_due(&self, key: &EndpointKey) -> Option<u64> {
        self.existing_shard(key).and_then(|s| {
            s.state
                .lock()
                .expect("shard lock")
                .window
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

    /// Ready slots of `key` held in memory.
    #[cfg(test)]
    pub fn window_len(&self, key: &EndpointKey) -> usize {
        self.existing_shard(key)
            .map_or(0, |s| s.state.lock().expect("shard lock").window.len())
    }

    pub fn depth(&self) -> QueueDepth {
        let leased = self.leased.load(Ordering::Relaxed);
        QueueDepth {
            pending: self.waiting.load(Ordering::Relaxed).saturating_sub(leased),
            leased,
            dead_lettered: self.dead.load(Ordering::Relaxed),
        }
    }

    pub fn endpoint_depth(&self, key: &EndpointKey) -> QueueDepth {
        self.existing_shard(key)
            .map(|s| {
                let st = s.state.lock().expect("shard lock");
                let leased = st.leased.len() as u64;
                QueueDepth {
                    pending: st.counts.waiting.saturating_sub(leased),
                    leased,
                    dead_lettered: st.counts.dead,
                }
            })
            .unwrap_or_default()
    }

    /// Stored bytes of the waiting events, all endpoints.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn endpoint_bytes(&self, key: &EndpointKey) -> u64 {
        self.existing_shard(key)
            .map_or(0, |s| s.state.lock().expect("shard lock").counts.bytes)
    }
}
