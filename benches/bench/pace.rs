//! The consumer's pace (issue 47): a loopback consumer that allows 500 requests/s (a token
//! bucket, burst 25), works 20 ms on each request it takes and answers `429` with
//! `Retry-After: 1` above its rate. The data plane (in this process, a real redb file)
//! starts with a backlog and `maxInFlight` 64, once with adaptive concurrency and once
//! with a fixed concurrency. Reported: delivered/s over the phase and over its second
//! half (where it settles), the `429`s the consumer answered and the dead letters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use webhook_operator::dataplane::{
    DataPlane, DataPlaneConfig, EndpointConfig, EndpointKey, SubscriptionRoute,
};
use webhook_operator::delivery::{Destination, Policy, SigningSecret};
use webhook_operator::inbound::VerificationKeys;
use webhook_operator::providers::{Provider, ProviderParser};

pub const RATE: f64 = 500.0;
const BURST: f64 = 25.0;
const WORK: Duration = Duration::from_millis(20);
const MAX_IN_FLIGHT: u32 = 64;

/// The rate-limited consumer.
struct Consumer {
    bucket: Mutex<(f64, Instant)>,
    delivered: AtomicU64,
    refused: AtomicU64,
}

impl Consumer {
    fn new() -> Self {
        Self {
            bucket: Mutex::new((BURST, Instant::now())),
            delivered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn take(&self) -> bool {
        let mut b = self.bucket.lock().unwrap();
        let now = Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * RATE).min(BURST);
        b.1 = now;
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

async fn start_consumer(c: Arc<Consumer>) -> anyhow::Result<SocketAddr> {
    use axum::response::IntoResponse;
    let router = axum::Router::new().fallback(move |_body: Bytes| {
        let c = c.clone();
        async move {
            if !c.take() {
                c.refused.fetch_add(1, Ordering::Relaxed);
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
            }
            tokio::time::sleep(WORK).await;
            c.delivered.fetch_add(1, Ordering::Relaxed);
            StatusCode::OK.into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

pub struct PaceRow {
    pub adaptive: bool,
    pub backlog: u64,
    pub seconds: f64,
    pub delivered: u64,
    pub delivered_per_second: f64,
    /// Over the second half of the phase.
    pub settled_per_second: f64,
    pub answered_429: u64,
    pub dead_letters: u64,
}

pub struct PaceResults {
    pub rows: Vec<PaceRow>,
}

async fn phase(adaptive: bool, backlog: u64, seconds: u64) -> anyhow::Result<PaceRow> {
    let consumer = Arc::new(Consumer::new());
    let addr = start_consumer(consumer.clone()).await?;
    let dir = tempfile::tempdir()?;
    let dp = DataPlane::open(
        DataPlaneConfig {
            queue_path: dir.path().join("queue.redb"),
            resolve_overrides: vec![("consumer.bench.svc:8080".into(), addr)],
            address_policy: webhook_operator::delivery::AddressPolicy {
                allow_loopback: true,
                ..Default::default()
            },
            ..Default::default()
        },
        Arc::new(ProviderParser),
    )
    .await?;
    let key = EndpointKey::new("bench", "paced");
    dp.upsert_endpoint(EndpointConfig {
        key: key.clone(),
        token: "pacetoken".into(),
        destination: Destination::Service {
            name: "consumer".into(),
            namespace: "bench".into(),
            port: 8080,
            path: "/in".into(),
        },
        policy: Policy {
            max_in_flight: MAX_IN_FLIGHT,
            adaptive_concurrency: adaptive,
            // Five attempts: an event refused five times in a row is a dead letter.
            max_attempts: 5,
            initial_delay: Duration::from_millis(200),
            ..Policy::default()
        },
        signing_secrets: vec![SigningSecret::parse(b"bench-pace-signing-secret")?],
        headers: vec![],
        max_queued_events: None,
        max_queued_bytes: None,
        ingress_rate_limit: None,
        event_types: vec![],
        format: Default::default(),
        filter: None,
        tls: None,
        dedupe: None,
    })?;
    dp.upsert_subscription(SubscriptionRoute {
        endpoint: key.clone(),
        name: "atlas".into(),
        provider: Provider::Atlas,
        keys: VerificationKeys::default(),
    });
    // The backlog, before delivery starts.
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(64) {
        let posts = chunk.iter().map(|n| {
            let body = format!(
                "[{{\"callId\":\"pace-{adaptive}-{n}\",\"campaignId\":\"camp-bench\",\
                 \"triggerName\":\"call_completed\",\"customerNumber\":\"+15550100\"}}]"
            );
            dp.inject("pacetoken", "atlas", headers.clone(), body.into_bytes())
        });
        for status in futures::future::join_all(posts).await {
            anyhow::ensure!(status?.is_success(), "the ingress refused the backlog");
        }
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = dp.start_delivery(async move {
        let _ = stopped.await;
    });
    let start = Instant::now();
    let total = Duration::from_secs(seconds);
    tokio::time::sleep(total / 2).await;
    let at_half = consumer.delivered.load(Ordering::Relaxed);
    let half_at = start.elapsed();
    tokio::time::sleep(total.saturating_sub(start.elapsed())).await;
    let elapsed = start.elapsed();
    let delivered = consumer.delivered.load(Ordering::Relaxed);
    let answered_429 = consumer.refused.load(Ordering::Relaxed);
    let dead_letters = dp.queue_depth(&key).dead_lettered;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), delivery).await;
    let row = PaceRow {
        adaptive,
        backlog,
        seconds: elapsed.as_secs_f64(),
        delivered,
        delivered_per_second: delivered as f64 / elapsed.as_secs_f64(),
        settled_per_second: (delivered - at_half) as f64 / (elapsed - half_at).as_secs_f64(),
        answered_429,
        dead_letters,
    };
    eprintln!(
        "bench: pace adaptive={adaptive}: {:.0} delivered/s ({:.0}/s settled), {} 429s, {} dead letters",
        row.delivered_per_second, row.settled_per_second, row.answered_429, row.dead_letters
    );
    Ok(row)
}

pub async fn run(seconds: u64) -> anyhow::Result<PaceResults> {
    webhook_operator::providers::install_crypto_provider();
    // More than the consumer takes in the phase: it never runs dry.
    let backlog = (RATE as u64) * seconds * 3 / 2;
    let mut rows = Vec::new();
    for adaptive in [true, false] {
        rows.push(phase(adaptive, backlog, seconds).await?);
    }
    Ok(PaceResults { rows })
}

impl PaceResults {
    pub fn report(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "### The consumer's pace (a consumer allowing {RATE:.0} requests/s, 20 ms each, `429` + `Retry-After: 1` above; maxInFlight {MAX_IN_FLIGHT}, 5 attempts, a backlog)\n"
        );
        let _ = writeln!(
            s,
            "| concurrency | backlog | seconds | delivered | delivered/s | settled/s (2nd half) | 429s answered | dead letters |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {} | {:.0} | {:.0} | {} | {} |",
                if r.adaptive { "adaptive" } else { "fixed 64" },
                r.backlog,
                r.seconds,
                r.delivered,
                r.delivered_per_second,
                r.settled_per_second,
                r.answered_429,
                r.dead_letters
            );
        }
        s.push('\n');
    }
}
