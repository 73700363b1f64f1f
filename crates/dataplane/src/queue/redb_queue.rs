//! [`RedbQueue`]: the embedded queue on one redb file.
//!
//! Every write goes through one writer thread that drains whatever operations are waiting
//! and applies them in one write transaction: one commit (one fsync) for many concurrent
//! enqueues and acks — group commit. A caller's future resolves after the commit that holds
//! its operation. Leases are in memory only, so after a crash every event that was not
//! acked, retried or dead-lettered is simply pending again.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::index::Index;
use super::record::{Head, Record, STATE_DEAD, STATE_PENDING};
use super::{
    CommitMetrics, EndpointKey, EnqueueOutcome, EventKind, ExportedEvent, NewEvent, Queue,
    QueueDepth, QueueError, QueuedEvent, Receipt, ReplayFilter, from_millis, to_millis,
};

mod dedupe;
mod disk_index;
mod journal;
use dedupe::{DEDUPE_BY_KEY_V1, DEDUPE_BY_TIME, DedupeIndex};
use disk_index::Effect;

/// seq → encoded [`Record`].
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_NONCE: &str = "nonce";
const META_NEXT_SEQ: &str = "next_seq";
const META_CHECK: &str = "writable_check";

/// How often dedupe keys are expired.
const EXPIRY_EVERY: Duration = Duration::from_secs(1);
/// Most dedupe keys one expiry pass removes. A pass holds the writer, and so every
/// enqueue: at 20,000 a pass at the key bound stalled enqueues for about 110 ms
/// (BENCHMARKS.md); a pass that fills its slice is followed by the next within
/// [`EXPIRY_CATCH_UP`], so expiry keeps up at any rate all the same.
const EXPIRY_SLICE: usize = 4_096;
/// How long the writer waits for work before the next pass while expiry is behind.
const EXPIRY_CATCH_UP: Duration = Duration::from_millis(1);

/// A batch this large commits without waiting out [`RedbQueueOptions::commit_linger`]:
/// its sync is shared enough already, and where a bounded number of callers each wait for
/// their commit (64 senders at saturation) a longer wait only slows every round.
const LINGER_UNTIL_OPS: usize = 32;

/// Dedupe table figures, for the metrics.
#[derive(Debug, Default)]
pub struct DedupeCounts {
    /// Keys remembered now.
    pub keys: AtomicU64,
    /// Keys forgotten before their window ended because of `max_dedupe_keys`.
    pub evicted: AtomicU64,
}

/// Tuning of the embedded queue.
#[derive(Clone, Debug)]
pub struct RedbQueueOptions {
    /// An event whose dedupe key was seen for the same endpoint within this window is a duplicate.
    pub dedupe_window: Duration,
    /// Most operations in one transaction; bounds commit latency under load.
    pub max_batch: usize,
    /// Memory for records of ready events kept so that a lease need not read the file.
    pub cache_bytes: u64,
    /// Operations waiting for the writer at most; later callers wait for a slot.
    pub max_pending_ops: usize,
    /// Most dedupe keys kept; past it the oldest are forgotten before the window ends.
    pub max_dedupe_keys: u64,
    /// Ready events per endpoint held in memory; the rest wait in the file, in order.
    pub window: usize,
    /// redb's own page cache. Its default (1 GiB) alone would exceed the chart's memory
    /// limit once the file is large; the kernel's page cache still holds hot pages.
    pub file_cache_bytes: usize,
    /// How long the writer waits, after the first operation of a batch, for more before it
    /// commits. Each commit rewrites the pages of every table it touches and syncs them,
    /// so at moderate rates a short wait writes a fraction of the bytes for the same events
    /// (BENCHMARKS.md: at about 4,600 events/s, 8.6 KiB written per event instead of 19.1,
    /// and 14 % less CPU per event), for at most this much more time before each 2xx.
    pub commit_linger: Duration,
    /// Size of the journal beside the queue file (`<file>.journal`). A commit is durable
    /// once its pages are appended there in one write and synced, instead of synced where
    /// they lie scattered in the queue file (BENCHMARKS.md: 0.36 ms against 0.08 for 29
    /// pages); the queue file is synced when the journal is full, which starts it over.
    pub journal_bytes: u64,
}

impl Default for RedbQueueOptions {
    fn default() -> Self {
        Self {
            dedupe_window: Duration::from_secs(24 * 3600),
            max_batch: 4096,
            cache_bytes: 32 * 1024 * 1024,
            max_pending_ops: 16 * 1024,
            max_dedupe_keys: 2_000_000,
            window: 1024,
            file_cache_bytes: 32 * 1024 * 1024,
            commit_linger: Duration::from_micros(500),
            journal_bytes: 64 * 1024 * 1024,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Op {
    Enqueue(Vec<NewEvent>, Reply<Vec<EnqueueOutcome>>),
    Ack(EndpointKey, u64, Reply<()>),
    Retry(EndpointKey, u64, u64, String, Reply<()>),
    Dead(EndpointKey, u64, u64, String, Reply<()>),
    Replay(EndpointKey, Vec<u64>, u64, Reply<u64>),
    Prune(EndpointKey, Vec<u64>, Reply<u64>),
    Purge(EndpointKey, Vec<u64>, Reply<u64>),
    Check(Reply<()>),
    Shutdown,
}

enum Responder {
    Outcomes(
        Reply<Vec<EnqueueOutcome>>,
        Result<Vec<EnqueueOutcome>, QueueError>,
    ),
    Unit(Reply<()>, Result<(), QueueError>),
    Count(Reply<u64>, Result<u64, QueueError>),
}

impl Responder {
    /// Sends the op's own result, or the batch's failure when the commit did not happen.
    fn finish(self, batch_error: Option<&QueueError>) {
        // A caller that gave up waiting is not an error for the writer.
        match self {
            Responder::Outcomes(tx, r) => drop(tx.send(batch_error.cloned().map_or(r, Err))),
            Responder::Unit(tx, r) => drop(tx.send(batch_error.cloned().map_or(r, Err))),
            Responder::Count(tx, r) => drop(tx.send(batch_error.cloned().map_or(r, Err))),
        }
    }
}

fn storage<E: std::fmt::Display>(e: E) -> QueueError {
    QueueError::Storage(e.to_string())
}

/// `msg_` and the nonce and seq as 16 hex digits each (made once per enqueue and per
/// lease, so without the formatting machinery).
fn event_id(nonce: u64, seq: u64) -> String {
    let mut id = [0u8; 36];
    id[..4].copy_from_slice(b"msg_");
    hex::encode_to_slice(nonce.to_be_bytes(), &mut id[4..20]).expect("16 hex digits");
    hex::encode_to_slice(seq.to_be_bytes(), &mut id[20..]).expect("16 hex digits");
    String::from_utf8(id.to_vec()).expect("ASCII")
}

fn dedupe_entry(ns: &str, name: &str, key: &str) -> String {
    let mut s = String::with_capacity(ns.len() + name.len() + key.len() + 2);
    s.push_str(ns);
    s.push('/');
    s.push_str(name);
    s.push('\n');
    s.push_str(key);
    s
}

/// The embedded queue. Cheap to share behind an `Arc`; dropping it stops the writer.
pub struct RedbQueue {
    db: Arc<Database>,
    index: Arc<Index>,
    ops: mpsc::Sender<Op>,
    closed: AtomicBool,
    nonce: u64,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Bounds the operations queued for the writer: its channel holds at most this many.
    slots: tokio::sync::Semaphore,
    /// Set once a write hit an I/O error: redb refuses every later write until reopened.
    io_failed: Arc<AtomicBool>,
    dedupe: Arc<DedupeCounts>,
    commits: CommitMetrics,
}

impl RedbQueue {
    /// Opens (or creates) the queue file and loads its counts; ready events are read
    /// from the file a window at a time, so opening takes the same time at any backlog.
    pub fn open(path: impl AsRef<Path>, options: RedbQueueOptions) -> Result<Self, QueueError> {
        let file =
            journal::JournaledFile::open(path.as_ref(), options.journal_bytes).map_err(storage)?;
        let db = Database::builder()
            .set_cache_size(options.file_cache_bytes)
            .create_with_backend(file)
            .map_err(storage)?;
        let db = Arc::new(db);
        let (nonce, next_seq) = {
            let txn = db.begin_write().map_err(storage)?;
            let ids = {
                txn.open_table(EVENTS).map_err(storage)?;
                txn.delete_table(DEDUPE_BY_KEY_V1).map_err(storage)?;
                txn.open_table(DEDUPE_BY_TIME).map_err(storage)?;
                disk_index::create(&txn)?;
                let mut meta = txn.open_table(META).map_err(storage)?;
                let nonce = match meta.get(META_NONCE).map_err(storage)? {
                    Some(v) => v.value(),
                    None => rand::random::<u64>(),
                };
                meta.insert(META_NONCE, nonce).map_err(storage)?;
                let next = meta.get(META_NEXT_SEQ).map_err(storage)?.map(|v| v.value());
                (nonce, next.unwrap_or(0))
            };
            txn.commit().map_err(storage)?;
            ids
        };
        let next_seq = next_seq.max(disk_index::upgrade(&db)?);

        let loader_db = db.clone();
        let loader: super::index::Loader = Box::new(move |key, after, max| {
            disk_index::ready_after(&loader_db, key, after, max).map_err(|e| e.to_string())
        });
        let index = Arc::new(Index::new(options.cache_bytes, options.window, loader));
        for (key, counts) in disk_index::counts(&db)? {
            index.load_counts(&key, counts);
        }
        let seen = {
            let txn = db.begin_read().map_err(storage)?;
            DedupeIndex::load(&txn.open_table(DEDUPE_BY_TIME).map_err(storage)?)?
        };
        let dedupe = Arc::new(DedupeCounts::default());
        dedupe.keys.store(seen.len(), Ordering::Relaxed);

        let (tx, rx) = mpsc::channel();
        let io_failed = Arc::new(AtomicBool::new(false));
        let slots = tokio::sync::Semaphore::new(options.max_pending_ops.max(1));
        let commits = CommitMetrics::default();
        let writer = Writer {
            io_failed: io_failed.clone(),
            dedupe: dedupe.clone(),
            commits: commits.clone(),
            seen,
            expiry_behind: false,
            db: db.clone(),
            index: index.clone(),
            options,
            nonce,
            next_seq,
            buf: Vec::new(),
        };
        let handle = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(storage)?;
        Ok(Self {
            db,
            index,
            ops: tx,
            closed: AtomicBool::new(false),
            nonce,
            writer: std::sync::Mutex::new(Some(handle)),
            slots,
            io_failed,
            dedupe,
            commits,
        })
    }

    /// Dead letters of `endpoint` whose (dead, received) times match `pred`, from the file.
    async fn dead_matching(
        &self,
        endpoint: &EndpointKey,
        pred: impl Fn(u64, u64) -> bool + Send + 'static,
    ) -> Result<Vec<u64>, QueueError> {
        let db = self.db.clone();
        let key = endpoint.clone();
        tokio::task::spawn_blocking(move || {
            let dead = disk_index::dead_of(&db, &key)?;
            Ok(dead
                .into_iter()
                .filter(|(_, d, r)| pred(*d, *r))
                .map(|(seq, _, _)| seq)
                .collect())
        })
        .await
        .map_err(storage)?
    }

    /// Refills the endpoint's in-memory window on a blocking thread: a refill reads the
    /// file and waits out a commit in progress, which under a slow disk would otherwise hold
    /// a runtime thread, and every task on it, for as long as the commit's sync.
    async fn refill(&self, endpoint: &EndpointKey) -> bool {
        let index = self.index.clone();
        let key = endpoint.clone();
        tokio::task::spawn_blocking(move || index.refill(&key))
            .await
            .unwrap_or(false)
    }

    /// Stops accepting writes; every later write fails with [`QueueError::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.ops.send(Op::Shutdown);
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, QueueError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(QueueError::Closed);
        }
        // Held until the reply: what waits for the writer is bounded, not the channel's
        // memory.
        let _slot = self.slots.acquire().await.map_err(|_| QueueError::Closed)?;
        let (tx, rx) = oneshot::channel();
        self.ops.send(make(tx)).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }
}

impl Drop for RedbQueue {
    fn drop(&mut self) {
        self.close();
        // Joining releases the file before a reopen in the same process.
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

#[async_trait::async_trait]
impl Queue for RedbQueue {
    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|r| Op::Enqueue(events, r)).await
    }

    /// Reads one snapshot of the file: every event committed (every one the ingress
    /// answered 2xx for) and not yet delivered is in it, whatever is written meanwhile.
    async fn export(&self, endpoint: &EndpointKey) -> Result<Vec<ExportedEvent>, QueueError> {
        let (db, nonce, endpoint) = (self.db.clone(), self.nonce, endpoint.clone());
        let read = tokio::task::spawn_blocking(move || -> Result<_, QueueError> {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(EVENTS).map_err(storage)?;
            let mut out = Vec::new();
            for item in table.iter().map_err(storage)? {
                let (seq, v) = item.map_err(storage)?;
                let Some(rec) = Record::decode(v.value()) else {
                    continue;
                };
                if rec.namespace == endpoint.namespace && rec.name == endpoint.name {
                    out.push(exported(event_id(nonce, seq.value()), rec));
                }
            }
            Ok(out)
        });
        read.await.map_err(storage)?
    }

    async fn lease(
        &self,
        endpoint: &EndpointKey,
        max: usize,
        now: SystemTime,
    ) -> Result<Vec<QueuedEvent>, QueueError> {
        let now_ms = to_millis(now);
        let first = self.index.lease(endpoint, max, now_ms);
        let (mut leased, mut dry) = (first.events, first.dry);
        // `dry` means fewer than asked for: the refilled window may hold the rest.
        while dry && self.refill(endpoint).await {
            let more = self.index.lease(endpoint, max - leased.len(), now_ms);
            leased.extend(more.events);
            dry = more.dry;
        }
        let mut events = Vec::with_capacity(leased.len());
        let mut uncached = Vec::new();
        for (seq, rec) in leased {
            match rec {
                Some(rec) => events.push(to_event(self.nonce, seq, rec)),
                None => uncached.push(seq),
            }
        }
        if uncached.is_empty() {
            return Ok(events);
        }
        let db = self.db.clone();
        let nonce = self.nonce;
        let wanted = uncached.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<_, QueueError> {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(EVENTS).map_err(storage)?;
            let mut found = Vec::with_capacity(wanted.len());
            let mut missing = Vec::new();
            for seq in wanted {
                match table.get(seq).map_err(storage)? {
                    Some(v) => match Record::decode(v.value()) {
                        Some(rec) if rec.state == STATE_PENDING => {
                            found.push(to_event(nonce, seq, rec))
                        }
                        _ => missing.push(seq),
                    },
                    None => missing.push(seq),
                }
            }
            Ok((found, missing))
        })
        .await
        .map_err(storage)
        .and_then(|r| r);
        match read {
            Ok((found, missing)) => {
                for seq in missing {
                    self.index.forget_lease(endpoint, seq);
                }
                events.extend(found);
                events.sort_by_key(|e| (e.next_attempt, e.receipt.0));
                Ok(events)
            }
            Err(e) => {
                let leased = uncached
                    .into_iter()
                    .chain(events.iter().map(|e| e.receipt.0));
                for seq in leased {
                    self.index.release(endpoint, seq);
                }
                Err(e)
            }
        }
    }

    async fn wait_due(&self, endpoint: &EndpointKey, max_wait: Duration) {
        let shard = self.index.shard(endpoint);
        let notified = shard.notify.notified();
        if self.index.dry(endpoint) {
            self.refill(endpoint).await;
        }
        let now = to_millis(SystemTime::now());
        let wait = match self.index.next_due(endpoint) {
            Some(due) if due <= now => return,
            Some(due) => max_wait.min(Duration::from_millis(due - now)),
            None => max_wait,
        };
        let _ = tokio::time::timeout(wait, notified).await;
    }

    async fn ack(&self, event: &QueuedEvent) -> Result<(), QueueError> {
        let key = event.endpoint.clone();
        self.call(|r| Op::Ack(key, event.receipt.0, r)).await
    }

    async fn retry(
        &self,
        event: &QueuedEvent,
        next_attempt: SystemTime,
        error: &str,
    ) -> Result<(), QueueError> {
        let key = event.endpoint.clone();
        let due = to_millis(next_attempt);
        self.call(|r| Op::Retry(key, event.receipt.0, due, error.to_owned(), r))
            .await
    }

    async fn dead_letter(&self, event: &QueuedEvent, reason: &str) -> Result<(), QueueError> {
        let key = event.endpoint.clone();
        let now = to_millis(SystemTime::now());
        self.call(|r| Op::Dead(key, event.receipt.0, now, reason.to_owned(), r))
            .await
    }

    async fn release(&self, event: &QueuedEvent) -> Result<(), QueueError> {
        if self.index.release(&event.endpoint, event.receipt.0) {
            Ok(())
        } else {
            Err(QueueError::UnknownReceipt)
        }
    }

    async fn replay(
        &self,
        endpoint: &EndpointKey,
        filter: ReplayFilter,
        now: SystemTime,
    ) -> Result<u64, QueueError> {
        let seqs = self
            .dead_matching(endpoint, move |dead, received| {
                filter.matches(from_millis(dead), from_millis(received))
            })
            .await?;
        if seqs.is_empty() {
            return Ok(0);
        }
        let key = endpoint.clone();
        self.call(|r| Op::Replay(key, seqs, to_millis(now), r))
            .await
    }

    async fn prune_dead_letters(
        &self,
        endpoint: &EndpointKey,
        before: SystemTime,
    ) -> Result<u64, QueueError> {
        let cutoff = to_millis(before);
        let seqs = self
            .dead_matching(endpoint, move |dead, _| dead < cutoff)
            .await?;
        if seqs.is_empty() {
            return Ok(0);
        }
        let key = endpoint.clone();
        self.call(|r| Op::Prune(key, seqs, r)).await
    }

    async fn purge(&self, endpoint: &EndpointKey) -> Result<u64, QueueError> {
        let db = self.db.clone();
        let key = endpoint.clone();
        let seqs = tokio::task::spawn_blocking(move || disk_index::all_seqs(&db, &key))
            .await
            .map_err(storage)??;
        if seqs.is_empty() {
            return Ok(0);
        }
        let key = endpoint.clone();
        self.call(|r| Op::Purge(key, seqs, r)).await
    }

    fn endpoints(&self) -> Vec<EndpointKey> {
        self.index.keys()
    }

    fn depth(&self) -> QueueDepth {
        self.index.depth()
    }

    fn endpoint_depth(&self, endpoint: &EndpointKey) -> QueueDepth {
        self.index.endpoint_depth(endpoint)
    }

    async fn check_writable(&self) -> Result<(), QueueError> {
        self.call(Op::Check).await
    }

    fn needs_restart(&self) -> bool {
        self.io_failed.load(Ordering::Relaxed)
    }

    /// Closed, failed, or a write that does not commit: the file is this process's, so a
    /// restart reopens (and repairs) it.
    async fn check_live(&self) -> Result<(), QueueError> {
        if self.needs_restart() {
            return Err(QueueError::Storage("the store needs a restart".into()));
        }
        self.check_writable().await
    }

    fn waiting_bytes(&self, endpoint: Option<&EndpointKey>) -> Option<u64> {
        Some(match endpoint {
            Some(key) => self.index.endpoint_bytes(key),
            None => self.index.bytes(),
        })
    }

    fn dedupe_stats(&self) -> Option<(u64, u64)> {
        Some((
            self.dedupe.keys.load(Ordering::Relaxed),
            self.dedupe.evicted.load(Ordering::Relaxed),
        ))
    }

    fn commit_metrics(&self) -> Option<CommitMetrics> {
        Some(self.commits.clone())
    }
}

fn exported(id: String, rec: Record) -> ExportedEvent {
    let dead = rec.state == STATE_DEAD;
    ExportedEvent {
        id,
        payload: ExportedEvent::encode_payload(&rec.payload),
        namespace: rec.namespace,
        endpoint: rec.name,
        subscription: rec.subscription,
        event_type: rec.event_type,
        dedupe_key: rec.dedupe_key,
        received_ms: rec.received_ms,
        attempts: rec.attempts,
        dead_lettered_ms: dead.then_some(rec.dead_ms),
        reason: (!rec.last_error.is_empty()).then_some(rec.last_error),
        traceparent: (!rec.traceparent.is_empty()).then_some(rec.traceparent),
        headers: rec.headers,
    }
}

fn to_event(nonce: u64, seq: u64, rec: Record) -> QueuedEvent {
    QueuedEvent {
        receipt: Receipt(seq),
        id: event_id(nonce, seq),
        endpoint: EndpointKey::new(rec.namespace, rec.name),
        subscription: rec.subscription,
        event_type: rec.event_type,
        kind: EventKind::of_dedupe_key(&rec.dedupe_key),
        dedupe_key: rec.dedupe_key,
        payload: rec.payload,
        received: from_millis(rec.received_ms),
        attempts: rec.attempts,
        next_attempt: from_millis(rec.due_ms),
        last_error: (!rec.last_error.is_empty()).then_some(rec.last_error),
        traceparent: (!rec.traceparent.is_empty()).then_some(rec.traceparent),
        headers: rec.headers,
    }
}

struct Writer {
    db: Arc<Database>,
    io_failed: Arc<AtomicBool>,
    dedupe: Arc<DedupeCounts>,
    commits: CommitMetrics,
    /// The dedupe keys remembered (the writer alone reads and changes them).
    seen: DedupeIndex,
    /// The last expiry pass filled its slice: run the next one without waiting.
    expiry_behind: bool,
    index: Arc<Index>,
    options: RedbQueueOptions,
    nonce: u64,
    next_seq: u64,
    /// Reused encode buffer: no allocation per record on the hot path.
    buf: Vec<u8>,
}

type Tables<'t> = (
    redb::Table<'t, u64, &'static [u8]>,
    redb::Table<'t, (u64, &'static str), ()>,
    redb::Table<'t, &'static str, u64>,
);

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut last_expiry = Instant::now();
        loop {
            let wait = if self.expiry_behind {
                EXPIRY_CATCH_UP
            } else {
                EXPIRY_EVERY
            };
            let first = match rx.recv_timeout(wait) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.expire_dedupe(&mut last_expiry, true);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let batch = self.gather(first, &rx);
            let stop = batch.iter().any(|op| matches!(op, Op::Shutdown));
            self.commit_batch(batch);
            if stop {
                // Later callers see `Closed` from the dropped receiver.
                return;
            }
            self.expire_dedupe(&mut last_expiry, false);
        }
    }

    /// The batch that `first` opens: what else waits, then what arrives within the
    /// linger while the batch is under [`LINGER_UNTIL_OPS`], until the batch is full or a
    /// shutdown comes.
    fn gather(&self, first: Op, rx: &mpsc::Receiver<Op>) -> Vec<Op> {
        let until = Instant::now() + self.options.commit_linger;
        let mut batch = vec![first];
        while batch.len() < self.options.max_batch && !matches!(batch.last(), Some(Op::Shutdown)) {
            let op = match rx.try_recv() {
                Ok(op) => op,
                Err(mpsc::TryRecvError::Empty) if batch.len() < LINGER_UNTIL_OPS => {
                    match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                        Ok(op) => op,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            };
            batch.push(op);
        }
        batch
    }

    fn commit_batch(&mut self, batch: Vec<Op>) {
        let started = Instant::now();
        self.commits.operations.observe(batch.len() as f64);
        let mut done = Vec::with_capacity(batch.len());
        let mut effects = Vec::new();
        let mut fatal: Option<QueueError> = None;
        let txn = self.db.begin_write().map_err(storage);
        match &txn {
            Ok(txn) => self.write_batch(txn, batch, &mut done, &mut effects, &mut fatal),
            Err(e) => {
                fatal = Some(e.clone());
                done.extend(batch.into_iter().filter_map(fail_op));
            }
        }
        // A refill of the in-memory window sees this commit only with its effects.
        let gate = self.index.gate.write().expect("index gate");
        let outcome = match (txn, fatal) {
            (Ok(txn), None) => txn.commit().map_err(storage),
            (Ok(txn), Some(e)) => {
                let _ = txn.abort();
                Err(e)
            }
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e),
        };
        self.commits
            .duration
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "queue commit failed");
            self.note_failure(e);
            self.seen.abort();
        } else {
            self.seen.commit();
            self.dedupe.keys.store(self.seen.len(), Ordering::Relaxed);
            effects.into_iter().for_each(|e| self.index_effect(e));
        }
        drop(gate);
        let err = outcome.err();
        for r in done {
            r.finish(err.as_ref());
        }
    }

    /// Applies `batch` inside the open transaction `txn`, with the next sequence and the
    /// on-disk index; an error opening the tables fails every op.
    fn write_batch(
        &mut self,
        txn: &redb::WriteTransaction,
        batch: Vec<Op>,
        done: &mut Vec<Responder>,
        effects: &mut Vec<Effect>,
        fatal: &mut Option<QueueError>,
    ) {
        let mut tables = match open_tables(txn) {
            Ok(tables) => tables,
            Err(e) => {
                *fatal = Some(e);
                done.extend(batch.into_iter().filter_map(fail_op));
                return;
            }
        };
        for op in batch {
            if let Some(r) = self.apply(&mut tables, op, effects, fatal) {
                done.push(r);
            }
        }
        if fatal.is_none()
            && let Err(e) = tables.2.insert(META_NEXT_SEQ, self.next_seq)
        {
            *fatal = Some(storage(e));
        }
        drop(tables);
        if fatal.is_none()
            && let Err(e) = disk_index::persist(txn, effects)
        {
            *fatal = Some(e);
        }
    }

    /// Brings the in-memory window up to date with one committed effect.
    fn index_effect(&self, effect: Effect) {
        match effect {
            Effect::Added {
                key,
                slot,
                bytes,
                record,
            } => self.index.added(&key, slot, bytes, record),
            Effect::Removed { key, slot, bytes } => self.index.removed(&key, slot, bytes),
            Effect::Moved {
                key,
                old,
                new,
                bytes,
                record,
            } => self.index.moved(&key, old, new, bytes, record),
            Effect::Died {
                key, slot, bytes, ..
            } => self.index.died(&key, slot, bytes),
            Effect::Revived { key, slot, bytes } => self.index.revived(&key, slot, bytes),
            Effect::DeadRemoved { key, .. } => self.index.dead_removed(&key),
        }
    }

    /// Applies one op inside the open transaction. A storage error sets `fatal` (the whole
    /// batch is aborted); an op-level error (unknown receipt) only fails that op.
    fn apply(
        &mut self,
        t: &mut Tables<'_>,
        op: Op,
        effects: &mut Vec<Effect>,
        fatal: &mut Option<QueueError>,
    ) -> Option<Responder> {
        if fatal.is_some() {
            return fail_op(op);
        }
        Some(match op {
            Op::Enqueue(events, reply) => {
                let r = self.enqueue(t, events, effects);
                if let Err(e) = &r {
                    *fatal = Some(e.clone());
                }
                Responder::Outcomes(reply, r)
            }
            Op::Ack(key, seq, reply) => {
                let r = match t.0.remove(seq).map_err(storage) {
                    Ok(Some(v)) => {
                        effects.push(gone(key, seq, v.value()));
                        Ok(())
                    }
                    Ok(None) => Err(QueueError::UnknownReceipt),
                    Err(e) => Err(e),
                };
                Responder::Unit(reply, guard(fatal, r))
            }
            Op::Retry(key, seq, due, error, reply) => {
                let r = self.retry(t, key, seq, due, error, effects);
                Responder::Unit(reply, guard(fatal, r))
            }
            Op::Dead(key, seq, now, reason, reply) => {
                let r = self.dead(t, key, seq, now, reason, effects);
                Responder::Unit(reply, guard(fatal, r))
            }
            Op::Replay(key, seqs, now, reply) => {
                let r = count_each(seqs, |seq| self.replay(t, &key, seq, now, effects));
                Responder::Count(reply, guard(fatal, r))
            }
            Op::Prune(key, seqs, reply) => {
                let r = count_each(seqs, |seq| prune(t, &key, seq, effects));
                Responder::Count(reply, guard(fatal, r))
            }
            Op::Purge(key, seqs, reply) => {
                let r = count_each(seqs, |seq| {
                    let removed = t.0.remove(seq).map_err(storage)?;
                    Ok(removed
                        .map(|v| effects.push(gone(key.clone(), seq, v.value())))
                        .is_some())
                });
                Responder::Count(reply, guard(fatal, r))
            }
            Op::Check(reply) => {
                // A real write, so that a full disk or a broken file shows.
                let now = to_millis(SystemTime::now());
                let r = t.2.insert(META_CHECK, now).map(|_| ()).map_err(storage);
                Responder::Unit(reply, guard(fatal, r))
            }
            Op::Shutdown => return None,
        })
    }

    /// Schedules record `seq` again at `due`, one attempt more.
    fn retry(
        &mut self,
        t: &mut Tables<'_>,
        key: EndpointKey,
        seq: u64,
        due: u64,
        error: String,
        effects: &mut Vec<Effect>,
    ) -> Result<(), QueueError> {
        let u = self.update(t, seq, |rec| {
            rec.attempts += 1;
            rec.due_ms = due;
            rec.last_error = error;
        })?;
        effects.push(Effect::Moved {
            key,
            old: (u.old_due, seq),
            new: (due, seq),
            bytes: (u.old_bytes, u.bytes),
            record: u.record,
        });
        Ok(())
    }

    /// Moves record `seq` to the dead letters at `now`.
    fn dead(
        &mut self,
        t: &mut Tables<'_>,
        key: EndpointKey,
        seq: u64,
        now: u64,
        reason: String,
        effects: &mut Vec<Effect>,
    ) -> Result<(), QueueError> {
        let u = self.update(t, seq, |rec| {
            rec.attempts += 1;
            rec.state = STATE_DEAD;
            rec.dead_ms = now;
            rec.last_error = reason;
        })?;
        effects.push(Effect::Died {
            key,
            slot: (u.old_due, seq),
            bytes: u.old_bytes,
            dead_ms: now,
            received_ms: u.record.received_ms,
        });
        Ok(())
    }

    /// Makes dead record `seq` pending again, due `now`; false when it is not dead.
    fn replay(
        &mut self,
        t: &mut Tables<'_>,
        key: &EndpointKey,
        seq: u64,
        now: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<bool, QueueError> {
        let bytes = self.update_if_dead(t, seq, |rec| {
            rec.state = STATE_PENDING;
            rec.attempts = 0;
            rec.due_ms = now;
            rec.dead_ms = 0;
            rec.last_error.clear();
        })?;
        Ok(bytes
            .map(|bytes| {
                effects.push(Effect::Revived {
                    key: key.clone(),
                    slot: (now, seq),
                    bytes,
                })
            })
            .is_some())
    }

    fn enqueue(
        &mut self,
        t: &mut Tables<'_>,
        events: Vec<NewEvent>,
        effects: &mut Vec<Effect>,
    ) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let window = self.options.dedupe_window.as_millis() as u64;
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let received = to_millis(ev.received);
            if !ev.dedupe_key.is_empty() {
                let entry = dedupe_entry(&ev.endpoint.namespace, &ev.endpoint.name, &ev.dedupe_key);
                // An event's own window may only shorten the queue's: keys are expired
                // after the queue's.
                let window = ev
                    .dedupe_window
                    .map_or(window, |w| window.min(w.as_millis() as u64));
                match self.seen.received(&t.1, &entry)? {
                    Some(prev) if received.saturating_sub(prev) < window => {
                        out.push(EnqueueOutcome::Duplicate);
                        continue;
                    }
                    Some(prev) => {
                        t.1.remove((prev, entry.as_str())).map_err(storage)?;
                    }
                    None => {}
                }
                self.seen.remember(&entry, received);
                t.1.insert((received, entry.as_str()), ())
                    .map_err(storage)?;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let rec = Record {
                state: STATE_PENDING,
                attempts: 0,
                received_ms: received,
                due_ms: received,
                dead_ms: 0,
                namespace: ev.endpoint.namespace.clone(),
                name: ev.endpoint.name.clone(),
                subscription: ev.subscription,
                event_type: ev.event_type,
                dedupe_key: ev.dedupe_key,
                last_error: String::new(),
                payload: ev.payload,
                traceparent: ev.traceparent.unwrap_or_default(),
                headers: ev.headers,
            };
            rec.encode(&mut self.buf);
            t.0.insert(seq, self.buf.as_slice()).map_err(storage)?;
            effects.push(Effect::Added {
                key: ev.endpoint,
                slot: (received, seq),
                bytes: self.buf.len() as u64,
                record: Some(rec),
            });
            out.push(EnqueueOutcome::Accepted {
                id: event_id(self.nonce, seq),
            });
        }
        Ok(out)
    }

    /// Rewrites a pending record; `UnknownReceipt` when it is gone or dead.
    fn update(
        &mut self,
        t: &mut Tables<'_>,
        seq: u64,
        change: impl FnOnce(&mut Record),
    ) -> Result<Updated, QueueError> {
        let found = t.0.get(seq).map_err(storage)?.and_then(|v| {
            let bytes = v.value().len() as u64;
            Record::decode(v.value()).map(|r| (r, bytes))
        });
        let Some((mut rec, old_bytes)) = found.filter(|(r, _)| r.state == STATE_PENDING) else {
            return Err(QueueError::UnknownReceipt);
        };
        let old_due = rec.due_ms;
        change(&mut rec);
        rec.encode(&mut self.buf);
        t.0.insert(seq, self.buf.as_slice()).map_err(storage)?;
        Ok(Updated {
            record: rec,
            old_due,
            old_bytes,
            bytes: self.buf.len() as u64,
        })
    }

    fn update_if_dead(
        &mut self,
        t: &mut Tables<'_>,
        seq: u64,
        change: impl FnOnce(&mut Record),
    ) -> Result<Option<u64>, QueueError> {
        let rec =
            t.0.get(seq)
                .map_err(storage)?
                .and_then(|v| Record::decode(v.value()));
        let Some(mut rec) = rec.filter(|r| r.state == STATE_DEAD) else {
            return Ok(None);
        };
        change(&mut rec);
        rec.encode(&mut self.buf);
        t.0.insert(seq, self.buf.as_slice()).map_err(storage)?;
        Ok(Some(self.buf.len() as u64))
    }

    /// Forgets dedupe keys older than the window, and the oldest keys past
    /// `max_dedupe_keys`, in slices of at most [`EXPIRY_SLICE`] so that no pass stalls
    /// enqueues for long. Runs every second; a pass that filled its slice runs again after
    /// the next batch, or within [`EXPIRY_CATCH_UP`] when none comes, so expiry keeps up
    /// with any rate the writer can take.
    fn expire_dedupe(&mut self, last: &mut Instant, idle: bool) {
        if !idle && !self.expiry_behind && last.elapsed() < EXPIRY_EVERY {
            return;
        }
        *last = Instant::now();
        let cutoff = to_millis(SystemTime::now())
            .saturating_sub(self.options.dedupe_window.as_millis() as u64);
        let over = self
            .dedupe
            .keys
            .load(Ordering::Relaxed)
            .saturating_sub(self.options.max_dedupe_keys);
        let result = (|| -> Result<(usize, u64), QueueError> {
            let txn = self.db.begin_write().map_err(storage)?;
            let expired = {
                let (_, mut by_time, _) = open_tables(&txn)?;
                let mut expired = Vec::new();
                // Oldest first: everything past the window, then (past the size bound)
                // the oldest keys still inside it.
                for item in by_time.iter().map_err(storage)?.take(EXPIRY_SLICE) {
                    let (k, _) = item.map_err(storage)?;
                    let (ms, entry) = k.value();
                    if ms >= cutoff && expired.len() as u64 >= over {
                        break;
                    }
                    expired.push((ms, entry.to_owned()));
                }
                for (ms, entry) in &expired {
                    by_time.remove((*ms, entry.as_str())).map_err(storage)?;
                }
                expired
            };
            txn.commit().map_err(storage)?;
            // A key received again since keeps its later receipt; only keys still inside
            // the window when forgotten count as evicted.
            let evicted = expired
                .iter()
                .filter(|(ms, entry)| self.seen.forget(entry, *ms) && *ms >= cutoff)
                .count() as u64;
            self.dedupe.keys.store(self.seen.len(), Ordering::Relaxed);
            self.dedupe.evicted.fetch_add(evicted, Ordering::Relaxed);
            Ok((expired.len(), evicted))
        })();
        match result {
            Ok((scanned, evicted)) => {
                self.expiry_behind = scanned == EXPIRY_SLICE;
                if evicted > 0 {
                    tracing::warn!(
                        evicted,
                        "dedupe keys evicted before their window ended: more unique events than --max-dedupe-keys per window"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "dedupe expiry failed");
                self.note_failure(&e);
            }
        }
    }

    /// After an I/O error (a full disk, a failing volume) redb answers every later write
    /// with "previous I/O error" until the file is reopened; mark the queue for a restart.
    /// redb's errors reach here as text: its `Io` and `PreviousIo` messages.
    fn note_failure(&self, e: &QueueError) {
        if let QueueError::Storage(m) = e
            && (m.starts_with("I/O error") || m.starts_with("Previous I/O error"))
            && !self.io_failed.swap(true, Ordering::Relaxed)
        {
            tracing::error!(
                "the queue file had an I/O error; /healthz now fails so that a restart reopens it"
            );
        }
    }
}

/// A pending record before and after [`Writer::update`].
struct Updated {
    record: Record,
    old_due: u64,
    old_bytes: u64,
    bytes: u64,
}

/// The effect of deleting the stored record `bytes` of `seq`.
/// `r`, after marking a storage error in it fatal for the batch.
fn guard<T>(fatal: &mut Option<QueueError>, r: Result<T, QueueError>) -> Result<T, QueueError> {
    if let Err(QueueError::Storage(m)) = &r {
        *fatal = Some(QueueError::Storage(m.clone()));
    }
    r
}

/// How many of `seqs` `one` applies to, stopping at the first error.
fn count_each(
    seqs: Vec<u64>,
    mut one: impl FnMut(u64) -> Result<bool, QueueError>,
) -> Result<u64, QueueError> {
    let mut n = 0;
    for seq in seqs {
        n += u64::from(one(seq)?);
    }
    Ok(n)
}

/// Removes record `seq` when it is dead; false when it is not.
fn prune(
    t: &mut Tables<'_>,
    key: &EndpointKey,
    seq: u64,
    effects: &mut Vec<Effect>,
) -> Result<bool, QueueError> {
    let state = t.0.get(seq).map_err(storage)?;
    let dead = state
        .and_then(|v| Record::decode(v.value()))
        .map(|r| r.state)
        == Some(STATE_DEAD);
    if !dead {
        return Ok(false);
    }
    t.0.remove(seq).map_err(storage)?;
    effects.push(Effect::DeadRemoved {
        key: key.clone(),
        seq,
    });
    Ok(true)
}

fn gone(key: EndpointKey, seq: u64, bytes: &[u8]) -> Effect {
    match Head::decode(bytes) {
        Some(h) if h.state == STATE_DEAD => Effect::DeadRemoved { key, seq },
        h => Effect::Removed {
            key,
            slot: (h.map_or(0, |h| h.due_ms), seq),
            bytes: bytes.len() as u64,
        },
    }
}

fn open_tables(txn: &redb::WriteTransaction) -> Result<Tables<'_>, QueueError> {
    Ok((
        txn.open_table(EVENTS).map_err(storage)?,
        txn.open_table(DEDUPE_BY_TIME).map_err(storage)?,
        txn.open_table(META).map_err(storage)?,
    ))
}

fn fail_op(op: Op) -> Option<Responder> {
    fn e<T>() -> Result<T, QueueError> {
        Err(QueueError::Storage("batch aborted".into()))
    }
    Some(match op {
        Op::Enqueue(_, r) => Responder::Outcomes(r, e()),
        Op::Ack(_, _, r) | Op::Retry(_, _, _, _, r) | Op::Dead(_, _, _, _, r) | Op::Check(r) => {
            Responder::Unit(r, e())
        }
        Op::Replay(_, _, _, r) | Op::Prune(_, _, r) | Op::Purge(_, _, r) => {
            Responder::Count(r, e())
        }
        Op::Shutdown => return None,
    })
}

#[cfg(test)]
mod tests;
