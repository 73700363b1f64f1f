//! The durable event queue: the single place events live between the ingress's 2xx and
//! the destination's 2xx.
//!
//! [`Queue`] is the contract (object-safe, so a JetStream implementation can replace the
//! embedded one by configuration); [`RedbQueue`] is the default, an embedded store on a
//! file; [`JetStreamQueue`] is the queue several replicas share (NATS JetStream).
//! Events are opaque here: the queue never looks into a payload or knows a provider.
//! Leasing, retry scheduling and dead letters live here; *when* to retry is delivery's
//! decision, not the queue's.

mod export;
mod index;
mod jetstream;
mod record;
mod redb_queue;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

pub use export::{ExportedEvent, read_lines, write_lines};
pub use jetstream::{JetStreamOptions, JetStreamQueue, NatsAuth};
pub use redb_queue::{RedbQueue, RedbQueueOptions};

/// Identity of a `WebhookEndpoint`: its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub namespace: String,
    pub name: String,
}

impl EndpointKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the per-endpoint `map` holds for `key`, made by `make` the first time: the read
/// lock on the common path, the write lock only to add.
pub fn per_endpoint<V>(
    map: &std::sync::RwLock<foldhash::HashMap<EndpointKey, std::sync::Arc<V>>>,
    key: &EndpointKey,
    make: impl FnOnce() -> V,
) -> std::sync::Arc<V> {
    if let Some(v) = map.read().expect("per-endpoint map lock").get(key) {
        return v.clone();
    }
    map.write()
        .expect("per-endpoint map lock")
        .entry(key.clone())
        .or_insert_with(|| std::sync::Arc::new(make()))
        .clone()
}

/// An event as the ingress hands it over, verified and normalised.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub endpoint: EndpointKey,
    pub subscription: String,
    pub event_type: String,
    /// Equal keys for the same endpoint within the dedupe window are duplicates.
    pub dedupe_key: String,
    /// This event's dedupe window when shorter than the queue's (`spec.dedupe.window`);
    /// `None`: the queue's.
    pub dedupe_window: Option<Duration>,
    pub payload: Bytes,
    pub received: SystemTime,
    /// The provider's valid W3C `traceparent`, kept so deliveries continue its trace.
    pub traceparent: Option<String>,
    /// Headers the provider sent, for `spec.filter`: `name: value` lines (see
    /// [`header_lines`]); empty when none are kept.
    pub headers: String,
}

/// What became of one enqueued event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored durably under this stable id (the `webhook-id` of every delivery attempt).
    Accepted { id: String },
    /// Same dedupe key seen for this endpoint within the window: dropped.
    Duplicate,
}

/// A lease handle the implementation uses to find the leased event again in
/// [`Queue::ack`] and friends. Opaque to callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Receipt(pub u64);

/// A leased event, ready for a delivery attempt.
#[derive(Clone, Debug)]
pub struct QueuedEvent {
    pub receipt: Receipt,
    /// Stable across attempts, replays and restarts.
    pub id: String,
    pub endpoint: EndpointKey,
    pub subscription: String,
    pub event_type: String,
    pub dedupe_key: String,
    pub payload: Bytes,
    pub received: SystemTime,
    /// Failed attempts so far.
    pub attempts: u32,
    pub next_attempt: SystemTime,
    pub last_error: Option<String>,
    /// The provider's `traceparent`, when it sent a valid one.
    pub traceparent: Option<String>,
    /// Headers the provider sent (see [`NewEvent::headers`]).
    pub headers: String,
    /// A provider's event, a test event or an unreadable batch element.
    pub kind: EventKind,
}

/// What a queued event is. The stored formats carry it as a prefix of the dedupe key (so
/// files and streams written before it stay readable); [`QueuedEvent::kind`] holds it
/// read back, and the ingress builds the keys with [`EventKind::test_key`] and
/// [`EventKind::malformed_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Provider,
    /// A provider's test button or the operator's own test request.
    Test,
    /// An element of a provider's batch that could not be read; delivery moves it
    /// straight to the dead-letter store.
    Malformed {
        reason: String,
    },
}

const TEST_KEY_PREFIX: &str = "test:";
const MALFORMED_KEY_PREFIX: &str = "malformed:";

impl EventKind {
    /// The kind a stored dedupe key carries.
    pub fn of_dedupe_key(dedupe_key: &str) -> Self {
        if dedupe_key.starts_with(TEST_KEY_PREFIX) {
            return EventKind::Test;
        }
        match dedupe_key.strip_prefix(MALFORMED_KEY_PREFIX) {
            Some(rest) => EventKind::Malformed {
                reason: rest
                    .rsplit_once(':')
                    .map_or(rest, |(reason, _)| reason)
                    .to_string(),
            },
            None => EventKind::Provider,
        }
    }

    /// A test event is delivered each time it is sent: a provider's test button sends the
    /// same example event (same ids) every time, so its key is made unique per request.
    pub fn test_key(key: &str) -> String {
        format!("{TEST_KEY_PREFIX}{key}:{:016x}", rand::random::<u64>())
    }

    /// An unreadable element's key: its reason and a digest of its content, so a
    /// provider's retry of the same batch does not store it twice.
    pub fn malformed_key(reason: &str, content_digest: &str) -> String {
        format!("{MALFORMED_KEY_PREFIX}{reason}:{content_digest}")
    }
}

/// The `(name, value)` pairs of an event's kept headers: one `name: value` per line
/// (names are lower-case tokens and values hold no line breaks, so a line splits at the
/// first `": "`).
pub fn header_lines(headers: &str) -> impl Iterator<Item = (&str, &str)> {
    headers.lines().filter_map(|l| l.split_once(": "))
}

/// Which dead letters a replay sends back to pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFilter {
    All,
    /// Dead-lettered within `[from, to]`.
    DeadLetteredBetween {
        from: SystemTime,
        to: SystemTime,
    },
    /// Originally received within `[from, to]`.
    ReceivedBetween {
        from: SystemTime,
        to: SystemTime,
    },
}

impl ReplayFilter {
    pub(crate) fn matches(&self, dead_at: SystemTime, received: SystemTime) -> bool {
        match *self {
            ReplayFilter::All => true,
            ReplayFilter::DeadLetteredBetween { from, to } => dead_at >= from && dead_at <= to,
            ReplayFilter::ReceivedBetween { from, to } => received >= from && received <= to,
        }
    }
}

/// Event counts, cheap to read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Waiting for an attempt (due now or later).
    pub pending: u64,
    /// Leased by a delivery worker, attempt under way.
    pub leased: u64,
    pub dead_lettered: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue was closed or its writer stopped; nothing can be stored.
    #[error("queue closed")]
    Closed,
    /// The storage engine failed; the operation did not take effect.
    #[error("queue storage error: {0}")]
    Storage(String),
    /// The receipt names no leased event (already acked, or from before a restart).
    #[error("unknown receipt")]
    UnknownReceipt,
}

/// A durable queue of opaque events, partitioned by endpoint.
///
/// Guarantees an implementation must keep: an `Accepted` outcome means the event survives
/// a crash; a leased event that is neither acked, retried, dead-lettered nor released
/// becomes due again after a restart; ids are stable.
#[async_trait::async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores a batch durably; resolves only once it is committed. Outcomes are in input order.
    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<EnqueueOutcome>, QueueError>;

    /// Leases up to `max` events of `endpoint` due at `now`, oldest due first.
    async fn lease(
        &self,
        endpoint: &EndpointKey,
        max: usize,
        now: SystemTime,
    ) -> Result<Vec<QueuedEvent>, QueueError>;

    /// Waits until an event of `endpoint` may be due, or `max_wait` passes. A hint: callers
    /// lease afterwards and must cope with finding nothing.
    async fn wait_due(&self, endpoint: &EndpointKey, max_wait: Duration);

    /// Delivered: removes the event.
    async fn ack(&self, event: &QueuedEvent) -> Result<(), QueueError>;

    /// Records one more failed attempt and makes the event due again at `next_attempt`.
    async fn retry(
        &self,
        event: &QueuedEvent,
        next_attempt: SystemTime,
        error: &str,
    ) -> Result<(), QueueError>;

    /// Records one more failed attempt and moves the event to the dead-letter store.
    async fn dead_letter(&self, event: &QueuedEvent, reason: &str) -> Result<(), QueueError>;

    /// Gives a lease back without counting an attempt (the attempt never happened).
    async fn release(&self, event: &QueuedEvent) -> Result<(), QueueError>;

    /// Moves matching dead letters of `endpoint` back to pending, due now, attempts reset.
    async fn replay(
        &self,
        endpoint: &EndpointKey,
        filter: ReplayFilter,
        now: SystemTime,
    ) -> Result<u64, QueueError>;

    /// Deletes dead letters of `endpoint` dead-lettered before `before`.
    async fn prune_dead_letters(
        &self,
        endpoint: &EndpointKey,
        before: SystemTime,
    ) -> Result<u64, QueueError>;

    /// Deletes every event of `endpoint`, pending and dead-lettered: its WebhookEndpoint
    /// was deleted. Returns how many.
    async fn purge(&self, endpoint: &EndpointKey) -> Result<u64, QueueError>;

    /// The waiting (pending or leased) events and dead letters of `endpoint`, oldest
    /// first, for a backup or a move to another queue (see [`ExportedEvent`]).
    async fn export(&self, _endpoint: &EndpointKey) -> Result<Vec<ExportedEvent>, QueueError> {
        Err(QueueError::Storage("this queue does not export".into()))
    }

    /// Stores exported events, ids and attempts kept: a waiting one due now and
    /// deduplicated on its key like any enqueue, a dead letter as a dead letter (a
    /// [`EnqueueOutcome::Duplicate`] when one with its id is there). Outcomes in input order.
    async fn import(&self, _events: Vec<ExportedEvent>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        Err(QueueError::Storage("this queue does not import".into()))
    }

    /// Endpoints that hold events (pending, leased or dead).
    fn endpoints(&self) -> Vec<EndpointKey>;

    fn depth(&self) -> QueueDepth;

    fn endpoint_depth(&self, endpoint: &EndpointKey) -> QueueDepth;

    /// Proves the queue can commit a write now (readiness).
    async fn check_writable(&self) -> Result<(), QueueError>;

    /// Delivery has stopped on this replica: events taken from a shared store ahead of a
    /// lease go back now, so another replica can deliver them at once instead of after
    /// the store's lease timeout. Nothing to do for a store this replica alone reads.
    async fn return_prefetched(&self) {}

    /// True once the store cannot write again without a restart of the process (the
    /// embedded store after an I/O error such as a full disk): `/healthz` then fails so
    /// that Kubernetes restarts the pod, which reopens and repairs the file.
    fn needs_restart(&self) -> bool {
        false
    }

    /// Liveness (`/healthz`): `Err` when this process's store cannot write and only a
    /// restart can help. The default is [`Self::needs_restart`]; a store on a server
    /// (JetStream) keeps it, since a restart does not bring a server back (that is
    /// readiness's part).
    async fn check_live(&self) -> Result<(), QueueError> {
        if self.needs_restart() {
            return Err(QueueError::Storage("the store needs a restart".into()));
        }
        Ok(())
    }

    /// Stored bytes of the events waiting (pending or leased) for `endpoint`, or for all
    /// endpoints when `None`; `None` when the queue does not count them (JetStream bounds
    /// its stream by `max_bytes` instead).
    fn waiting_bytes(&self, _endpoint: Option<&EndpointKey>) -> Option<u64> {
        None
    }

    /// Dedupe keys remembered now and keys forgotten early (size bound), when the queue
    /// keeps them itself (JetStream's server does, and bounds them by its window).
    fn dedupe_stats(&self) -> Option<(u64, u64)> {
        None
    }

    /// The histograms of the queue's own group commits, when it commits itself (the
    /// embedded queue does; JetStream's server stores each message on its own).
    fn commit_metrics(&self) -> Option<CommitMetrics> {
        None
    }
}

/// The embedded queue's group commits, as the operator's metrics export them: how long
/// each took (applying its operations, writing the pages, syncing the file) and how many
/// callers' operations (enqueues, acks, retries, ...) it carried. Every enqueue's 2xx
/// waits for the commit under way and then its own, so the duration is the part of the
/// ingress latency the disk and the writer set. Clones share the same series.
#[derive(Clone, Debug)]
pub struct CommitMetrics {
    pub duration: Histogram,
    pub operations: Histogram,
}

impl Default for CommitMetrics {
    fn default() -> Self {
        Self {
            // 100 µs .. about 3.3 s
            duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 .. 4,096 (the largest batch)
            operations: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
        }
    }
}

/// Milliseconds since the Unix epoch; the queue's time unit on disk.
pub(crate) fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}
