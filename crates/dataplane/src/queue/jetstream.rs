//! [`JetStreamQueue`]: the [`Queue`] on NATS JetStream, for several replicas sharing one
//! queue.
//!
//! Layout, all names under a configurable prefix (default `webhook`, streams `WEBHOOK_*`):
//!
//! - `WEBHOOK_EVENTS`, a **work-queue** stream on `webhook.events.<ns>.<name>`: pending
//!   deliveries. File storage; a message leaves it when a replica acks it.
//! - one **durable pull consumer per endpoint** on that stream, filtered to the endpoint's
//!   subject and shared by every replica, so each message is handed to one replica at a
//!   time. `ack_wait` is the lease timeout: a replica that dies with an attempt under way
//!   never acks, and the server hands the event to another replica after `ack_wait`.
//! - `WEBHOOK_DEAD`, a limits stream on `webhook.dead.<ns>.<name>`: dead letters.
//! - `WEBHOOK_CHECK`, one message on `webhook.check`: the readiness write.
//!
//! Why each piece:
//!
//! - **Durability point.** `enqueue` publishes every event and awaits its PubAck; the
//!   server sends that ack only once the message is stored in the stream. Any publish that
//!   fails or times out (server down, restarting, JetStream not ready) fails the whole batch,
//!   so the ingress answers 503, never 2xx, for events that may not be stored.
//! - **Dedupe across replicas.** The `Nats-Msg-Id` header is a hash of (endpoint, dedupe
//!   key) and the events stream's `duplicate_window` is the dedupe window, so the *server*
//!   refuses the second copy whichever replica's ingress got it; `PubAck.duplicate` maps
//!   to [`EnqueueOutcome::Duplicate`]. The server has one window per stream: an event's
//!   shorter window (`spec.dedupe.window`) is kept by adding the slot of that length its
//!   receipt falls in to the hash (see [`window_slot`]).
//! - **Retry** is a NAK with the delay delivery chose (`-NAK {"delay":…}`): the server keeps
//!   the message and redelivers it when due, to any replica. A NAK cannot carry data, so the
//!   attempt count is the server's delivery count (`info.delivered - 1`) plus the count a
//!   message carried when it was (re)published; the last error is not carried across
//!   attempts (delivery only logs it). A release is a NAK without delay and, unlike the
//!   embedded queue, counts as one delivery (releases only happen at shutdown).
//! - **Max deliver.** Delivery dead-letters at the endpoint's `maxAttempts`. The consumer's
//!   `max_deliver` is a server-side bound above that ([`JetStreamOptions::max_deliver`]); a
//!   message leased at that bound (it was redelivered that often without any outcome,
//!   e.g. replicas crashing on it) goes to the dead-letter stream instead of to delivery,
//!   so it is never silently dropped by the server.
//! - **Dead letters** are published to the dead-letter stream (awaiting the PubAck), then
//!   the original is acked: never lost in between, at worst present twice until the ack
//!   lands. Replay republishes them as fresh pending messages (attempts reset) and deletes
//!   them from the dead-letter stream; pruning deletes old ones.
//! - **Receipts** map to the leased `jetstream::Message` in memory on this replica only,
//!   which is all ack/NAK need (the message's reply subject).
//! - **No lease is left behind.** Every message this replica pulls ends in exactly one of
//!   ack, NAK (retry or release) or term: an ack or NAK the server does not confirm is
//!   repeated a few times, a dead letter whose publish fails is NAKed to come back within a
//!   second, a pull cut short keeps what it already received, every pull runs in a task
//!   of its own and parks what it receives for the next leases (so a caller that stops
//!   waiting drops nothing), a parked message held too long is NAKed rather than
//!   dropped, and when delivery stops every parked message is NAKed (`return_prefetched`).
//!   Only when the server stays unreachable, or the process dies, is a message left to
//!   come back after `ack_wait`.
//! - **Leases do not wait for the server.** A pull is a round trip, and a busy endpoint's
//!   worker leases as its attempts finish, often one event at a time. So when a lease
//!   leaves fewer than a batch parked, the next batch is pulled ahead in the background;
//!   a batch is what the endpoint's leases took in the last 100 ms (1 to 128 messages),
//!   so a slow endpoint holds no message parked for long.
//! - **Long attempts keep their lease.** While a message is leased, this replica sends an
//!   in-progress ack every third of `ack_wait`, so an attempt longer than `ack_wait` (a
//!   slow consumer with a long `delivery.timeout`) is never handed to a second replica at
//!   the same time. A replica that dies stops sending them, and the lease expires.
//! - **Counts** (`depth`, `endpoint_depth`, `endpoints`) are synchronous in the trait, so
//!   a background task refreshes them every second from per-subject stream counts; pending
//!   and dead-lettered are cluster-wide, leased is this replica's.
//!
//! Payload and metadata travel together in the message body (a length-prefixed JSON
//! envelope, then the payload bytes): dedupe keys and event types are arbitrary text that
//! headers could not carry safely. NATS credentials are never logged.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, AckKind, consumer, stream};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    EndpointKey, EnqueueOutcome, EventKind, ExportedEvent, NewEvent, Queue, QueueDepth, QueueError,
    QueuedEvent, Receipt, ReplayFilter, from_millis, to_millis,
};

/// How to reach and authenticate to NATS. `Debug` never shows a secret.
#[derive(Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A NATS `.creds` file (user JWT and nkey seed), e.g. a mounted Secret.
    CredentialsFile(std::path::PathBuf),
    Token(String),
    UserPassword(String, String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::CredentialsFile(p) => write!(f, "CredentialsFile({})", p.display()),
            NatsAuth::Token(_) => f.write_str("Token(<redacted>)"),
            NatsAuth::UserPassword(u, _) => write!(f, "UserPassword({u}, <redacted>)"),
        }
    }
}

/// Settings of the JetStream queue.
#[derive(Clone, Debug)]
pub struct JetStreamOptions {
    /// `nats://host:port` (comma-separated for several servers). No credentials here.
    pub url: String,
    pub auth: NatsAuth,
    /// Prefix of subjects (`<prefix>.events.…`) and, upper-cased, of stream names.
    pub prefix: String,
    /// Lease timeout: an attempt not acked within this is handed out again.
    pub ack_wait: Duration,
    /// The events stream's duplicate window.
    pub dedupe_window: Duration,
    /// Server-side bound on deliveries of one message (see the module docs).
    pub max_deliver: i64,
    /// Bound on every JetStream request and publish ack: how long the ingress waits before
    /// answering 503 when the server cannot persist.
    pub request_timeout: Duration,
    /// Copies of each stream in a NATS cluster (1, 3 or 5).
    pub replicas: usize,
    /// File (survives a server restart) or memory storage for the streams.
    pub storage: stream::StorageType,
    /// Most bytes the events stream holds; past it the server refuses new events (the
    /// ingress answers 503), never drops stored ones. -1: unlimited.
    pub max_bytes: i64,
    /// Dead letters older than this are removed by the server. Zero: kept until pruned.
    pub dead_letter_max_age: Duration,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            auth: NatsAuth::None,
            prefix: "webhook".into(),
            ack_wait: Duration::from_secs(60),
            dedupe_window: Duration::from_secs(24 * 3600),
            max_deliver: 1000,
            request_timeout: Duration::from_secs(3),
            replicas: 1,
            storage: stream::StorageType::File,
            max_bytes: -1,
            dead_letter_max_age: Duration::ZERO,
        }
    }
}

/// Metadata that travels with the payload.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Envelope {
    id: String,
    ns: String,
    name: String,
    sub: String,
    ty: String,
    key: String,
    received_ms: u64,
    /// Attempts made before this message was (re)published.
    #[serde(default)]
    base_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dead_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The provider's `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tp: Option<String>,
    /// The provider's headers kept for `spec.filter`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    h: String,
}

fn encode(env: &Envelope, payload: &[u8]) -> Bytes {
    let meta = serde_json::to_vec(env).expect("envelope serialises");
    let mut b = BytesMut::with_capacity(4 + meta.len() + payload.len());
    b.put_u32(meta.len() as u32);
    b.put_slice(&meta);
    b.put_slice(payload);
    b.freeze()
}

fn decode(body: &Bytes) -> Option<(Envelope, Bytes)> {
    let len = u32::from_be_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let meta = body.get(4..4 + len)?;
    let env = serde_json::from_slice(meta).ok()?;
    Some((env, body.slice(4 + len..)))
}

/// One subject token from arbitrary text, reversibly: `[a-z0-9-]` stay, every other byte
/// becomes `_xx` (hex). Kubernetes names keep their shape except for dots.
pub(crate) fn escape_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.is_empty() {
        out.push('_'); // an empty token is not a valid subject; "_" alone decodes to ""
    }
    out
}

pub(crate) fn unescape_token(s: &str) -> Option<String> {
    if s == "_" {
        return Some(String::new());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The NATS client for `options`: its URL and credentials, reconnecting quickly.
async fn dial(options: &JetStreamOptions) -> Result<async_nats::Client, QueueError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name("webhook-operator")
        .connection_timeout(Duration::from_secs(5))
        // Come back quickly after a server restart; the ingress answers 503 meanwhile.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).min(1000))
        });
    connect = match &options.auth {
        NatsAuth::None => connect,
        NatsAuth::CredentialsFile(path) => connect
            .credentials_file(path)
            .await
            .map_err(|e| QueueError::Storage(format!("reading NATS credentials file: {e}")))?,
        NatsAuth::Token(t) => connect.token(t.clone()),
        NatsAuth::UserPassword(u, p) => connect.user_and_password(u.clone(), p.clone()),
    };
    connect
        .connect(options.url.as_str())
        .await
        .map_err(|e| QueueError::Storage(format!("connecting to NATS: {e}")))
}

/// Creates (or checks) the events, dead-letter and check streams; returns the first two.
async fn ensure_streams(
    js: &jetstream::Context,
    options: &JetStreamOptions,
) -> Result<(stream::Stream, stream::Stream), QueueError> {
    let upper = options
        .prefix
        .to_ascii_uppercase()
        .replace(['.', '*', '>'], "_");
    let p = &options.prefix;
    // What the three streams share: a name under the prefix, one subject, the storage.
    let base = |name: &str, subject: String| stream::Config {
        name: format!("{upper}_{name}"),
        subjects: vec![subject],
        storage: options.storage,
        num_replicas: options.replicas,
        ..Default::default()
    };
    let events = ensure_stream(
        js,
        stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            max_bytes: options.max_bytes,
            // At max_bytes refuse the new event (the ingress answers 503); the default
            // would delete the oldest, acknowledged ones.
            discard: stream::DiscardPolicy::New,
            duplicate_window: options.dedupe_window,
            allow_direct: true,
            ..base("EVENTS", format!("{p}.events.>"))
        },
    )
    .await?;
    let dead = ensure_stream(
        js,
        stream::Config {
            retention: stream::RetentionPolicy::Limits,
            max_age: options.dead_letter_max_age,
            duplicate_window: Duration::from_secs(120),
            ..base("DEAD", format!("{p}.dead.>"))
        },
    )
    .await?;
    ensure_stream(
        js,
        stream::Config {
            max_messages_per_subject: 1,
            ..base("CHECK", format!("{p}.check"))
        },
    )
    .await?;
    Ok((events, dead))
}

/// Starts the count refresher and the lease keep-alive; both stop with the last `Inner`.
fn spawn_background(
    inner: &Arc<Inner>,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let weak = Arc::downgrade(inner);
    let refresher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(inner) = weak.upgrade() else { return };
            if let Err(e) = inner.refresh_counts().await {
                tracing::debug!(error = %e, "queue counts not refreshed");
            }
        }
    });
    let weak = Arc::downgrade(inner);
    let keepalive = tokio::spawn(async move {
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let every = (inner.options.ack_wait / 3).max(Duration::from_millis(100));
            inner.keep_leases_alive(every).await;
            drop(inner);
            tokio::time::sleep(every / 2).await;
        }
    });
    (refresher, keepalive)
}

/// Creates a stream, or brings an existing one to the settings an update may change
/// (replicas, limits, discard policy, duplicate window), so that changed flags take effect
/// at start-up. The storage type cannot change in place: a mismatch is an error that says so.
async fn ensure_stream(
    js: &jetstream::Context,
    want: stream::Config,
) -> Result<stream::Stream, QueueError> {
    let name = want.name.clone();
    let stream = js
        .get_or_create_stream(want.clone())
        .await
        .map_err(storage)?;
    let have = stream.cached_info().config.clone();
    if have.storage != want.storage {
        return Err(QueueError::Storage(format!(
            "stream {name} has {:?} storage but {:?} is configured; NATS cannot change a \
             stream's storage in place: move its messages or delete the stream",
            have.storage, want.storage
        )));
    }
    let differs = have.num_replicas.max(1) != want.num_replicas.max(1)
        || have.max_bytes != want.max_bytes
        || have.max_age != want.max_age
        || have.discard != want.discard
        || have.duplicate_window != want.duplicate_window;
    if !differs {
        return Ok(stream);
    }
    let next = stream::Config {
        num_replicas: want.num_replicas,
        max_bytes: want.max_bytes,
        max_age: want.max_age,
        discard: want.discard,
        duplicate_window: want.duplicate_window,
        ..have
    };
    js.update_stream(next).await.map_err(storage)?;
    tracing::info!(stream = %name, replicas = want.num_replicas, max_bytes = want.max_bytes, max_age = ?want.max_age, "stream settings updated");
    js.get_stream(&name).await.map_err(storage)
}

fn storage<E: std::fmt::Display>(e: E) -> QueueError {
    QueueError::Storage(e.to_string())
}

struct Leased {
    key: EndpointKey,
    msg: jetstream::Message,
    /// When the last in-progress ack (or the lease itself) renewed the server's timer.
    renewed: Instant,
}

/// When a dead letter whose publish failed is handed out again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Most messages one pull asks for.
const MAX_PULL: usize = 128;

/// What a pull ahead asks for: about this long of what the endpoint's leases took lately.
const PULL_AHEAD: Duration = Duration::from_millis(100);

/// Messages pulled from the server for the leases to come, per endpoint.
#[derive(Default)]
struct Parked {
    /// Oldest first, each with the time it was pulled.
    msgs: std::collections::VecDeque<(jetstream::Message, Instant)>,
    /// Bumped by a purge: a pull under way at that moment parks nothing.
    generation: u64,
    handed_out: LeaseRate,
}

/// Messages handed out by leases, counted per second.
#[derive(Default)]
struct LeaseRate {
    since: Option<Instant>,
    this_second: u64,
    last_second: u64,
}

impl LeaseRate {
    fn record(&mut self, n: usize, now: Instant) {
        let since = *self.since.get_or_insert(now);
        let elapsed = now.duration_since(since);
        if elapsed >= Duration::from_secs(1) {
            self.last_second = if elapsed < Duration::from_secs(2) {
                self.this_second
            } else {
                0
            };
            self.this_second = 0;
            self.since = Some(now);
        }
        self.this_second += n as u64;
    }

    /// How many messages to pull at once: what leases take in [`PULL_AHEAD`], so a busy
    /// endpoint's worker finds the next messages parked while a slow one holds none
    /// longer than it must.
    fn batch(&self) -> usize {
        let per_second = self.this_second.max(self.last_second) as f64;
        ((per_second * PULL_AHEAD.as_secs_f64()) as usize).clamp(1, MAX_PULL)
    }
}

/// The two pulls an endpoint may have under way, at most one of each.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum PullKind {
    /// What is pending now, without waiting: keeps the leases supplied.
    Ahead,
    /// The next message, waiting for it: `wait_due`.
    Next,
}

/// A pull under way in a task of its own; its error, when it failed, as text.
type PullTask = futures::future::Shared<futures::future::BoxFuture<'static, Result<(), String>>>;

/// Tries of an ack or NAK the server does not confirm, and the pause before each retry.
const SETTLE_BACKOFF: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(400),
];

#[derive(Default)]
struct Counts {
    /// In the events stream (pending or leased anywhere), per endpoint.
    stored: HashMap<EndpointKey, u64>,
    dead: HashMap<EndpointKey, u64>,
}

struct Inner {
    js: jetstream::Context,
    options: JetStreamOptions,
    events: stream::Stream,
    dead: stream::Stream,
    consumers: tokio::sync::Mutex<HashMap<EndpointKey, consumer::PullConsumer>>,
    /// Messages pulled for the next leases.
    parked: Mutex<HashMap<EndpointKey, Parked>>,
    /// Delivery stopped (`return_prefetched`): a pull that ends now gives back what it
    /// brings instead of parking it. The next lease or wait clears it.
    stopped: std::sync::atomic::AtomicBool,
    /// The pulls under way.
    pulls: Mutex<HashMap<(EndpointKey, PullKind), PullTask>>,
    leased: Mutex<HashMap<u64, Leased>>,
    next_receipt: AtomicU64,
    counts: Mutex<Counts>,
    known: Mutex<HashSet<EndpointKey>>,
}

/// The JetStream queue. Cheap to share behind an `Arc`; dropping it stops the count refresher.
pub struct JetStreamQueue {
    inner: Arc<Inner>,
    refresher: tokio::task::JoinHandle<()>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for JetStreamQueue {
    fn drop(&mut self) {
        self.refresher.abort();
        self.keepalive.abort();
    }
}

impl JetStreamQueue {
    /// Connects, creates (or checks) the streams and starts the count refresher.
    pub async fn connect(options: JetStreamOptions) -> Result<Self, QueueError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(options.request_timeout)
            .build(dial(&options).await?);
        let (events, dead) = ensure_streams(&js, &options).await?;
        let inner = Arc::new(Inner {
            js,
            options,
            events,
            dead,
            consumers: Default::default(),
            parked: Default::default(),
            stopped: Default::default(),
            pulls: Default::default(),
            leased: Default::default(),
            next_receipt: AtomicU64::new(1),
            counts: Default::default(),
            known: Default::default(),
        });
        let _ = inner.refresh_counts().await;
        let (refresher, keepalive) = spawn_background(&inner);
        Ok(Self {
            inner,
            refresher,
            keepalive,
        })
    }

    /// The NATS connection, for other cluster traffic (health sharing).
    pub fn nats_client(&self) -> async_nats::Client {
        self.inner.js.client()
    }

    /// Refreshes the counts `depth` and `endpoint_depth` read now (they lag by up to 1 s).
    pub async fn refresh_counts(&self) -> Result<(), QueueError> {
        self.inner.refresh_counts().await
    }
}

impl Inner {
    fn subject(&self, kind: &str, key: &EndpointKey) -> String {
        format!(
            "{}.{kind}.{}.{}",
            self.options.prefix,
            escape_token(&key.namespace),
            escape_token(&key.name)
        )
    }

    fn key_of(&self, kind: &str, subject: &str) -> Option<EndpointKey> {
        let rest = subject.strip_prefix(&format!("{}.{kind}.", self.options.prefix))?;
        let (ns, name) = rest.split_once('.')?;
        Some(EndpointKey::new(unescape_token(ns)?, unescape_token(name)?))
    }

    /// Messages per endpoint in `stream`, whose subjects are `<prefix>.<kind>.<ns>.<name>`.
    async fn counts_by_endpoint(
        &self,
        stream: &stream::Stream,
        kind: &str,
    ) -> Result<HashMap<EndpointKey, u64>, QueueError> {
        let mut counts = HashMap::new();
        let mut info = stream
            .info_with_subjects(format!("{}.{kind}.>", self.options.prefix))
            .await
            .map_err(storage)?;
        while let Some((subject, n)) = info.try_next().await.map_err(storage)? {
            if let Some(k) = self.key_of(kind, &subject) {
                counts.insert(k, n as u64);
            }
        }
        Ok(counts)
    }

    async fn refresh_counts(&self) -> Result<(), QueueError> {
        let stored = self.counts_by_endpoint(&self.events, "events").await?;
        let dead = self.counts_by_endpoint(&self.dead, "dead").await?;
        {
            let mut known = self.known.lock().expect("known lock");
            known.extend(stored.keys().cloned());
            known.extend(dead.keys().cloned());
        }
        *self.counts.lock().expect("counts lock") = Counts { stored, dead };
        Ok(())
    }

    async fn consumer(&self, key: &EndpointKey) -> Result<consumer::PullConsumer, QueueError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(key) {
            return Ok(c.clone());
        }
        // Consumer names cannot hold dots; a hash of the key is short and collision-free
        // in practice. The description names the endpoint for `nats consumer ls`.
        let digest = Sha256::digest(format!("{}\n{}", key.namespace, key.name));
        let name = format!("ep-{}", &hex::encode(digest)[..32]);
        let c = self
            .events
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("deliveries of {key}")),
                    filter_subject: self.subject("events", key),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: self.options.max_deliver,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(storage)?;
        consumers.insert(key.clone(), c.clone());
        self.known.lock().expect("known lock").insert(key.clone());
        Ok(c)
    }

    fn take(&self, event: &QueuedEvent) -> Result<Leased, QueueError> {
        self.leased
            .lock()
            .expect("leased lock")
            .remove(&event.receipt.0)
            .ok_or(QueueError::UnknownReceipt)
    }

    /// Acks or NAKs a message, repeating it while the server does not confirm (the same
    /// ack twice is harmless). When it never confirms, the lease is dropped here and the
    /// server hands the message out again after `ack_wait`: the only case left to it.
    async fn settle(&self, msg: &jetstream::Message, kind: AckKind) -> Result<(), QueueError> {
        let mut last = None;
        for pause in SETTLE_BACKOFF {
            tokio::time::sleep(pause).await;
            match msg.double_ack_with(kind).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        let e = last.map(storage).unwrap_or(QueueError::Closed);
        tracing::warn!(error = %e, ?kind, "the server did not confirm an ack; it redelivers after ack_wait");
        Err(e)
    }

    /// NAKs without waiting for a confirmation: for messages this replica will not
    /// attempt (a failed lease, a stale prefetch).
    async fn give_back(&self, msg: &jetstream::Message) {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "giving a message back failed; it returns after ack_wait");
        }
    }

    /// The pull of `kind` under way for `endpoint`, started if there is none: `n` messages
    /// at most, waiting up to `max_wait` for the first one when `kind` is
    /// [`PullKind::Next`]. The pull runs in a task of its own, so a caller that stops
    /// waiting never drops messages the server is handing out (they would stay leased,
    /// unseen, until `ack_wait`); what it receives is parked for the next `lease`.
    fn pull(
        self: &Arc<Self>,
        endpoint: &EndpointKey,
        kind: PullKind,
        n: usize,
        max_wait: Duration,
    ) -> PullTask {
        let mut pulls = self.pulls.lock().expect("pulls lock");
        let slot = (endpoint.clone(), kind);
        if let Some(p) = pulls.get(&slot).filter(|p| p.peek().is_none()) {
            return p.clone();
        }
        let generation = self
            .parked
            .lock()
            .expect("parked lock")
            .get(endpoint)
            .map_or(0, |p| p.generation);
        let wait = (kind == PullKind::Next).then_some(max_wait);
        let task = tokio::spawn(
            self.clone()
                .pull_and_park(endpoint.clone(), n, wait, generation),
        );
        let p = futures::FutureExt::shared(futures::FutureExt::boxed(async move {
            task.await.unwrap_or_else(|e| Err(e.to_string()))
        }));
        pulls.insert(slot, p.clone());
        p
    }

    async fn pull_and_park(
        self: Arc<Self>,
        endpoint: EndpointKey,
        n: usize,
        wait: Option<Duration>,
        generation: u64,
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut got = Vec::new();
        // A pull whose server went away mid-request may never end: bounded. What arrived
        // before the bound or an error is kept: dropping it would leave it leased until
        // ack_wait.
        let bound = wait.unwrap_or_default() + self.options.request_timeout;
        let pulled = tokio::time::timeout(bound, async {
            let consumer = self.consumer(&endpoint).await?;
            let batch = match wait {
                None => consumer.fetch().max_messages(n).messages().await,
                Some(w) => {
                    consumer
                        .batch()
                        .max_messages(n)
                        .expires(w.max(Duration::from_millis(100)))
                        .messages()
                        .await
                }
            };
            let mut batch = batch.map_err(storage)?;
            while let Some(m) = batch.next().await {
                got.push(m.map_err(storage)?);
            }
            Ok::<_, QueueError>(())
        })
        .await
        .unwrap_or_else(|_| Err(QueueError::Storage("pull timed out".into())));
        let unwanted = {
            let mut parked = self.parked.lock().expect("parked lock");
            let p = parked.entry(endpoint.clone()).or_default();
            if p.generation == generation && !self.stopped.load(Ordering::Acquire) {
                let now = Instant::now();
                p.msgs.extend(got.drain(..).map(|m| (m, now)));
                false
            } else {
                true
            }
        };
        if unwanted {
            // Purged from the stream while they were on their way (never hand them out),
            // or delivery stopped meanwhile (another replica may deliver them now).
            for msg in got {
                self.give_back(&msg).await;
            }
        }
        if let Err(e) = &pulled {
            tracing::debug!(endpoint = %endpoint, error = %e, "pull failed or cut short");
            if let Some(w) = wait {
                // Do not spin while the server is away.
                tokio::time::sleep(w.saturating_sub(started.elapsed())).await;
            }
        }
        pulled.map_err(|e| e.to_string())
    }

    /// Up to `max` parked messages of `endpoint`, oldest first, and the endpoint's batch
    /// size; starts a pull ahead when fewer than a batch stay parked. A message parked past
    /// half its lease is given back rather than handed out with too little of `ack_wait`
    /// left.
    async fn take_parked(
        self: &Arc<Self>,
        endpoint: &EndpointKey,
        max: usize,
    ) -> (Vec<jetstream::Message>, usize) {
        let now = Instant::now();
        let (taken, batch, low) = {
            let mut parked = self.parked.lock().expect("parked lock");
            let p = parked.entry(endpoint.clone()).or_default();
            let n = p.msgs.len().min(max);
            let taken: Vec<_> = p.msgs.drain(..n).collect();
            p.handed_out.record(n, now);
            let batch = p.handed_out.batch();
            // Pulling ahead pays when leases take more than one message per PULL_AHEAD;
            // below that, a message parked for the next lease would only wait, leased
            // to this replica, where another replica could be delivering it.
            let low = n > 0 && batch > 1 && p.msgs.len() < batch;
            (taken, batch, low)
        };
        if low {
            drop(self.pull(endpoint, PullKind::Ahead, batch, Duration::ZERO));
        }
        let mut fresh = Vec::with_capacity(taken.len());
        for (msg, at) in taken {
            if now.duration_since(at) < self.options.ack_wait / 2 {
                fresh.push(msg);
            } else {
                self.give_back(&msg).await;
            }
        }
        (fresh, batch)
    }

    /// Sends an in-progress ack for every lease not renewed within `every`.
    async fn keep_leases_alive(&self, every: Duration) {
        let due: Vec<jetstream::Message> = {
            let mut leased = self.leased.lock().expect("leased lock");
            leased
                .values_mut()
                .filter(|l| l.renewed.elapsed() >= every)
                .map(|l| {
                    l.renewed = Instant::now();
                    l.msg.clone()
                })
                .collect()
        };
        for msg in due {
            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "in-progress ack failed");
            }
        }
    }

    async fn publish_confirmed(
        &self,
        subject: String,
        msg_id: &str,
        body: Bytes,
    ) -> Result<async_nats::jetstream::publish::PublishAck, QueueError> {
        let ack = self
            .js
            .send_publish(
                subject,
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(body)
                    .message_id(msg_id),
            )
            .await
            .map_err(storage)?;
        ack.await.map_err(storage)
    }

    /// Up to `limit` dead letters of `key` from stream sequence `from` on, in order.
    /// The page of `key`'s dead letters from `from` on, moving `from` past it; none at the end.
    async fn next_dead_page(
        &self,
        key: &EndpointKey,
        from: &mut u64,
    ) -> Result<Option<Vec<(u64, Envelope, Bytes)>>, QueueError> {
        let page = self.dead_page(key, *from, 256).await?;
        let Some(last) = page.last().map(|(seq, _, _)| *seq) else {
            return Ok(None);
        };
        *from = last + 1;
        Ok(Some(page))
    }

    async fn dead_page(
        &self,
        key: &EndpointKey,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Envelope, Bytes)>, QueueError> {
        let subject = self.subject("dead", key);
        let mut seq = from;
        let mut out = Vec::new();
        while out.len() < limit {
            let msg = match self
                .dead
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(storage(e)),
            };
            seq = msg.sequence + 1;
            match decode(&msg.payload) {
                Some((env, payload)) => out.push((msg.sequence, env, payload)),
                None => tracing::warn!(seq = msg.sequence, "skipping an unreadable dead letter"),
            }
        }
        Ok(out)
    }
}

impl Inner {
    /// The ids of `key`'s dead letters.
    async fn dead_ids(&self, key: &EndpointKey) -> Result<HashSet<String>, QueueError> {
        let mut ids = HashSet::new();
        let mut from = 1;
        while let Some(page) = self.next_dead_page(key, &mut from).await? {
            ids.extend(page.into_iter().map(|(_, env, _)| env.id));
        }
        Ok(ids)
    }

    /// Stores one exported event (see [`Queue::import`]); a dead letter's caller has
    /// checked that its endpoint has none with its id.
    async fn import_one(&self, ev: &ExportedEvent) -> Result<EnqueueOutcome, QueueError> {
        let key = ev.endpoint_key();
        let payload = ev.payload_bytes().map_err(QueueError::Storage)?;
        let env = Envelope {
            id: ev.id.clone(),
            ns: ev.namespace.clone(),
            name: ev.endpoint.clone(),
            sub: ev.subscription.clone(),
            ty: ev.event_type.clone(),
            key: ev.dedupe_key.clone(),
            received_ms: ev.received_ms,
            base_attempts: ev.attempts,
            dead_ms: ev.dead_lettered_ms,
            reason: ev.reason.clone().filter(|_| ev.is_dead()),
            tp: ev.traceparent.clone(),
            h: ev.headers.clone(),
        };
        let (subject, msg_id) = if ev.is_dead() {
            (self.subject("dead", &key), format!("import-{}", ev.id))
        } else {
            // The id an enqueue of the same key would have: deduplicated against events
            // the ingress stores as well as against an earlier import.
            let digest = Sha256::digest(format!(
                "{}\n{}\n{}",
                ev.namespace, ev.endpoint, ev.dedupe_key
            ));
            (self.subject("events", &key), hex::encode(digest))
        };
        let ack = self
            .publish_confirmed(subject, &msg_id, encode(&env, &payload))
            .await?;
        self.known.lock().expect("known lock").insert(key);
        Ok(if ack.duplicate {
            EnqueueOutcome::Duplicate
        } else {
            EnqueueOutcome::Accepted { id: ev.id.clone() }
        })
    }
}

/// The part of an event's `Nats-Msg-Id` its own dedupe window adds: the number of the
/// slot of that length its receipt falls in, so that two receipts of one key in different
/// slots are both stored. Receipts a window or more apart always fall in different slots
/// (never a duplicate past the window); two a moment apart across a slot's end are both
/// delivered (a duplicate delivery, as with any at-least-once delivery, never a lost event).
fn window_slot(ev: &NewEvent) -> String {
    match ev.dedupe_window.map(|w| w.as_millis() as u64) {
        Some(w) if w > 0 => format!("\n{}", to_millis(ev.received) / w),
        _ => String::new(),
    }
}

#[async_trait::async_trait]
impl Queue for JetStreamQueue {
    async fn import(&self, events: Vec<ExportedEvent>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let mut dead: HashMap<EndpointKey, HashSet<String>> = HashMap::new();
        let mut out = Vec::with_capacity(events.len());
        for ev in &events {
            let key = ev.endpoint_key();
            if ev.is_dead() {
                if !dead.contains_key(&key) {
                    let ids = self.inner.dead_ids(&key).await?;
                    dead.insert(key.clone(), ids);
                }
                let ids = dead.get_mut(&key).expect("read above");
                if !ids.insert(ev.id.clone()) {
                    out.push(EnqueueOutcome::Duplicate);
                    continue;
                }
            }
            out.push(self.inner.import_one(ev).await?);
        }
        Ok(out)
    }

    async fn enqueue(&self, events: Vec<NewEvent>) -> Result<Vec<EnqueueOutcome>, QueueError> {
        let inner = &self.inner;
        let mut acks = Vec::with_capacity(events.len());
        for ev in &events {
            let id = format!("msg_{:032x}", rand::random::<u128>());
            let env = Envelope {
                id: id.clone(),
                ns: ev.endpoint.namespace.clone(),
                name: ev.endpoint.name.clone(),
                sub: ev.subscription.clone(),
                ty: ev.event_type.clone(),
                key: ev.dedupe_key.clone(),
                received_ms: to_millis(ev.received),
                base_attempts: 0,
                dead_ms: None,
                reason: None,
                tp: ev.traceparent.clone(),
                h: ev.headers.clone(),
            };
            let digest = Sha256::digest(format!(
                "{}\n{}\n{}{}",
                ev.endpoint.namespace,
                ev.endpoint.name,
                ev.dedupe_key,
                window_slot(ev)
            ));
            let ack = inner
                .js
                .send_publish(
                    inner.subject("events", &ev.endpoint),
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(encode(&env, &ev.payload))
                        .message_id(hex::encode(digest)),
                )
                .await
                .map_err(storage)?;
            acks.push((id, ack));
        }
        // The durability point: every PubAck means "stored in the stream".
        let mut outcomes = Vec::with_capacity(acks.len());
        for (id, ack) in acks {
            let ack = ack.await.map_err(storage)?;
            outcomes.push(if ack.duplicate {
                EnqueueOutcome::Duplicate
            } else {
                EnqueueOutcome::Accepted { id }
            });
        }
        let mut known = inner.known.lock().expect("known lock");
        for ev in &events {
            if !known.contains(&ev.endpoint) {
                known.insert(ev.endpoint.clone());
            }
        }
        Ok(outcomes)
    }

    async fn lease(
        &self,
        endpoint: &EndpointKey,
        max: usize,
        _now: SystemTime,
    ) -> Result<Vec<QueuedEvent>, QueueError> {
        let inner = &self.inner;
        inner.stopped.store(false, Ordering::Release);
        if max == 0 {
            return Ok(Vec::new());
        }
        let (mut msgs, batch) = inner.take_parked(endpoint, max).await;
        if msgs.is_empty() {
            // Nothing parked: pull now (or join the pull ahead under way) and wait for it.
            // Under load a worker leases as its attempts finish, often one event at a
            // time, and a pull is a round trip to the server: it asks for a batch sized to
            // what the endpoint takes, and `take_parked` pulls the next one ahead.
            let pulled = inner
                .pull(endpoint, PullKind::Ahead, max.max(batch), Duration::ZERO)
                .await;
            msgs = inner.take_parked(endpoint, max).await.0;
            if let (true, Err(e)) = (msgs.is_empty(), pulled) {
                return Err(QueueError::Storage(e));
            }
        }
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let (delivered, seq) = match msg.info() {
                Ok(i) => (i.delivered.max(1) as u32, i.stream_sequence),
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint, error = %e, "a message without JetStream info; given back");
                    inner.give_back(&msg).await;
                    continue;
                }
            };
            let Some((env, payload)) = decode(&msg.payload) else {
                tracing::warn!(endpoint = %endpoint, seq, "dropping an unreadable queue message");
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            };
            let attempts = env.base_attempts + delivered - 1;
            let receipt = Receipt(inner.next_receipt.fetch_add(1, Ordering::Relaxed));
            let event = QueuedEvent {
                receipt,
                id: env.id.clone(),
                endpoint: endpoint.clone(),
                subscription: env.sub.clone(),
                event_type: env.ty.clone(),
                kind: EventKind::of_dedupe_key(&env.key),
                dedupe_key: env.key.clone(),
                payload,
                received: from_millis(env.received_ms),
                attempts,
                next_attempt: SystemTime::now(),
                last_error: None,
                traceparent: env.tp.clone(),
                headers: env.h.clone(),
            };
            inner.leased.lock().expect("leased lock").insert(
                receipt.0,
                Leased {
                    key: endpoint.clone(),
                    msg,
                    renewed: Instant::now(),
                },
            );
            if i64::from(delivered) >= inner.options.max_deliver {
                let reason = format!("redelivered {delivered} times without an outcome");
                tracing::warn!(endpoint = %endpoint, id = %event.id, "{reason}; dead-lettered");
                // On failure it was NAKed to come back shortly: nothing is left leased.
                if let Err(e) = self.dead_letter(&event, &reason).await {
                    tracing::warn!(endpoint = %endpoint, error = %e, "dead-lettering failed");
                }
                continue;
            }
            out.push(event);
        }
        Ok(out)
    }

    async fn wait_due(&self, endpoint: &EndpointKey, max_wait: Duration) {
        let inner = &self.inner;
        inner.stopped.store(false, Ordering::Release);
        if inner
            .parked
            .lock()
            .expect("parked lock")
            .get(endpoint)
            .is_some_and(|p| !p.msgs.is_empty())
        {
            return;
        }
        let pull = inner.pull(endpoint, PullKind::Next, 1, max_wait);
        let _ = tokio::time::timeout(max_wait + inner.options.request_timeout, pull).await;
    }

    async fn ack(&self, event: &QueuedEvent) -> Result<(), QueueError> {
        let leased = self.inner.take(event)?;
        self.inner.settle(&leased.msg, AckKind::Ack).await
    }

    async fn retry(
        &self,
        event: &QueuedEvent,
        next_attempt: SystemTime,
        _error: &str,
    ) -> Result<(), QueueError> {
        let leased = self.inner.take(event)?;
        let delay = next_attempt
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        self.inner
            .settle(&leased.msg, AckKind::Nak(Some(delay)))
            .await
    }

    async fn dead_letter(&self, event: &QueuedEvent, reason: &str) -> Result<(), QueueError> {
        let inner = &self.inner;
        let leased = inner.take(event)?;
        let seq = leased.msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let env = Envelope {
            id: event.id.clone(),
            ns: event.endpoint.namespace.clone(),
            name: event.endpoint.name.clone(),
            sub: event.subscription.clone(),
            ty: event.event_type.clone(),
            key: event.dedupe_key.clone(),
            received_ms: to_millis(event.received),
            base_attempts: event.attempts + 1,
            dead_ms: Some(to_millis(SystemTime::now())),
            reason: Some(reason.chars().take(200).collect()),
            tp: event.traceparent.clone(),
            h: event.headers.clone(),
        };
        // The msg id makes a repeated dead-letter of the same stored message a no-op.
        let stored = inner
            .publish_confirmed(
                inner.subject("dead", &leased.key),
                &format!("dead-{}-{seq}", event.id),
                encode(&env, &event.payload),
            )
            .await;
        if let Err(e) = stored {
            // Not stored as a dead letter: back soon for another try, not after ack_wait.
            let _ = inner
                .settle(&leased.msg, AckKind::Nak(Some(DEAD_LETTER_RETRY)))
                .await;
            return Err(e);
        }
        // Stored as a dead letter. If the ack never lands the original comes back after
        // ack_wait and is dead-lettered again (same msg id: deduplicated).
        inner.settle(&leased.msg, AckKind::Ack).await
    }

    async fn release(&self, event: &QueuedEvent) -> Result<(), QueueError> {
        let leased = self.inner.take(event)?;
        self.inner.settle(&leased.msg, AckKind::Nak(None)).await
    }

    async fn replay(
        &self,
        endpoint: &EndpointKey,
        filter: ReplayFilter,
        _now: SystemTime,
    ) -> Result<u64, QueueError> {
        let inner = &self.inner;
        let mut n = 0;
        let mut from = 1;
        while let Some(page) = inner.next_dead_page(endpoint, &mut from).await? {
            for (seq, mut env, payload) in page {
                let dead_at = from_millis(env.dead_ms.unwrap_or(0));
                if !filter.matches(dead_at, from_millis(env.received_ms)) {
                    continue;
                }
                env.base_attempts = 0;
                env.dead_ms = None;
                env.reason = None;
                inner
                    .publish_confirmed(
                        inner.subject("events", endpoint),
                        &format!("replay-{}-{seq}", env.id),
                        encode(&env, &payload),
                    )
                    .await?;
                inner.dead.delete_message(seq).await.map_err(storage)?;
                n += 1;
            }
        }
        let _ = inner.refresh_counts().await;
        Ok(n)
    }

    async fn prune_dead_letters(
        &self,
        endpoint: &EndpointKey,
        before: SystemTime,
    ) -> Result<u64, QueueError> {
        let inner = &self.inner;
        let before = to_millis(before);
        let mut n = 0;
        let mut from = 1;
        while let Some(page) = inner.next_dead_page(endpoint, &mut from).await? {
            for (seq, env, _) in page {
                if env.dead_ms.unwrap_or(0) < before {
                    inner.dead.delete_message(seq).await.map_err(storage)?;
                    n += 1;
                }
            }
        }
        if n > 0 {
            let _ = inner.refresh_counts().await;
        }
        Ok(n)
    }

    async fn purge(&self, endpoint: &EndpointKey) -> Result<u64, QueueError> {
        let inner = &self.inner;
        let mut n = 0;
        for (stream, kind) in [(&inner.events, "events"), (&inner.dead, "dead")] {
            n += stream
                .purge()
                .filter(inner.subject(kind, endpoint))
                .await
                .map_err(storage)?
                .purged;
        }
        // Messages parked for the next lease were purged with the rest: never hand them
        // out, nor any a pull under way brings.
        if let Some(p) = inner.parked.lock().expect("parked lock").get_mut(endpoint) {
            p.msgs.clear();
            p.generation += 1;
        }
        inner.consumers.lock().await.remove(endpoint);
        inner.known.lock().expect("known lock").remove(endpoint);
        let _ = inner.refresh_counts().await;
        Ok(n)
    }

    async fn return_prefetched(&self) {
        let inner = &self.inner;
        inner.stopped.store(true, Ordering::Release);
        // A pull under way gives back what it brings itself (see `pull_and_park`).
        let parked: Vec<jetstream::Message> = inner
            .parked
            .lock()
            .expect("parked lock")
            .values_mut()
            .flat_map(|p| p.msgs.drain(..).map(|(m, _)| m))
            .collect();
        for msg in parked {
            inner.give_back(&msg).await;
        }
    }

    fn endpoints(&self) -> Vec<EndpointKey> {
        let mut v: Vec<_> = self
            .inner
            .known
            .lock()
            .expect("known lock")
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn depth(&self) -> QueueDepth {
        let counts = self.inner.counts.lock().expect("counts lock");
        let leased = self.inner.leased.lock().expect("leased lock").len() as u64;
        let stored: u64 = counts.stored.values().sum();
        QueueDepth {
            pending: stored.saturating_sub(leased),
            leased,
            dead_lettered: counts.dead.values().sum(),
        }
    }

    fn endpoint_depth(&self, endpoint: &EndpointKey) -> QueueDepth {
        let counts = self.inner.counts.lock().expect("counts lock");
        let leased = self
            .inner
            .leased
            .lock()
            .expect("leased lock")
            .values()
            .filter(|l| &l.key == endpoint)
            .count() as u64;
        let stored = counts.stored.get(endpoint).copied().unwrap_or(0);
        QueueDepth {
            pending: stored.saturating_sub(leased),
            leased,
            dead_lettered: counts.dead.get(endpoint).copied().unwrap_or(0),
        }
    }

    async fn check_writable(&self) -> Result<(), QueueError> {
        let inner = &self.inner;
        inner
            .publish_confirmed(
                format!("{}.check", inner.options.prefix),
                &format!("check-{:032x}", rand::random::<u128>()),
                Bytes::from_static(b"ok"),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_asks_for_a_tenth_of_a_second_of_recent_leases_within_bounds() {
        let start = Instant::now();
        let mut rate = LeaseRate::default();
        assert_eq!(rate.batch(), 1, "nothing leased yet: one at a time");
        rate.record(300, start);
        rate.record(200, start + Duration::from_millis(500));
        assert_eq!(rate.batch(), 50, "500 in this second");
        rate.record(10, start + Duration::from_millis(1200));
        assert_eq!(rate.batch(), 50, "the last full second still counts");
        rate.record(5, start + Duration::from_millis(3500));
        assert_eq!(rate.batch(), 1, "an idle second in between forgets it");
        rate.record(1_000_000, start + Duration::from_millis(3600));
        assert_eq!(rate.batch(), MAX_PULL);
    }

    #[test]
    fn tokens_round_trip_and_stay_single_tokens() {
        for s in ["apps", "my-endpoint", "a.b.c", "", "Ünï code*>", "x_y", "_"] {
            let t = escape_token(s);
            assert!(!t.is_empty());
            assert!(
                !t.contains(['.', '*', '>', ' ']),
                "{s:?} escaped to {t:?} is not one subject token"
            );
            assert_eq!(unescape_token(&t).as_deref(), Some(s), "{s:?} via {t:?}");
        }
        assert_ne!(escape_token("a.b"), escape_token("a_b"));
    }

    #[test]
    fn envelope_round_trips_with_payload() {
        let env = Envelope {
            id: "msg_1".into(),
            ns: "n".into(),
            name: "e".into(),
            sub: "s".into(),
            ty: "call.finished".into(),
            key: "k\r\nwith newline".into(),
            received_ms: 42,
            base_attempts: 3,
            dead_ms: None,
            reason: None,
            tp: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            h: "user-agent: atlas\n".into(),
        };
        let body = encode(&env, b"{\"a\":1}");
        let (back, payload) = decode(&body).unwrap();
        assert_eq!(back.key, env.key);
        assert_eq!(back.tp, env.tp);
        assert_eq!(back.h, env.h);
        assert_eq!(back.base_attempts, 3);
        assert_eq!(&payload[..], b"{\"a\":1}");
        assert!(decode(&Bytes::from_static(b"\0\0\0\xffshort")).is_none());
    }
}
