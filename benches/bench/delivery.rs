//! Sections 1–3: the delivery path on loopback. A load generator POSTs 1 KiB provider-shaped
//! events (Atlas arrays and signed Smallest envelopes) to the real ingress of the data plane
//! (real `ProviderParser`, real redb file), a loopback consumer counts deliveries and reads
//! the send time embedded in each payload. The same load then goes through a bare
//! pass-through forwarder (axum on hyper in, reqwest on hyper out, no durability, no
//! verification, no signing) to the same consumer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use webhook_operator::api::Provider;
use webhook_operator::dataplane::{
    DataPlane, DataPlaneConfig, EndpointConfig, EndpointKey, SubscriptionRoute,
};
use webhook_operator::delivery::{Destination, Policy, SigningSecret};
use webhook_operator::inbound::VerificationKeys;
use webhook_operator::providers::{ProviderParser, sign_hex};

const EVENT_BYTES: usize = 1024;
const SMALLEST_SECRET: &[u8] = b"bench-smallest-signing-secret";
const SEND_MARK: &[u8] = b"\"benchSentUs\":";

/// Microseconds since the process's first call: generator and consumer share the clock.
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Latencies in microseconds; p50/p99/max in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut v: Vec<u32>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Latency {
            count: v.len(),
            p50_ms: at(0.50) as f64 / 1000.0,
            p99_ms: at(0.99) as f64 / 1000.0,
            max_ms: *v.last().unwrap() as f64 / 1000.0,
        }
    }
}

/// The loopback consumer: counts deliveries, records send-to-receipt latency.
#[derive(Default)]
struct Consumer {
    delivered: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

impl Consumer {
    fn record(&self, body: &[u8]) {
        let now = now_us();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(sent) = sent_us(body) {
            let lat = now.saturating_sub(sent).min(u32::MAX as u64) as u32;
            self.latencies.lock().unwrap().push(lat);
        }
    }

    fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.latencies.lock().unwrap())
    }
}

fn sent_us(body: &[u8]) -> Option<u64> {
    let at = body.windows(SEND_MARK.len()).position(|w| w == SEND_MARK)? + SEND_MARK.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

async fn serve(router: axum::Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

async fn start_consumer(consumer: Arc<Consumer>) -> anyhow::Result<SocketAddr> {
    serve(axum::Router::new().fallback(move |body: Bytes| {
        let c = consumer.clone();
        async move {
            c.record(&body);
            "ok"
        }
    }))
    .await
}

/// The baseline: takes the POST body and forwards it to the consumer, answering with the
/// consumer's status. Nothing is stored, verified or signed.
async fn start_forwarder(consumer: SocketAddr) -> anyhow::Result<SocketAddr> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let url = format!("http://{consumer}/in");
    serve(axum::Router::new().fallback(move |body: Bytes| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            match client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) => http::StatusCode::from_u16(r.status().as_u16())
                    .unwrap_or(http::StatusCode::BAD_GATEWAY),
                Err(_) => http::StatusCode::BAD_GATEWAY,
            }
        }
    }))
    .await
}

/// One request's worth of load: URL, extra header, body.
struct Shot {
    url: String,
    signature: Option<String>,
    body: Vec<u8>,
}

/// Builds the n-th event: even n an Atlas array of one event, odd n a signed Smallest
/// envelope; both padded to [`EVENT_BYTES`] and carrying the send time.
struct Shots {
    base: String,
    run: u64,
}

impl Shots {
    fn shot(&self, n: u64) -> Shot {
        let sent = now_us();
        let pad = |head: &str, tail: &str| {
            let fill = EVENT_BYTES.saturating_sub(head.len() + tail.len());
            let mut s = String::with_capacity(EVENT_BYTES);
            s.push_str(head);
            s.extend(std::iter::repeat_n('x', fill));
            s.push_str(tail);
            s.into_bytes()
        };
        if n.is_multiple_of(2) {
            let head = format!(
                "[{{\"callId\":\"r{}-c{n}\",\"campaignId\":\"camp-bench\",\"triggerName\":\"call_completed\",\
                 \"customerNumber\":\"+15550100\",\"benchSentUs\":{sent},\"transcript\":\"",
                self.run
            );
            Shot {
                url: format!("{}/atlas", self.base),
                signature: None,
                body: pad(&head, "\"}]"),
            }
        } else {
            let head = format!(
                "{{\"id\":\"r{}-d{n}\",\"event\":\"65f0c0ffee00000000000001.post-conversation\",\
                 \"url\":\"https://hooks.example/x\",\"description\":\"bench\",\"metadata\":{{\
                 \"agentId\":\"65f0c0ffee00000000000001\",\"eventType\":\"post-conversation\",\
                 \"conversationType\":\"outbound\",\"callId\":\"c{n}\",\"benchSentUs\":{sent}}},\"summary\":\"",
                self.run
            );
            let body = pad(&head, "\"}");
            Shot {
                url: format!("{}/smallest", self.base),
                signature: Some(sign_hex(SMALLEST_SECRET, &body)),
                body,
            }
        }
    }
}

/// Where the load goes and what to count.
struct Target {
    client: reqwest::Client,
    shots: Shots,
    next: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
}

impl Target {
    async fn fire(&self) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let shot = self.shots.shot(n);
        let mut req = self
            .client
            .post(&shot.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(shot.body);
        if let Some(sig) = shot.signature {
            req = req.header("x-signature", sig);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                // Read the (small) answer so the connection goes back to the pool.
                let _ = r.bytes().await;
                self.accepted.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What one load phase measured.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub seconds: f64,
    pub offered_per_s: Option<f64>,
    pub accepted: u64,
    pub failed: u64,
    pub accepted_per_s: f64,
    /// Deliveries that reached the consumer during the load window, per second.
    pub delivered_per_s: f64,
    /// Deliveries in all, the drain after the window included.
    pub delivered_total: u64,
    /// From the end of the load window until every accepted event was delivered.
    pub drain_seconds: f64,
    pub latency: Latency,
}

/// Closed loop: `concurrency` senders, each sends its next event when the last answered.
async fn closed_loop(
    target: Arc<Target>,
    consumer: &Consumer,
    concurrency: usize,
    duration: Duration,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    consumer.take_latencies();
    let d0 = consumer.delivered.load(Ordering::Relaxed);
    let start = Instant::now();
    let senders: Vec<_> = (0..concurrency)
        .map(|_| {
            let (t, stop) = (target.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    t.fire().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let d1 = consumer.delivered.load(Ordering::Relaxed);
    let window = start.elapsed();
    for s in senders {
        let _ = s.await;
    }
    finish(&target, consumer, d0, d1, window, None).await
}

/// Open loop: events leave at `rate` per second whatever the answers do (bounded in flight).
async fn open_loop(
    target: Arc<Target>,
    consumer: &Consumer,
    rate: f64,
    duration: Duration,
) -> Phase {
    consumer.take_latencies();
    let d0 = consumer.delivered.load(Ordering::Relaxed);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(4096));
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while start.elapsed() < duration {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                // Over the in-flight bound: the system is not keeping up; count it as failed.
                target.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let t = target.clone();
            tokio::spawn(async move {
                t.fire().await;
                drop(permit);
            });
        }
    }
    let d1 = consumer.delivered.load(Ordering::Relaxed);
    let window = start.elapsed();
    let _ = tokio::time::timeout(Duration::from_secs(30), in_flight.acquire_many(4096)).await;
    finish(&target, consumer, d0, d1, window, Some(rate)).await
}

/// Waits (bounded) for the accepted events to be delivered and sums up.
async fn finish(
    target: &Target,
    consumer: &Consumer,
    d0: u64,
    d1: u64,
    window: Duration,
    offered: Option<f64>,
) -> Phase {
    let accepted = target.accepted.swap(0, Ordering::Relaxed);
    let failed = target.failed.swap(0, Ordering::Relaxed);
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(60);
    while consumer.delivered.load(Ordering::Relaxed) - d0 < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered_total = consumer.delivered.load(Ordering::Relaxed) - d0;
    let secs = window.as_secs_f64();
    Phase {
        seconds: secs,
        offered_per_s: offered,
        accepted,
        failed,
        accepted_per_s: accepted as f64 / secs,
        delivered_per_s: (d1 - d0) as f64 / secs,
        delivered_total,
        drain_seconds: drain_start.elapsed().as_secs_f64(),
        latency: Latency::of(consumer.take_latencies()),
    }
}

pub struct DeliveryResults {
    pub ours: Phase,
    pub baseline: Phase,
    pub half: Phase,
    pub max_in_flight: u32,
}

pub async fn run(concurrency: usize, duration: Duration) -> anyhow::Result<DeliveryResults> {
    now_us();
    let consumer = Arc::new(Consumer::default());
    let consumer_addr = start_consumer(consumer.clone()).await?;

    let dir = tempfile::tempdir()?;
    let config = DataPlaneConfig {
        queue_path: dir.path().join("queue.redb"),
        resolve_overrides: vec![("consumer.bench.svc:8080".into(), consumer_addr)],
        address_policy: webhook_operator::delivery::AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let dp = DataPlane::open(config, Arc::new(ProviderParser)).await?;
    let key = EndpointKey::new("bench", "orders");
    // The in-flight cap matches the offered concurrency (the API default is 16).
    let max_in_flight = concurrency as u32;
    dp.upsert_endpoint(EndpointConfig {
        key: key.clone(),
        token: "benchtoken".into(),
        destination: Destination::Service {
            name: "consumer".into(),
            namespace: "bench".into(),
            port: 8080,
            path: "/in".into(),
        },
        policy: Policy {
            max_in_flight,
            ..Policy::default()
        },
        signing_secrets: vec![SigningSecret::parse(b"bench-delivery-signing-secret")?],
        headers: vec![],
        max_queued_events: None,
        max_queued_bytes: None,
        ingress_rate_limit: None,
        event_types: vec![],
        format: Default::default(),
        filter: None,
    })?;
    dp.upsert_subscription(SubscriptionRoute {
        endpoint: key.clone(),
        name: "atlas".into(),
        provider: Provider::Atlas,
        keys: VerificationKeys::default(),
    });
    dp.upsert_subscription(SubscriptionRoute {
        endpoint: key,
        name: "smallest".into(),
        provider: Provider::Smallest,
        keys: VerificationKeys {
            secrets: vec![SMALLEST_SECRET.to_vec()],
            header_name: None,
            ..Default::default()
        },
    });
    let ingress = serve(dp.ingress_router()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = dp.start_delivery(async move {
        let _ = stopped.await;
    });
    let forwarder = start_forwarder(consumer_addr).await?;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .build()?;
    let target = |base: String, run: u64| {
        Arc::new(Target {
            client: client.clone(),
            shots: Shots { base, run },
            next: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    };
    let ours_base = format!("http://{ingress}/hooks/benchtoken");
    let run_id = rand::random::<u32>() as u64;

    // A short warm-up so connection set-up and first allocations fall outside the window.
    closed_loop(
        target(ours_base.clone(), run_id),
        &consumer,
        concurrency,
        Duration::from_millis(500),
    )
    .await;
    eprintln!("bench: delivery path, {concurrency} senders, {duration:?}");
    let ours = closed_loop(
        target(ours_base.clone(), run_id + 1),
        &consumer,
        concurrency,
        duration,
    )
    .await;
    eprintln!("bench: pass-through baseline");
    let baseline = closed_loop(
        target(format!("http://{forwarder}"), run_id + 2),
        &consumer,
        concurrency,
        duration,
    )
    .await;
    let half_rate = (ours.delivered_per_s / 2.0).max(1.0);
    eprintln!("bench: half load, {half_rate:.0} events/s offered");
    let half = open_loop(
        target(ours_base, run_id + 3),
        &consumer,
        half_rate,
        duration,
    )
    .await;

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), delivery).await;
    Ok(DeliveryResults {
        ours,
        baseline,
        half,
        max_in_flight,
    })
}
