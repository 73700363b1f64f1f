//! The queue file's own index of its events, kept in the same transactions as the records:
//! ready events ordered by (endpoint, due, seq), dead letters by (endpoint, seq) with the
//! times a replay or prune filters on, and per-endpoint counts. With them, opening the file
//! reads counts instead of every record, and the in-memory index holds only a window.
//!
//! Files written before this index existed (no `index_format` in the meta table) are
//! indexed once on open, in slices, before anything is served; a crash during that pass
//! simply starts it again.

use std::collections::HashMap;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use super::super::EndpointKey;
use super::super::index::{Counts, Slot};
use super::super::record::{Record, STATE_DEAD};
use super::{EVENTS, META, storage};
use crate::queue::QueueError;

// Endpoints are keyed by the bytes of their `namespace/name`: a `&str` key checks both
// sides of every comparison for UTF-8, dozens of times per event (BENCHMARKS.md).

/// (endpoint, due ms, seq) → (): the ready events, leased ones included.
const READY: TableDefinition<(&[u8], u64, u64), ()> = TableDefinition::new("ready_by_endpoint_v3");
/// (endpoint, seq) → (dead ms, received ms).
const DEAD: TableDefinition<(&[u8], u64), (u64, u64)> = TableDefinition::new("dead_by_endpoint_v3");
/// endpoint → (waiting events, their stored bytes, dead letters).
const COUNTS: TableDefinition<&[u8], (u64, u64, u64)> = TableDefinition::new("endpoint_counts_v3");
/// The same three tables of format 2, keyed by `&str`: dropped when [`upgrade`] indexes
/// such a file again.
pub(super) const FORMAT_2_TABLES: [&str; 3] =
    ["ready_by_endpoint", "dead_by_endpoint", "endpoint_counts"];

pub(super) const META_FORMAT: &str = "index_format";
/// Records the last indexing pass could not read (they are in no count).
const META_SKIPPED: &str = "index_skipped";
/// 1: no index tables (the first versions); 2: this index keyed by `&str`; 3: this index.
const FORMAT: u64 = 3;
/// Records indexed per transaction when an older file is upgraded.
const UPGRADE_SLICE: usize = 50_000;

/// A change to what the file holds, in the terms both indexes need.
// `Added` is the common case and lives only until the commit's effects are applied;
// boxing its record would add an allocation per enqueued event.
#[allow(clippy::large_enum_variant)]
pub(super) enum Effect {
    /// A new event, with its committed record when the writer has it at hand.
    Added {
        key: EndpointKey,
        slot: Slot,
        bytes: u64,
        record: Option<Record>,
    },
    /// A waiting event is gone (acked, purged).
    Removed {
        key: EndpointKey,
        slot: Slot,
        bytes: u64,
    },
    /// A waiting event is due at another time (retried); its size is `bytes.1` now.
    Moved {
        key: EndpointKey,
        old: Slot,
        new: Slot,
        bytes: (u64, u64),
        record: Record,
    },
    /// A waiting event became a dead letter.
    Died {
        key: EndpointKey,
        slot: Slot,
        bytes: u64,
        dead_ms: u64,
        received_ms: u64,
    },
    /// A dead letter is waiting again (replayed).
    Revived {
        key: EndpointKey,
        slot: Slot,
        bytes: u64,
    },
    /// A dead letter was deleted (pruned, purged).
    DeadRemoved { key: EndpointKey, seq: u64 },
}

impl Effect {
    fn key(&self) -> &EndpointKey {
        match self {
            Effect::Added { key, .. }
            | Effect::Removed { key, .. }
            | Effect::Moved { key, .. }
            | Effect::Died { key, .. }
            | Effect::Revived { key, .. }
            | Effect::DeadRemoved { key, .. } => key,
        }
    }
}

fn endpoint_id(key: &EndpointKey) -> String {
    format!("{}/{}", key.namespace, key.name)
}

fn endpoint_of(id: &[u8]) -> EndpointKey {
    let id = String::from_utf8_lossy(id);
    let (ns, name) = id.split_once('/').unwrap_or(("", &id));
    EndpointKey::new(ns, name)
}

/// Creates the index tables.
pub(super) fn create(txn: &WriteTransaction) -> Result<(), QueueError> {
    txn.open_table(READY).map_err(storage)?;
    txn.open_table(DEAD).map_err(storage)?;
    txn.open_table(COUNTS).map_err(storage)?;
    Ok(())
}

/// Writes `effects` into the index tables of the open transaction.
pub(super) fn persist(txn: &WriteTransaction, effects: &[Effect]) -> Result<(), QueueError> {
    let mut ready = txn.open_table(READY).map_err(storage)?;
    let mut dead = txn.open_table(DEAD).map_err(storage)?;
    // Per endpoint of the batch (mostly one): its id, formatted once, and the change to
    // its counts.
    let mut deltas: foldhash::HashMap<&EndpointKey, (String, (i64, i64, i64))> =
        foldhash::HashMap::default();
    for effect in effects {
        let (id, delta) = deltas
            .entry(effect.key())
            .or_insert_with_key(|key| (endpoint_id(key), (0, 0, 0)));
        let id = id.as_bytes();
        let mut add = |d: (i64, i64, i64)| {
            *delta = (delta.0 + d.0, delta.1 + d.1, delta.2 + d.2);
        };
        match effect {
            Effect::Added { slot, bytes, .. } => {
                ready.insert((id, slot.0, slot.1), ()).map_err(storage)?;
                add((1, *bytes as i64, 0));
            }
            Effect::Removed { slot, bytes, .. } => {
                ready.remove((id, slot.0, slot.1)).map_err(storage)?;
                add((-1, -(*bytes as i64), 0));
            }
            Effect::Moved {
                old, new, bytes, ..
            } => {
                ready.remove((id, old.0, old.1)).map_err(storage)?;
                ready.insert((id, new.0, new.1), ()).map_err(storage)?;
                add((0, bytes.1 as i64 - bytes.0 as i64, 0));
            }
            Effect::Died {
                slot,
                bytes,
                dead_ms,
                received_ms,
                ..
            } => {
                ready.remove((id, slot.0, slot.1)).map_err(storage)?;
                dead.insert((id, slot.1), (*dead_ms, *received_ms))
                    .map_err(storage)?;
                add((-1, -(*bytes as i64), 1));
            }
            Effect::Revived { slot, bytes, .. } => {
                dead.remove((id, slot.1)).map_err(storage)?;
                ready.insert((id, slot.0, slot.1), ()).map_err(storage)?;
                add((1, *bytes as i64, -1));
            }
            Effect::DeadRemoved { seq, .. } => {
                dead.remove((id, *seq)).map_err(storage)?;
                add((0, 0, -1));
            }
        }
    }
    let mut counts = txn.open_table(COUNTS).map_err(storage)?;
    for (id, (w, b, d)) in deltas.into_values() {
        let old = counts
            .get(id.as_bytes())
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or_default();
        let add = |n: u64, d: i64| n.saturating_add_signed(d);
        let new = (add(old.0, w), add(old.1, b), add(old.2, d));
        if new == (0, 0, 0) {
            counts.remove(id.as_bytes()).map_err(storage)?;
        } else {
            counts.insert(id.as_bytes(), new).map_err(storage)?;
        }
    }
    Ok(())
}

/// Every endpoint's counts.
pub(super) fn counts(db: &Database) -> Result<Vec<(EndpointKey, Counts)>, QueueError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(COUNTS).map_err(storage)?;
    let mut out = Vec::new();
    for item in table.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let (waiting, bytes, dead) = v.value();
        out.push((
            endpoint_of(k.value()),
            Counts {
                waiting,
                bytes,
                dead,
            },
        ));
    }
    Ok(out)
}

/// Up to `max` ready slots of `key` after `after`, in lease order.
pub(super) fn ready_after(
    db: &Database,
    key: &EndpointKey,
    after: Option<Slot>,
    max: usize,
) -> Result<Vec<Slot>, QueueError> {
    let id = endpoint_id(key);
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(READY).map_err(storage)?;
    let start = after.unwrap_or((0, 0));
    let range = table
        .range((id.as_bytes(), start.0, start.1)..=(id.as_bytes(), u64::MAX, u64::MAX))
        .map_err(storage)?;
    let mut out = Vec::with_capacity(max.min(4096));
    for item in range {
        let (k, _) = item.map_err(storage)?;
        let (_, due, seq) = k.value();
        if after == Some((due, seq)) {
            continue;
        }
        out.push((due, seq));
        if out.len() == max {
            break;
        }
    }
    Ok(out)
}

/// Dead letters of `key`: (seq, dead ms, received ms).
pub(super) fn dead_of(
    db: &Database,
    key: &EndpointKey,
) -> Result<Vec<(u64, u64, u64)>, QueueError> {
    let id = endpoint_id(key);
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(DEAD).map_err(storage)?;
    let range = table
        .range((id.as_bytes(), 0)..=(id.as_bytes(), u64::MAX))
        .map_err(storage)?;
    let mut out = Vec::new();
    for item in range {
        let (k, v) = item.map_err(storage)?;
        let (dead_ms, received_ms) = v.value();
        out.push((k.value().1, dead_ms, received_ms));
    }
    Ok(out)
}

/// Every event of `key`: waiting and dead.
pub(super) fn all_seqs(db: &Database, key: &EndpointKey) -> Result<Vec<u64>, QueueError> {
    let id = endpoint_id(key);
    let mut seqs: Vec<u64> = dead_of(db, key)?.into_iter().map(|d| d.0).collect();
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(READY).map_err(storage)?;
    let range = table
        .range((id.as_bytes(), 0, 0)..=(id.as_bytes(), u64::MAX, u64::MAX))
        .map_err(storage)?;
    for item in range {
        let (k, _) = item.map_err(storage)?;
        seqs.push(k.value().2);
    }
    Ok(seqs)
}

/// Indexes a file written before the index existed; returns the next free seq. A file
/// already indexed is left alone when its counts add up to its records (an O(1) check:
/// a file a previous version wrote to after an upgrade, say by a rollback, is indexed
/// again).
pub(super) fn upgrade(db: &Database) -> Result<u64, QueueError> {
    let (format, consistent) = index_state(db)?;
    if format == Some(FORMAT) && consistent {
        return Ok(0);
    }
    if format == Some(FORMAT) {
        tracing::warn!("the queue file's counts do not match its events; indexing it again");
    }
    reset(db)?;
    let mut from = 0u64;
    let mut indexed = 0u64;
    let mut skipped = 0u64;
    loop {
        let txn = db.begin_write().map_err(storage)?;
        let last = index_slice(&txn, from, &mut indexed, &mut skipped)?;
        txn.commit().map_err(storage)?;
        match last {
            Some(seq) => from = seq + 1,
            None => {
                if indexed > 0 {
                    tracing::info!(
                        indexed,
                        "indexed the queue file written by an older version"
                    );
                }
                return Ok(from);
            }
        }
    }
}

/// The file's index format, and whether its counts add up to its records.
fn index_state(db: &Database) -> Result<(Option<u64>, bool), QueueError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let format = meta.get(META_FORMAT).map_err(storage)?.map(|v| v.value());
    let skipped = meta
        .get(META_SKIPPED)
        .map_err(storage)?
        .map_or(0, |v| v.value());
    let records = txn
        .open_table(EVENTS)
        .map_err(storage)?
        .len()
        .map_err(storage)?;
    let mut counted = skipped;
    for item in txn
        .open_table(COUNTS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (waiting, _, dead) = item.map_err(storage)?.1.value();
        counted += waiting + dead;
    }
    Ok((format, counted == records))
}

/// Starts clean: a pass a crash interrupted may have indexed some records; the tables of
/// format 2 are read by nothing now.
fn reset(db: &Database) -> Result<(), QueueError> {
    let txn = db.begin_write().map_err(storage)?;
    txn.delete_table(READY).map_err(storage)?;
    txn.delete_table(DEAD).map_err(storage)?;
    txn.delete_table(COUNTS).map_err(storage)?;
    for name in FORMAT_2_TABLES {
        let old: TableDefinition<&str, ()> = TableDefinition::new(name);
        txn.delete_table(old).map_err(storage)?;
    }
    create(&txn)?;
    txn.commit().map_err(storage)?;
    Ok(())
}

/// Indexes up to [`UPGRADE_SLICE`] records from `from` in `txn`; returns the last seq read,
/// or none (and marks the file indexed) when there were none left.
fn index_slice(
    txn: &redb::WriteTransaction,
    from: u64,
    indexed: &mut u64,
    skipped: &mut u64,
) -> Result<Option<u64>, QueueError> {
    let mut last = None;
    let events = txn.open_table(EVENTS).map_err(storage)?;
    let mut ready = txn.open_table(READY).map_err(storage)?;
    let mut dead = txn.open_table(DEAD).map_err(storage)?;
    let mut counts = txn.open_table(COUNTS).map_err(storage)?;
    let mut slice: HashMap<String, (u64, u64, u64)> = HashMap::new();
    for item in events.range(from..).map_err(storage)?.take(UPGRADE_SLICE) {
        let (k, v) = item.map_err(storage)?;
        let seq = k.value();
        last = Some(seq);
        let Some(rec) = Record::decode(v.value()) else {
            tracing::warn!(seq, "skipping an unreadable queue record");
            *skipped += 1;
            continue;
        };
        let id = endpoint_id(&EndpointKey::new(rec.namespace, rec.name));
        let c = slice.entry(id.clone()).or_default();
        if rec.state == STATE_DEAD {
            dead.insert((id.as_bytes(), seq), (rec.dead_ms, rec.received_ms))
                .map_err(storage)?;
            c.2 += 1;
        } else {
            ready
                .insert((id.as_bytes(), rec.due_ms, seq), ())
                .map_err(storage)?;
            c.0 += 1;
            c.1 += v.value().len() as u64;
        }
        *indexed += 1;
    }
    for (id, c) in slice {
        let old = counts
            .get(id.as_bytes())
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or_default();
        let new = (old.0 + c.0, old.1 + c.1, old.2 + c.2);
        counts.insert(id.as_bytes(), new).map_err(storage)?;
    }
    if last.is_none() {
        let mut meta = txn.open_table(META).map_err(storage)?;
        meta.insert(META_FORMAT, FORMAT).map_err(storage)?;
        meta.insert(META_SKIPPED, *skipped).map_err(storage)?;
    }
    Ok(last)
}
