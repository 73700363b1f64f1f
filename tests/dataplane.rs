//! End-to-end tests of the data plane on loopback: a provider POSTs to the ingress, the
//! events cross the durable queue and reach an axum consumer, signed with Standard Webhooks.
//! Every server binds 127.0.0.1:0; every wait is bounded.

#[path = "common/process.rs"]
mod process;
#[path = "common/sdk.rs"]
mod sdk;
use process::{output_ok, spawn_piped};
use sdk::{conformance_script, sdk_python_present};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::sync::oneshot;

use webhook_operator::dataplane::{
    DataPlane, DataPlaneConfig, EndpointConfig, EndpointKey, ReplayFilter, SubscriptionRoute,
};
use webhook_operator::delivery::{Destination, DestinationError, Policy, SigningSecret};
use webhook_operator::health::{HealthConfig, HealthThresholds};
use webhook_operator::inbound::{
    InboundEvent, InboundParser, InboundRequest, Parsed, Rejection, VerificationKeys,
};
use webhook_operator::ingress::RateLimit;
use webhook_operator::providers::Provider;
use webhook_operator::queue::{EnqueueOutcome, NewEvent, Queue, RedbQueue, RedbQueueOptions};

const NEW_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const OLD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PROVIDER_SECRET: &str = "provider-shared-value";
const TOKEN: &str = "tok_0123456789abcdef";

/// A stand-in for the providers' parser: JSON object or array, `type` and `id` fields, and
/// a shared secret in `x-test-secret` (checked in constant time).
struct TestParser;

impl InboundParser for TestParser {
    fn parse(
        &self,
        _provider: Provider,
        keys: &VerificationKeys,
        req: &InboundRequest<'_>,
    ) -> Result<Parsed, Rejection> {
        if req.method == http::Method::GET {
            return Ok(Parsed::default());
        }
        if req.method != http::Method::POST {
            return Err(Rejection::MethodNotAllowed);
        }
        let given = req
            .headers
            .get("x-test-secret")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let ok = keys
            .secrets
            .iter()
            .any(|s| bool::from(subtle::ConstantTimeEq::ct_eq(s.as_slice(), given)));
        if !ok {
            return Err(Rejection::Unauthorized("bad secret"));
        }
        let json = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        if !json {
            return Err(Rejection::UnsupportedMediaType);
        }
        let value: serde_json::Value =
            serde_json::from_slice(req.body).map_err(|_| Rejection::BadRequest("not JSON"))?;
        let items = match value {
            serde_json::Value::Array(a) => a,
            v => vec![v],
        };
        items
            .into_iter()
            .map(|item| {
                let field = |k: &str| item.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                Ok(InboundEvent {
                    event_type: field("type").ok_or(Rejection::BadRequest("no type"))?,
                    dedupe_key: field("id").ok_or(Rejection::BadRequest("no id"))?,
                    payload: Bytes::from(serde_json::to_vec(&item).unwrap()),
                    test: false,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Parsed::from)
    }
}

type ConsumerState = (Arc<AtomicU16>, Arc<Mutex<Vec<Received>>>);

#[derive(Clone, Debug)]
struct Received {
    /// The delivering connection's address: equal for requests on one kept-alive connection.
    peer: SocketAddr,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// What the consumer answers: a body larger than one read, as some consumers send (a
/// copy of the event, an HTML page). Delivery must read it to keep the connection.
static CONSUMER_ANSWER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{{\"echo\":\"{}\"}}", "x".repeat(48 * 1024)));

/// The in-cluster consumer: records every request and answers with a settable status.
#[derive(Clone)]
struct Consumer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Consumer {
    async fn start() -> Self {
        let status = Arc::new(AtomicU16::new(200));
        let got = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/in",
                axum::routing::post(
                    |State((status, got)): State<ConsumerState>,
                     ConnectInfo(peer): ConnectInfo<SocketAddr>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        got.lock().unwrap().push(Received {
                            peer,
                            headers,
                            body,
                            at: Instant::now(),
                        });
                        let status = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
                        (status, CONSUMER_ANSWER.as_str())
                    },
                ),
            )
            .with_state((status.clone(), got.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, status, got }
    }

    fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The `id` field of each request's payload, in arrival order.
    fn payload_ids(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                body["id"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    /// Requests answered 2xx, by webhook-id.
    fn ids(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
            .collect()
    }
}

struct Harness {
    dp: Arc<DataPlane>,
    ingress: SocketAddr,
    ops: SocketAddr,
    consumer: Consumer,
    key: EndpointKey,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn fast_policy() -> Policy {
    Policy {
        timeout: Duration::from_secs(2),
        max_attempts: 100,
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        max_age: Duration::from_secs(600),
        ..Policy::default()
    }
}

fn test_config(dir: &std::path::Path, consumer: SocketAddr) -> DataPlaneConfig {
    DataPlaneConfig {
        queue_path: dir.join("queue.redb"),
        max_body_bytes: 4096,
        resolve_overrides: vec![("sink.apps.svc:8080".into(), consumer)],
        // The consumer is on loopback, which the address policy refuses by default.
        address_policy: webhook_operator::delivery::AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        breaker_failure_threshold: 1000,
        breaker_cooldown: Duration::from_millis(500),
        health: HealthConfig {
            window: Duration::from_secs(1),
            window_attempts: 100,
            thresholds: HealthThresholds {
                failing_after: 3,
                degraded_ratio: 0.2,
                min_window_attempts: 3,
            },
        },
        maintenance_interval: Duration::from_secs(3600),
        shutdown_grace: Duration::from_secs(2),
        ..DataPlaneConfig::default()
    }
}

fn endpoint(key: &EndpointKey, destination: Destination, policy: Policy) -> EndpointConfig {
    EndpointConfig {
        key: key.clone(),
        token: TOKEN.into(),
        destination,
        policy,
        signing_secrets: vec![
            SigningSecret::parse(NEW_SECRET.as_bytes()).unwrap(),
            SigningSecret::parse(OLD_SECRET.as_bytes()).unwrap(),
        ],
        headers: vec![("x-consumer-key".into(), "consumer-secret".into())],
        event_types: vec![],
        max_queued_events: None,
        max_queued_bytes: None,
        ingress_rate_limit: None,
        format: Default::default(),
        filter: None,
        dedupe: None,
        tls: None,
    }
}

fn service() -> Destination {
    Destination::Service {
        name: "sink".into(),
        namespace: "apps".into(),
        port: 8080,
        path: "/in".into(),
    }
}

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

impl Harness {
    async fn start(tune: impl FnOnce(&mut DataPlaneConfig, &mut EndpointConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let consumer = Consumer::start().await;
        let key = EndpointKey::new("apps", "orders");
        let mut config = test_config(dir.path(), consumer.addr);
        let mut ep = endpoint(&key, service(), fast_policy());
        tune(&mut config, &mut ep);
        let dp = DataPlane::open(config, Arc::new(TestParser)).await.unwrap();
        Self::wire(dp, ep, consumer, dir).await
    }

    async fn wire(
        dp: Arc<DataPlane>,
        ep: EndpointConfig,
        consumer: Consumer,
        dir: tempfile::TempDir,
    ) -> Self {
        // The harness's own client needs a TLS provider even for plain HTTP; installed here
        // so that a test run alone does not depend on another having installed it first.
        webhook_operator::providers::install_crypto_provider();
        let key = ep.key.clone();
        let ingress = Self::wire_ingress_only(&dp, ep).await;
        let ops = serve(dp.ops_router()).await;
        let (stop, stopped) = oneshot::channel::<()>();
        dp.start_delivery(async move {
            let _ = stopped.await;
        });
        Self {
            dp,
            ingress,
            ops,
            consumer,
            key,
            http: reqwest::Client::new(),
            _stop: stop,
            _dir: dir,
        }
    }

    /// Configures `dp`'s routes and serves its ingress only (no delivery).
    async fn wire_ingress_only(dp: &DataPlane, ep: EndpointConfig) -> SocketAddr {
        let key = ep.key.clone();
        dp.upsert_endpoint(ep).unwrap();
        dp.upsert_subscription(SubscriptionRoute {
            endpoint: key,
            name: "calls".into(),
            provider: Provider::Atlas,
            keys: VerificationKeys {
                secrets: vec![PROVIDER_SECRET.as_bytes().to_vec()],
                header_name: Some("x-test-secret".into()),
                ..Default::default()
            },
        });
        dp.mark_routes_loaded();
        serve(dp.ingress_router()).await
    }

    async fn post_to(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        secret: &str,
        ctype: &str,
    ) -> (u16, String) {
        let r = self
            .http
            .post(format!("http://{}{path}", self.ingress))
            .header("x-test-secret", secret)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post(&self, body: serde_json::Value) -> (u16, String) {
        let path = format!("/hooks/{TOKEN}/calls");
        self.post_to(&path, body.to_string(), PROVIDER_SECRET, "application/json")
            .await
    }

    async fn metrics(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.ops))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn ev(id: &str, ty: &str) -> serde_json::Value {
    serde_json::json!({"type": ty, "id": id, "data": {"n": id}})
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verify_all(requests: &[Received]) {
    let new = standardwebhooks::Webhook::new(NEW_SECRET).unwrap();
    let old = standardwebhooks::Webhook::new(OLD_SECRET).unwrap();
    for r in requests {
        new.verify(&r.body, &r.headers)
            .expect("newest secret verifies");
        old.verify(&r.body, &r.headers)
            .expect("previous secret verifies during rotation");
        assert_eq!(r.headers["x-consumer-key"], "consumer-secret");
        assert_eq!(r.headers["content-type"], "application/json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_delivered_once_and_signed_with_both_secrets() {
    let h = Harness::start(|_, ep| {
        ep.event_types = vec!["call_completed".into(), "call_started".into()];
    })
    .await;
    let mut sent = HashSet::new();
    for i in 0..10 {
        let (status, _) = h.post(ev(&format!("e{i}"), "call_completed")).await;
        assert_eq!(status, 200);
        sent.insert(format!("e{i}"));
    }
    // A batch of several events in one request, one of them filtered out.
    let batch = serde_json::json!([
        ev("b1", "call_started"),
        ev("b2", "call_completed"),
        ev("f1", "message_sent")
    ]);
    let (status, body) = h.post(batch).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"filtered\":1"), "{body}");
    sent.extend(["b1".to_string(), "b2".to_string()]);
    // A provider retry of an event already accepted.
    let (status, body) = h.post(ev("e3", "call_completed")).await;
    assert_eq!(
        (status, body.contains("\"duplicates\":1")),
        (200, true),
        "{body}"
    );

    // Settled: 12 deliveries and an empty queue, so nothing more can arrive (a duplicate
    // or a filtered event would have been queued, or delivered already).
    wait_for(
        "12 deliveries, queue empty",
        Duration::from_secs(10),
        || h.consumer.requests().len() >= 12 && h.dp.queue_depth(&h.key) == Default::default(),
    )
    .await;
    let requests = h.consumer.requests();
    assert_eq!(requests.len(), 12);
    verify_all(&requests);
    let ids: HashSet<String> = h.consumer.ids().into_iter().collect();
    assert_eq!(ids.len(), 12, "one webhook-id per event");
    let delivered: HashSet<String> = requests
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(delivered, sent);

    let (count, last) = h.dp.subscription_counters(&h.key, "calls").unwrap();
    assert_eq!(
        count, 14,
        "every verified event counts, filtered and duplicate too"
    );
    assert!(last.is_some());
    assert!(h.dp.subscription_counters(&h.key, "nope").is_none());
    // The consumer can see the last delivery a moment before its outcome is recorded.
    wait_for("the last outcome recorded", Duration::from_secs(5), || {
        h.dp.endpoint_health(&h.key)
            .is_some_and(|health| health.stats.delivered >= 12)
    })
    .await;
    let health = h.dp.endpoint_health(&h.key).unwrap();
    assert_eq!(health.stats.delivered, 12);
    assert_eq!(
        (health.verdict.healthy, health.verdict.reason),
        (true, "Delivering")
    );
    assert!(health.stats.latency_p50_ms.is_some());
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "webhook_operator_events_delivered_total{namespace=\"apps\",name=\"orders\"} 12"
        ),
        "{metrics}"
    );
    // The in-flight limit in force: maxInFlight (16) unless adaptive concurrency holds back.
    let limit: i64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "webhook_operator_delivery_in_flight_limit{namespace=\"apps\",name=\"orders\"} ",
            )
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("the in-flight limit gauge");
    assert!((1..=16).contains(&limit), "{limit}");
    assert!(
        metrics.contains(
            "webhook_operator_events_duplicate_total{namespace=\"apps\",name=\"orders\"} 1"
        )
    );
    assert!(!metrics.contains(TOKEN) && !metrics.contains("consumer-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_reuse_the_connection_when_the_consumer_answers_with_a_body() {
    let h = Harness::start(|_, ep| ep.policy.max_in_flight = 1).await;
    for i in 0..20 {
        assert_eq!(h.post(ev(&format!("e{i}"), "call_completed")).await.0, 200);
        let delivered = i + 1;
        wait_for("the delivery", Duration::from_secs(10), || {
            h.consumer.requests().len() >= delivered
        })
        .await;
    }
    let peers: HashSet<SocketAddr> = h.consumer.requests().iter().map(|r| r.peer).collect();
    assert_eq!(
        peers.len(),
        1,
        "one kept-alive connection for 20 deliveries: {peers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_never_queued() {
    let h = Harness::start(|_, _| {}).await;
    let good = ev("x1", "call_completed").to_string();
    let hook = format!("/hooks/{TOKEN}/calls");
    let json = "application/json";
    let cases: Vec<(String, String, &str, &str, u16)> = vec![
        (
            "/hooks/wrong-token/calls".into(),
            good.clone(),
            PROVIDER_SECRET,
            json,
            404,
        ),
        (
            format!("/hooks/{TOKEN}/unknown-sub"),
            good.clone(),
            PROVIDER_SECRET,
            json,
            404,
        ),
        (hook.clone(), good.clone(), "wrong-secret", json, 401),
        (hook.clone(), "{not json".into(), PROVIDER_SECRET, json, 400),
        (
            hook.clone(),
            "{\"id\":\"no-type\"}".into(),
            PROVIDER_SECRET,
            json,
            400,
        ),
        (
            hook.clone(),
            good.clone(),
            PROVIDER_SECRET,
            "text/plain",
            415,
        ),
        (
            hook.clone(),
            format!(
                "{{\"type\":\"t\",\"id\":\"big\",\"pad\":\"{}\"}}",
                "x".repeat(5000)
            ),
            PROVIDER_SECRET,
            json,
            413,
        ),
    ];
    for (path, body, secret, ctype, want) in cases {
        let (status, reply) = h.post_to(&path, body, secret, ctype).await;
        assert_eq!(status, want, "{path}: {reply}");
        assert!(reply.len() < 100 && !reply.contains(PROVIDER_SECRET));
    }
    // A chunked body (no Content-Length) over the limit is cut off too.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(h.ingress).await.unwrap();
        let head = format!(
            "POST {hook} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-test-secret: {PROVIDER_SECRET}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        for _ in 0..10 {
            let chunk = format!("3e8\r\n{}\r\n", " ".repeat(1000));
            if conn.write_all(chunk.as_bytes()).await.is_err() {
                break; // the server may stop reading once it has refused
            }
        }
        let _ = conn.write_all(b"0\r\n\r\n").await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    // The method is the provider parser's call (here: POST only), not the ingress's.
    let delete = h
        .http
        .delete(format!("http://{}{hook}", h.ingress))
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status().as_u16(), 405);
    assert_eq!(h.dp.queue_depth(&h.key).pending, 0);

    // The pipeline works: the valid request after all the bad ones is the only delivery.
    assert_eq!(h.post(ev("ok", "call_completed")).await.0, 200);
    wait_for("the valid event", Duration::from_secs(10), || {
        !h.consumer.requests().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.consumer.requests().len(), 1);
    let metrics = h.metrics().await;
    for (reason, n) in [
        ("unknown_endpoint", 1),
        ("unknown_subscription", 1),
        ("unauthorized", 1),
        ("bad_request", 2),
        ("unsupported_media_type", 1),
        ("body_too_large", 2),
        ("method_not_allowed", 1),
    ] {
        let line = format!("webhook_operator_requests_rejected_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_consumer_is_retried_with_backoff_and_health_recovers() {
    let h = Harness::start(|_, _| {}).await;
    h.consumer.set_status(500);
    for i in 0..3 {
        assert_eq!(h.post(ev(&format!("r{i}"), "call_completed")).await.0, 200);
    }
    wait_for("repeated failures", Duration::from_secs(10), || {
        h.consumer.requests().len() >= 12
    })
    .await;
    let health = h.dp.endpoint_health(&h.key).unwrap();
    assert!(!health.verdict.healthy, "{:?}", health.verdict);
    assert!(["DeliveryFailing", "Degraded"].contains(&health.verdict.reason));
    assert!(
        health.verdict.message.contains("HTTP 500"),
        "{}",
        health.verdict.message
    );
    assert!(health.stats.retrying >= 1 && health.stats.consecutive_failures >= 3);

    // Backoff: the attempts of one event are spaced by at least ~initialDelay (−20 % jitter).
    let first_id = h.consumer.ids()[0].clone();
    let times: Vec<Instant> = h
        .consumer
        .requests()
        .iter()
        .filter(|r| r.headers["webhook-id"] == first_id.as_str())
        .map(|r| r.at)
        .collect();
    assert!(times.len() >= 2);
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(35),
            "retried after {:?}",
            w[1] - w[0]
        );
    }

    h.consumer.set_status(200);
    wait_for("recovery", Duration::from_secs(10), || {
        h.dp.endpoint_health(&h.key)
            .is_some_and(|s| s.stats.delivered == 3)
    })
    .await;
    let health = h.dp.endpoint_health(&h.key).unwrap();
    assert_eq!(
        (health.stats.retrying, health.stats.consecutive_failures),
        (0, 0)
    );
    // The failures age out of the (1 s) window and the verdict turns healthy.
    wait_for("healthy verdict", Duration::from_secs(5), || {
        h.dp.endpoint_health(&h.key)
            .is_some_and(|s| s.verdict.healthy)
    })
    .await;
    assert_eq!(
        h.dp.endpoint_health(&h.key).unwrap().verdict.reason,
        "Delivering"
    );
    // Three events, each retried under its own stable id.
    assert_eq!(
        h.consumer.ids().into_iter().collect::<HashSet<_>>().len(),
        3
    );
    verify_all(&h.consumer.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_events_are_dead_lettered_then_replayed() {
    let h = Harness::start(|_, ep| {
        ep.policy.max_attempts = 2;
        ep.policy.initial_delay = Duration::from_millis(20);
    })
    .await;
    h.consumer.set_status(503);
    for i in 0..3 {
        assert_eq!(h.post(ev(&format!("d{i}"), "call_completed")).await.0, 200);
    }
    wait_for("dead letters", Duration::from_secs(10), || {
        h.dp.queue_depth(&h.key).dead_lettered == 3
    })
    .await;
    assert_eq!(
        h.consumer.requests().len(),
        6,
        "two attempts each, then nothing"
    );
    // The worker records an attempt's outcome once the queue has stored it: the queue's
    // count can be ahead of the health figures for a moment.
    wait_for(
        "dead letters in the health figures",
        Duration::from_secs(10),
        || {
            h.dp.endpoint_health(&h.key)
                .is_some_and(|s| s.stats.dead_lettered == 3)
        },
    )
    .await;
    let health = h.dp.endpoint_health(&h.key).unwrap();
    assert_eq!((health.stats.dead_lettered, health.stats.retrying), (3, 0));
    let failed_ids: HashSet<String> = h.consumer.ids().into_iter().collect();

    h.consumer.set_status(200);
    assert_eq!(h.dp.replay(&h.key, ReplayFilter::All).await.unwrap(), 3);
    wait_for("replayed deliveries", Duration::from_secs(10), || {
        h.consumer.requests().len() == 9
    })
    .await;
    let replayed: HashSet<String> = h.consumer.ids()[6..].iter().cloned().collect();
    assert_eq!(replayed, failed_ids, "replays keep the webhook-id");
    // The consumer answers before the worker's ack commits: wait for the acks.
    wait_for("acks after the replay", Duration::from_secs(10), || {
        h.dp.queue_depth(&h.key) == Default::default()
    })
    .await;
    // Settled: dead letters were delivered by the replay only, never retried on their own.
    assert_eq!(
        h.consumer.requests().len(),
        9,
        "dead letters are not retried"
    );
    verify_all(&h.consumer.requests());
}

/// `spec.ingressRateLimit`: past the burst the ingress answers 429 with Retry-After and
/// counts it; once a token is back, requests are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_rate_limit_answers_429_past_the_burst() {
    let h = Harness::start(|_, ep| {
        ep.ingress_rate_limit = Some(RateLimit {
            per_second: 2,
            burst: 3,
        })
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(h.post(ev(&format!("r{i}"), "call_completed")).await.0);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "the burst, then refusals"
    );
    let r = h
        .http
        .post(format!("http://{}/hooks/{TOKEN}/calls", h.ingress))
        .header("x-test-secret", PROVIDER_SECRET)
        .body(ev("r5", "call_completed").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("webhook_operator_requests_rejected_total{reason=\"rate_limited\"} 3"),
        "{metrics}"
    );
    // Two tokens a second: within a second or so one is back.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = h.post(ev("r6", "call_completed")).await.0;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "no token came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        "the accepted events delivered",
        Duration::from_secs(10),
        || h.consumer.ids().len() == 4,
    )
    .await;
}

/// An endpoint's `maxQueuedBytes`: at the bound the ingress answers 503 with Retry-After,
/// counts it, and says so in the endpoint's health; what it acknowledged is all delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_refuses_with_503_and_keeps_what_it_accepted() {
    let h = Harness::start(|_, ep| ep.max_queued_bytes = Some(4096)).await;
    h.consumer.set_status(503);
    let big = "x".repeat(1000);
    let mut accepted = 0;
    let refused = loop {
        let body = serde_json::json!({"type": "call_completed", "id": format!("big{accepted}"), "data": big});
        let r = h
            .http
            .post(format!("http://{}/hooks/{TOKEN}/calls", h.ingress))
            .header("x-test-secret", PROVIDER_SECRET)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::OK {
            break r;
        }
        accepted += 1;
        assert!(accepted < 10, "4 KiB of 1 KiB events never hit the bound");
    };
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(accepted, 4, "four 1 KiB events (with metadata) reach 4 KiB");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("reason=\"endpoint_bytes_backlogged\"} 1"),
        "{metrics}"
    );
    let health = h.dp.endpoint_health(&h.key).unwrap();
    assert_eq!(health.verdict.reason, "Backlogged");
    assert!(
        health
            .verdict
            .message
            .contains("bytes waiting for this endpoint"),
        "{}",
        health.verdict.message
    );
    h.consumer.set_status(200);
    wait_for(
        "every accepted event delivered",
        Duration::from_secs(20),
        || h.dp.queue_depth(&h.key) == Default::default(),
    )
    .await;
    let ids: HashSet<String> = h.consumer.ids().into_iter().collect();
    assert_eq!(ids.len(), accepted, "nothing accepted was dropped");
}

/// The queue holds only a window of ready events in memory; a restart with a backlog
/// many windows long refills it from the file and still delivers each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_memory_window_is_delivered_exactly_once_after_reopen() {
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let consumer = Consumer::start().await;
    let key = EndpointKey::new("apps", "orders");
    let config = test_config(dir.path(), consumer.addr);
    let options = RedbQueueOptions {
        window: 16,
        ..RedbQueueOptions::default()
    };
    let stored: HashSet<String> = {
        let q = RedbQueue::open(&config.queue_path, options.clone()).unwrap();
        let now = std::time::SystemTime::now();
        let events = (0..N)
            .map(|i| NewEvent {
                endpoint: key.clone(),
                subscription: "calls".into(),
                event_type: "call_completed".into(),
                dedupe_key: format!("b{i}"),
                dedupe_window: None,
                payload: Bytes::from(ev(&format!("b{i}"), "call_completed").to_string()),
                // Out of order, so that the file's order by due time is what leases follow.
                received: now - Duration::from_millis(((i * 7919) % N) as u64),
                traceparent: None,
                headers: String::new(),
            })
            .collect();
        let out = q.enqueue(events).await.unwrap();
        out.into_iter()
            .map(|o| match o {
                EnqueueOutcome::Accepted { id } => id,
                EnqueueOutcome::Duplicate => panic!("no duplicates were sent"),
            })
            .collect()
    };
    assert_eq!(stored.len(), N);

    let queue = Arc::new(RedbQueue::open(&config.queue_path, options).unwrap());
    assert_eq!(
        queue.depth().pending,
        N as u64,
        "counts come back from the file"
    );
    let dp = DataPlane::with_queue(config, Arc::new(TestParser), queue).unwrap();
    let h = Harness::wire(dp, endpoint(&key, service(), fast_policy()), consumer, dir).await;
    wait_for(
        "the whole backlog delivered",
        Duration::from_secs(60),
        || h.consumer.requests().len() >= N && h.dp.queue_depth(&h.key) == Default::default(),
    )
    .await;
    let ids = h.consumer.ids();
    let delivered: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), N, "each event exactly once");
    assert_eq!(delivered, stored, "every stored event, by its webhook-id");
    verify_all(&h.consumer.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_answer_503_until_the_routes_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let consumer = Consumer::start().await;
    let dp = DataPlane::open(test_config(dir.path(), consumer.addr), Arc::new(TestParser))
        .await
        .unwrap();
    let ingress = serve(dp.ingress_router()).await;
    let ops = serve(dp.ops_router()).await;
    let http = reqwest::Client::new();
    let probe = || async {
        let r = http
            .post(format!("http://{ingress}/hooks/{TOKEN}/calls"))
            .header("x-test-secret", PROVIDER_SECRET)
            .json(&ev("early", "call_completed"))
            .send()
            .await
            .unwrap();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), retry_after)
    };
    let ready = || async {
        http.get(format!("http://{ops}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    // Loading: the route may just not be there yet.
    assert_eq!(probe().await, (503, Some("1".to_string())));
    assert_eq!(ready().await, 503);
    dp.mark_routes_loaded();
    assert_eq!(probe().await, (404, None));
    assert_eq!(ready().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_queue_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let consumer = Consumer::start().await;
    let config = test_config(dir.path(), consumer.addr);
    let queue =
        Arc::new(RedbQueue::open(dir.path().join("q.redb"), RedbQueueOptions::default()).unwrap());
    let dp = DataPlane::with_queue(config, Arc::new(TestParser), queue.clone()).unwrap();
    let key = EndpointKey::new("apps", "orders");
    let h = Harness::wire(dp, endpoint(&key, service(), fast_policy()), consumer, dir).await;
    let ready = |h: &Harness| {
        let url = format!("http://{}/readyz", h.ops);
        let http = h.http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(ready(&h).await, 200);
    assert_eq!(h.post(ev("a", "call_completed")).await.0, 200);
    queue.close();
    let (status, body) = h.post(ev("b", "call_completed")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(ready(&h).await, 503);
    // A closed queue never writes again in this process: liveness fails too, so that
    // Kubernetes restarts the pod.
    let healthz = h
        .http
        .get(format!("http://{}/healthz", h.ops))
        .send()
        .await
        .unwrap();
    let status = healthz.status().as_u16();
    let body = healthz.text().await.unwrap();
    println!("/healthz with the queue closed: {status} {body:?}");
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_destination_is_refused_and_events_stay_parked() {
    let h = Harness::start(|_, ep| {
        ep.destination = Destination::Url("http://169.254.169.254/latest/meta-data".into());
    })
    .await;
    for i in 0..2 {
        assert_eq!(h.post(ev(&format!("p{i}"), "call_completed")).await.0, 200);
    }
    wait_for("DestinationForbidden", Duration::from_secs(5), || {
        h.dp.endpoint_health(&h.key)
            .and_then(|s| s.destination_error)
            .is_some_and(|e| {
                matches!(e, DestinationError::Forbidden(_)) && e.reason() == "DestinationForbidden"
            })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let depth = h.dp.queue_depth(&h.key);
    assert_eq!((depth.pending, depth.dead_lettered), (2, 0));
    assert_eq!(
        h.dp.endpoint_health(&h.key).unwrap().stats.failed,
        0,
        "no attempt was made"
    );

    // Removed, the endpoint's events stay; configured again with a good destination, they go.
    h.dp.remove_endpoint(&h.key);
    assert_eq!(h.post(ev("p9", "call_completed")).await.0, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.dp.queue_depth(&h.key).pending, 2);
    h.dp.upsert_endpoint(endpoint(&h.key, service(), fast_policy()))
        .unwrap();
    wait_for("parked events delivered", Duration::from_secs(10), || {
        h.consumer.requests().len() == 2
    })
    .await;
    verify_all(&h.consumer.requests());
    wait_for("destination error cleared", Duration::from_secs(5), || {
        h.dp.endpoint_health(&h.key)
            .is_some_and(|s| s.destination_error.is_none())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_bounds_attempts_while_open_and_closes_after_recovery() {
    let h = Harness::start(|cfg, ep| {
        cfg.breaker_failure_threshold = 3;
        cfg.breaker_cooldown = Duration::from_millis(400);
        ep.policy.initial_delay = Duration::from_millis(10);
        ep.policy.max_delay = Duration::from_millis(20);
        ep.policy.max_attempts = 1000;
        ep.policy.max_in_flight = 4;
    })
    .await;
    h.consumer.set_status(500);
    for i in 0..5 {
        assert_eq!(h.post(ev(&format!("c{i}"), "call_completed")).await.0, 200);
    }
    wait_for("breaker open", Duration::from_secs(5), || {
        h.dp.endpoint_health(&h.key).is_some_and(|s| s.breaker_open)
    })
    .await;
    let start = h.consumer.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = h.consumer.requests().len() - start;
    // Without the breaker: 5 events every ~15 ms ≈ 600 attempts in 2 s. With it: in-flight
    // stragglers plus one probe per 400 ms cool-down.
    assert!(during <= 12, "{during} attempts while the breaker was open");
    let health = h.dp.endpoint_health(&h.key).unwrap();
    assert_eq!(
        (health.verdict.healthy, health.verdict.reason),
        (false, "DeliveryFailing")
    );
    assert!(health.verdict.message.contains("circuit breaker open"));
    assert_eq!(
        health.stats.dead_lettered, 0,
        "events wait, they are not burned"
    );

    h.consumer.set_status(200);
    wait_for(
        "all delivered after recovery",
        Duration::from_secs(10),
        || {
            h.dp.endpoint_health(&h.key)
                .is_some_and(|s| s.stats.delivered == 5)
        },
    )
    .await;
    assert!(!h.dp.endpoint_health(&h.key).unwrap().breaker_open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_max_age_are_dead_lettered_before_max_attempts() {
    let h = Harness::start(|_, ep| {
        ep.policy.max_attempts = 100;
        ep.policy.initial_delay = Duration::from_millis(200);
        ep.policy.max_delay = Duration::from_millis(400);
        ep.policy.max_age = Duration::from_secs(1);
    })
    .await;
    h.consumer.set_status(500);
    let posted = Instant::now();
    assert_eq!(h.post(ev("old", "call_completed")).await.0, 200);
    wait_for("dead letter by age", Duration::from_secs(10), || {
        h.dp.queue_depth(&h.key).dead_lettered == 1
    })
    .await;
    // An event that would be too old at its next attempt is dead-lettered at once, so the
    // earliest is max age minus the longest delay (400 ms + 20 % jitter).
    assert!(
        posted.elapsed() >= Duration::from_millis(1000 - 480),
        "dead-lettered {:?} after it was posted, long before its max age",
        posted.elapsed()
    );
    // Attempts are spaced by at least 160 ms (200 ms −20 %), so a 1 s age allows at most
    // 7 plus the one that finds it too old; a slow machine makes fewer, never more. Far
    // below max_attempts: the age decided.
    let attempts = h.consumer.requests().len();
    assert!(
        (1..=8).contains(&attempts),
        "{attempts} attempts within a 1 s max age"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_failures_are_counted_per_subscription() {
    let h = Harness::start(|_, _| {}).await;
    let hook = format!("/hooks/{TOKEN}/calls");
    let body = ev("s1", "call_completed").to_string();
    assert_eq!(
        h.dp.subscription_signature_failures(&h.key, "calls"),
        Some((0, None))
    );
    for _ in 0..2 {
        let (status, _) = h
            .post_to(&hook, body.clone(), "wrong-secret", "application/json")
            .await;
        assert_eq!(status, 401);
    }
    // A malformed body that verifies is not a signature failure.
    let (status, _) = h
        .post_to(&hook, "{not json", PROVIDER_SECRET, "application/json")
        .await;
    assert_eq!(status, 400);
    let (count, last) =
        h.dp.subscription_signature_failures(&h.key, "calls")
            .unwrap();
    assert_eq!(count, 2);
    assert!(last.is_some());
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "webhook_operator_signature_mismatches_total{namespace=\"apps\",subscription=\"calls\"} 2"
        ),
        "{metrics}"
    );
}

// ------------------------------------------------------------ CloudEvents delivery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_format_is_read_back_by_the_cloudevents_sdk() {
    use tokio::io::AsyncBufReadExt;
    let python = sdk_python_present(" (it installs the pinned cloudevents SDK)");
    let script = conformance_script("cloudevents_consumer.py");
    let mut child = spawn_piped(&python, &[script.as_str(), "1"]);
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let next_line = async |lines: &mut tokio::io::Lines<_>| {
        tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the SDK consumer answered within 20 s")
            .unwrap()
            .expect("the SDK consumer printed a line")
    };
    let first: String = next_line(&mut lines).await;
    let port: u16 = first.strip_prefix("listening ").unwrap().parse().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let key = EndpointKey::new("apps", "orders");
    let config = test_config(dir.path(), SocketAddr::from(([127, 0, 0, 1], port)));
    let mut ep = endpoint(&key, service(), fast_policy());
    ep.format = webhook_operator::delivery::DeliveryFormat::Cloudevents;
    let dp = DataPlane::open(config, Arc::new(TestParser)).await.unwrap();
    let h = Harness::wire(dp, ep, Consumer::start().await, dir).await;
    let before = std::time::SystemTime::now();
    assert_eq!(h.post(ev("ce1", "call_completed")).await.0, 200);

    let line: String = next_line(&mut lines).await;
    let got: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(got.get("error").is_none(), "the SDK refused: {line}");
    assert_eq!(got["specversion"], "1.0");
    assert_eq!(got["type"], "call_completed");
    assert_eq!(got["source"], "/namespaces/apps/webhooksubscriptions/calls");
    assert_eq!(got["datacontenttype"], "application/json");
    assert_eq!(
        got["data"],
        ev("ce1", "call_completed"),
        "body = provider payload"
    );
    // ce-id is the stable webhook-id.
    assert_eq!(got["id"], got["webhook"]["webhook-id"], "{line}");
    assert!(got["id"].as_str().is_some_and(|s| !s.is_empty()));
    let time: jiff::Timestamp = got["time"].as_str().unwrap().parse().unwrap();
    let before = jiff::Timestamp::try_from(before).unwrap();
    assert!(
        time >= before - jiff::SignedDuration::from_secs(1) && time <= jiff::Timestamp::now(),
        "ce-time {time} is the receive time"
    );
    // Signing stays available in this format.
    let mut headers = HeaderMap::new();
    for (k, v) in got["webhook"].as_object().unwrap() {
        headers.insert(
            http::HeaderName::try_from(k.as_str()).unwrap(),
            v.as_str().unwrap().parse().unwrap(),
        );
    }
    standardwebhooks::Webhook::new(NEW_SECRET)
        .unwrap()
        .verify(got["body"].as_str().unwrap().as_bytes(), &headers)
        .expect("the CloudEvents delivery is signed");
}

// ------------------------------------------------------------------ trace context

fn traceparent_of(r: &Received) -> (String, String, String) {
    let v = r.headers["traceparent"].to_str().unwrap();
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!((p.len(), p[0]), (4, "00"), "{v}");
    assert!(
        p[1].len() == 32 && p[2].len() == 16 && p[3].len() == 2,
        "{v}"
    );
    (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_carry_traceparent_continued_from_the_provider() {
    const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const INCOMING_SPAN: &str = "00f067aa0ba902b7";
    let h = Harness::start(|_, _| {}).await;
    // The first attempts fail, so the trace is seen across retries too.
    h.consumer.set_status(500);
    let send = |id: &str, traceparent: Option<String>| {
        let mut req = h
            .http
            .post(format!("http://{}/hooks/{TOKEN}/calls", h.ingress))
            .header("x-test-secret", PROVIDER_SECRET)
            .header("content-type", "application/json")
            .body(ev(id, "call_completed").to_string());
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let incoming = format!("00-{INCOMING_TRACE}-{INCOMING_SPAN}-01");
    assert_eq!(send("traced", Some(incoming)).await, 200);
    assert_eq!(send("untraced", None).await, 200);
    assert_eq!(send("bad", Some("00-zz-nonsense-01".into())).await, 200);
    wait_for(
        "two attempts of each event",
        Duration::from_secs(10),
        || {
            let ids = h.consumer.ids();
            ids.iter().collect::<HashSet<_>>().len() == 3
                && ids
                    .iter()
                    .all(|i| ids.iter().filter(|j| *j == i).count() >= 2)
        },
    )
    .await;
    h.consumer.set_status(200);
    let by_event = |id: &str| -> Vec<(String, String, String)> {
        h.consumer
            .requests()
            .iter()
            .filter(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["id"] == id)
            .map(traceparent_of)
            .collect()
    };

    // Continued: the provider's trace id and flags, a new span id for every attempt.
    let traced = by_event("traced");
    assert!(traced.len() >= 2);
    for (trace, _, flags) in &traced {
        assert_eq!((trace.as_str(), flags.as_str()), (INCOMING_TRACE, "01"));
    }
    let spans: HashSet<&String> = traced.iter().map(|t| &t.1).collect();
    assert_eq!(spans.len(), traced.len(), "a new span per attempt");
    assert!(!spans.contains(&INCOMING_SPAN.to_string()));

    // None (or an invalid one) sent: a new trace, the same across the event's attempts.
    for id in ["untraced", "bad"] {
        let tps = by_event(id);
        assert!(tps.len() >= 2);
        assert!(tps.iter().all(|t| t.0 == tps[0].0), "{tps:?}");
        assert_ne!(tps[0].0, INCOMING_TRACE);
        assert_ne!(tps[0].0, "0".repeat(32));
    }
    assert_ne!(by_event("untraced")[0].0, by_event("bad")[0].0);
    verify_all(&h.consumer.requests());
}

// ------------------------------------------------------- the chart's alerts and dashboard

/// Sample names a `/metrics` exposition exports, from its `# TYPE` lines.
fn exported_series(exposition: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => names.extend([format!("{name}_total")]),
            "histogram" => {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")))
            }
            _ => names.extend([name.to_string()]),
        }
    }
    names
}

/// The anchors a Markdown renderer gives the headings of `text` (GitHub's rule: lower
/// case, spaces to `-`, other punctuation but `-` and `_` dropped; a repeated heading gets
/// `-1`, `-2`, ...). Headings inside fenced code blocks are not headings.
fn markdown_anchors(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(title) = line.trim_start_matches('#').strip_prefix(' ') else {
            continue;
        };
        if fenced || !line.starts_with('#') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while !out.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
    }
    out
}

/// Every `webhook_operator_*` identifier in `text`.
fn referenced_series(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("webhook_operator_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_alert_rules_pass_promtool_against_exported_series() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // The series a real data plane exports, every family touched once.
    let h = Harness::start(|_, _| {}).await;
    assert_eq!(h.post(ev("m1", "call_completed")).await.0, 200);
    wait_for("a delivery", Duration::from_secs(10), || {
        !h.consumer.requests().is_empty()
    })
    .await;
    h.dp.set_subscription_synced(&h.key, "calls", true);
    let exported = exported_series(&h.metrics().await);
    assert!(
        exported.contains("webhook_operator_events_delivered_total"),
        "{exported:?}"
    );

    // The chart's PrometheusRule and dashboard, rendered with the pinned helm.
    let out = output_ok(
        std::process::Command::new(root.join("hack/helm.sh"))
            .args(["template", "r", "charts/webhook-operator"])
            .args(["--set", "prometheusRule.enabled=true"])
            .args(["--set", "grafanaDashboard.enabled=true"])
            .current_dir(root),
        "hack/helm.sh runs",
        "",
    );
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(std::str::from_utf8(&out.stdout).unwrap())
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|d: &serde_yaml::Value| !d.is_null())
            .collect();
    let of_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} rendered"))
    };
    let rules = serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
        "groups".into(),
        of_kind("PrometheusRule")["spec"]["groups"].clone(),
    )]))
    .unwrap();
    let dashboard = of_kind("ConfigMap")["data"]["webhook-operator.json"]
        .as_str()
        .unwrap()
        .to_string();
    let dash: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 6));
    let cases = std::fs::read_to_string(root.join("tests/alerts/rules.test.yaml")).unwrap();

    // A renamed or removed metric breaks the rules, the dashboard or the cases: refuse it.
    for (what, text) in [
        ("rules", &rules),
        ("dashboard", &dashboard),
        ("cases", &cases),
    ] {
        let unknown: Vec<String> = referenced_series(text)
            .into_iter()
            .filter(|s| !exported.contains(s))
            .collect();
        assert!(
            unknown.is_empty(),
            "{what} use series the operator does not export: {unknown:?}"
        );
    }
    for alert in [
        "WebhookDeliveryFailing",
        "WebhookBacklogGrowing",
        "WebhookDeadLetters",
        "WebhookSubscriptionNotSynced",
        "WebhookQueueErrors",
    ] {
        assert!(
            rules.contains(alert) && cases.contains(alert),
            "{alert} untested"
        );
    }
    // Every alert links its runbook: a section of the README that exists.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let anchors = markdown_anchors(&readme);
    let alerts: Vec<&serde_yaml::Value> = of_kind("PrometheusRule")["spec"]["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .filter(|r| r["alert"].is_string())
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for rule in alerts {
        let alert = rule["alert"].as_str().unwrap();
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{alert} has no runbook_url"));
        let (base, anchor) = url
            .split_once('#')
            .unwrap_or_else(|| panic!("{alert}: {url} names no anchor"));
        assert_eq!(base, "README.md", "{alert}: the chart's default base");
        assert!(
            anchors.contains(anchor),
            "{alert}: README has no section #{anchor}"
        );
        println!("{alert}: {url}");
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &rules).unwrap();
    std::fs::write(dir.path().join("rules.test.yaml"), &cases).unwrap();
    let run = tokio::process::Command::new(root.join("hack/promtool.sh"))
        .args(["test", "rules", "rules.test.yaml"])
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("promtool finished within 10 min (its first run builds it)")
        .expect("hack/promtool.sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

// ---------------------------------------------------------------------- spec.filter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_delivers_matches_counts_skips_and_dead_letters_errors() {
    let h = Harness::start(|_, ep| {
        ep.filter = Some(
            webhook_operator::delivery::filter::Filter::compile(
                "payload.call.lead_warmth == 'hot' && eventType == 'call_completed'",
            )
            .unwrap(),
        );
    })
    .await;
    let event = |id: &str, call: serde_json::Value| serde_json::json!({"type": "call_completed", "id": id, "call": call});
    assert_eq!(
        h.post(event("hot", serde_json::json!({"lead_warmth": "hot"})))
            .await
            .0,
        200
    );
    assert_eq!(
        h.post(event("cold", serde_json::json!({"lead_warmth": "cold"})))
            .await
            .0,
        200
    );
    // No `lead_warmth`: the expression fails on this event.
    assert_eq!(h.post(event("broken", serde_json::json!({}))).await.0, 200);

    wait_for(
        "one filtered, one dead letter",
        Duration::from_secs(10),
        || {
            let d = h.dp.queue_depth(&h.key);
            d.dead_lettered == 1 && d.pending == 0 && d.leased == 0
        },
    )
    .await;
    wait_for("the match delivered", Duration::from_secs(10), || {
        !h.consumer.requests().is_empty()
    })
    .await;
    let delivered = h.consumer.payload_ids();
    assert_eq!(delivered, ["hot"]);
    let metrics = h.metrics().await;
    for line in [
        "webhook_operator_events_filtered_total{namespace=\"apps\",name=\"orders\"} 1",
        "webhook_operator_filter_errors_total{namespace=\"apps\",name=\"orders\"} 1",
        "webhook_operator_events_dead_lettered_total{namespace=\"apps\",name=\"orders\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The failing event is kept: a replay (after fixing the filter) brings it back.
    assert_eq!(h.dp.replay(&h.key, ReplayFilter::All).await.unwrap(), 1);
}

// ------------------------------------------------------------------ OTLP span export

/// Export requests as received: headers and body.
type Exports = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A loopback OTLP/HTTP receiver: keeps every JSON export request it is sent.
#[derive(Clone)]
struct Collector {
    addr: SocketAddr,
    exports: Exports,
}

impl Collector {
    async fn start() -> Self {
        let exports = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/otlp/v1/traces",
                axum::routing::post(
                    |State(exports): State<Exports>, headers: HeaderMap, body: Bytes| async move {
                        exports.lock().unwrap().push((headers, body));
                        StatusCode::OK
                    },
                ),
            )
            .with_state(exports.clone());
        Self {
            addr: serve(app).await,
            exports,
        }
    }

    /// The endpoint as a user configures it (the exporter appends `/v1/traces`).
    fn endpoint(&self) -> url::Url {
        url::Url::parse(&format!("http://{}/otlp", self.addr)).unwrap()
    }

    /// Every span received, decoded from OTLP JSON.
    fn spans(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (headers, body) in self.exports.lock().unwrap().iter() {
            assert_eq!(headers["content-type"], "application/json");
            let req: serde_json::Value = serde_json::from_slice(body).unwrap();
            for rs in req["resourceSpans"].as_array().unwrap() {
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    out.extend(ss["spans"].as_array().unwrap().iter().cloned());
                }
            }
        }
        out
    }

    fn raw(&self) -> String {
        self.exports
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

/// A provider's verified POST of `body` to the `calls` route at `ingress`, with `extra`
/// headers; the answer's status.
async fn provider_post(
    ingress: SocketAddr,
    body: serde_json::Value,
    extra: &[(&str, &str)],
) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!("http://{ingress}/hooks/{TOKEN}/calls"))
        .header("x-test-secret", PROVIDER_SECRET)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap().status().as_u16()
}

fn named<'a>(spans: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn attr(span: &serde_json::Value, key: &str) -> serde_json::Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| {
            let v = &a["value"];
            v.get("stringValue")
                .or_else(|| v.get("intValue"))
                .cloned()
                .unwrap()
        })
        .unwrap_or(serde_json::Value::Null)
}

fn nanos(span: &serde_json::Value, field: &str) -> u128 {
    span[field].as_str().unwrap().parse().unwrap()
}

/// No secret, URL or payload in what is exported.
fn assert_no_secrets(exported: &str, consumer: SocketAddr, payload_marker: &str) {
    for secret in [
        TOKEN,
        PROVIDER_SECRET,
        "consumer-secret",
        NEW_SECRET,
        OLD_SECRET,
        "/hooks/",
        "sink.apps.svc",
        &consumer.to_string(),
        payload_marker,
    ] {
        assert!(
            !exported.contains(secret),
            "{secret:?} exported: {exported}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_follow_an_event_from_receive_through_each_attempt_to_otlp() {
    const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const INCOMING_SPAN: &str = "00f067aa0ba902b7";
    const MARKER: &str = "evt-otel-7f3a";
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let h = Harness::start(|c, ep| {
        c.otlp_endpoint = Some(endpoint);
        // Room to answer the second attempt differently from the first.
        ep.policy.initial_delay = Duration::from_secs(1);
        ep.policy.max_delay = Duration::from_secs(1);
    })
    .await;
    h.consumer.set_status(500);
    let incoming = format!("00-{INCOMING_TRACE}-{INCOMING_SPAN}-01");
    let status = provider_post(
        h.ingress,
        ev(MARKER, "call_completed"),
        &[("traceparent", &incoming)],
    )
    .await;
    assert_eq!(status, 200);
    wait_for("the first attempt", Duration::from_secs(10), || {
        !h.consumer.requests().is_empty()
    })
    .await;
    h.consumer.set_status(200);
    wait_for("the second attempt", Duration::from_secs(10), || {
        h.consumer.requests().len() == 2
    })
    .await;
    wait_for("the deliver span exported", Duration::from_secs(15), || {
        !named(&collector.spans(), "deliver").is_empty()
    })
    .await;

    let spans = collector.spans();
    let (receive, store, deliver, attempts) = (
        named(&spans, "receive"),
        named(&spans, "store"),
        named(&spans, "deliver"),
        named(&spans, "attempt"),
    );
    assert_eq!(
        (receive.len(), store.len(), deliver.len(), attempts.len()),
        (1, 1, 1, 2),
        "{spans:#?}"
    );
    let (receive, store, deliver) = (receive[0], store[0], deliver[0]);
    for s in &spans {
        assert_eq!(s["traceId"], INCOMING_TRACE, "one trace: {s}");
    }
    // receive -> store, receive -> deliver -> attempts.
    assert_eq!(receive["parentSpanId"], INCOMING_SPAN);
    assert_eq!(store["parentSpanId"], receive["spanId"]);
    assert_eq!(deliver["parentSpanId"], receive["spanId"]);
    for a in &attempts {
        assert_eq!(a["parentSpanId"], deliver["spanId"]);
        assert!(nanos(a, "startTimeUnixNano") >= nanos(deliver, "startTimeUnixNano"));
        assert!(nanos(a, "endTimeUnixNano") <= nanos(deliver, "endTimeUnixNano"));
    }
    assert!(nanos(store, "startTimeUnixNano") >= nanos(receive, "startTimeUnixNano"));
    assert!(nanos(store, "endTimeUnixNano") <= nanos(receive, "endTimeUnixNano"));

    // The destination saw the same trace, each attempt as the span that made it.
    let sent: Vec<(String, String, String)> =
        h.consumer.requests().iter().map(traceparent_of).collect();
    assert!(sent.iter().all(|(trace, _, _)| trace == INCOMING_TRACE));
    let sent_spans: HashSet<String> = sent.into_iter().map(|t| t.1).collect();
    let attempt_spans: HashSet<String> = attempts
        .iter()
        .map(|a| a["spanId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent_spans, attempt_spans);

    let mut by_number: Vec<_> = attempts
        .iter()
        .map(|a| {
            (
                attr(a, "webhook.attempt"),
                attr(a, "http.response.status_code"),
                attr(a, "webhook.outcome"),
            )
        })
        .collect();
    by_number.sort_by_key(|a| a.0.to_string());
    assert_eq!(
        by_number,
        [
            ("1".into(), "500".into(), "retry".into()),
            ("2".into(), "200".into(), "delivered".into()),
        ]
    );
    assert_eq!(attr(deliver, "webhook.outcome"), "delivered");
    assert_eq!(attr(deliver, "webhook.attempts"), "2");
    assert_eq!(attr(receive, "webhook.endpoint"), "apps/orders");
    assert_eq!(attr(receive, "http.response.status_code"), "200");
    assert_no_secrets(&collector.raw(), h.consumer.addr, MARKER);
    assert!(
        h.metrics()
            .await
            .contains("webhook_operator_trace_spans_dropped_total 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_a_later_process_lifetime_hangs_under_the_stored_receive_span() {
    const MARKER: &str = "evt-restart-91c2";
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let consumer = Consumer::start().await;
    let mut config = test_config(dir.path(), consumer.addr);
    config.otlp_endpoint = Some(collector.endpoint());
    let queue =
        Arc::new(RedbQueue::open(dir.path().join("q.redb"), RedbQueueOptions::default()).unwrap());
    let key = EndpointKey::new("apps", "orders");

    // First lifetime: receives and stores, never delivers. No traceparent from the
    // provider: the operator starts the trace.
    let first = DataPlane::with_queue(config.clone(), Arc::new(TestParser), queue.clone()).unwrap();
    let receiver =
        Harness::wire_ingress_only(&first, endpoint(&key, service(), fast_policy())).await;
    let status = provider_post(receiver, ev(MARKER, "call_completed"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(first.queue_depth(&key).pending, 1);

    // Second lifetime: a new data plane (its own tracer, nothing in memory) on the stored
    // queue delivers.
    let second = DataPlane::with_queue(config, Arc::new(TestParser), queue).unwrap();
    let h = Harness::wire(
        second,
        endpoint(&key, service(), fast_policy()),
        consumer,
        dir,
    )
    .await;
    wait_for("the delivery", Duration::from_secs(10), || {
        h.consumer.requests().len() == 1
    })
    .await;
    wait_for(
        "receive and deliver exported",
        Duration::from_secs(15),
        || {
            let spans = collector.spans();
            !named(&spans, "deliver").is_empty() && !named(&spans, "receive").is_empty()
        },
    )
    .await;
    let spans = collector.spans();
    let (receive, deliver, attempt) = (
        named(&spans, "receive")[0],
        named(&spans, "deliver")[0],
        named(&spans, "attempt")[0],
    );
    assert!(receive.get("parentSpanId").is_none(), "a root: {receive}");
    assert_eq!(deliver["parentSpanId"], receive["spanId"]);
    assert_eq!(attempt["parentSpanId"], deliver["spanId"]);
    let (trace, span, _) = traceparent_of(&h.consumer.requests()[0]);
    for s in [receive, deliver, attempt] {
        assert_eq!(s["traceId"], trace.as_str());
    }
    assert_eq!(attempt["spanId"], span.as_str());
    assert_no_secrets(&collector.raw(), h.consumer.addr, MARKER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_sees_the_providers_headers_without_its_credentials() {
    let h = Harness::start(|_, ep| {
        ep.filter = Some(
            webhook_operator::delivery::filter::Filter::compile(
                "headers['x-provider-event'] == 'wanted' && !('x-test-secret' in headers) \
                 && headers['content-type'] == 'application/json'",
            )
            .unwrap(),
        );
    })
    .await;
    for (id, kind) in [("skip", "other"), ("keep", "wanted")] {
        let extra = [("X-Provider-Event", kind)];
        let status = provider_post(h.ingress, ev(id, "call_completed"), &extra).await;
        assert_eq!(status, 200);
    }
    wait_for("both handled", Duration::from_secs(10), || {
        let d = h.dp.queue_depth(&h.key);
        d.pending == 0 && d.leased == 0 && !h.consumer.requests().is_empty()
    })
    .await;
    let delivered = h.consumer.payload_ids();
    assert_eq!(delivered, ["keep"]);
    assert_eq!(h.dp.queue_depth(&h.key).dead_lettered, 0);
    assert!(
        h.metrics().await.contains(
            "webhook_operator_events_filtered_total{namespace=\"apps\",name=\"orders\"} 1"
        )
    );
}

/// Idle sockets fill `--max-connections`: some send nothing, some one byte (`P` keeps the
/// server guessing between HTTP/1 and HTTP/2, `G` does not). Each is closed at the header
/// deadline, counted as `header_timeout`, so a valid POST sent behind them (waiting in the
/// kernel's accept queue) is answered within the deadline and a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_cannot_hold_the_connection_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use webhook_operator::dataplane::server::{ServerLimits, serve as serve_limited};

    let deadline = Duration::from_secs(2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/hooks/t/s", axum::routing::post(|| async { "ok" }));
    let metrics = Arc::new(webhook_operator::metrics::Metrics::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = ServerLimits {
        max_connections: 4,
        header_read_timeout: deadline,
        shutdown_grace: Duration::from_secs(1),
    };
    let server = tokio::spawn(serve_limited(
        listener,
        router,
        limits,
        metrics.clone(),
        shutdown.clone(),
    ));
    let mut idle = Vec::new();
    for sent in [&b""[..], b"P", b"G", b"", b"P", b"G"] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        idle.push(s);
    }
    // The first four hold every slot before the POST connects.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let post = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /hooks/t/s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            .await
            .unwrap();
        let mut answer = vec![0u8; 512];
        let n = s.read(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), post).await;
    let took = started.elapsed();
    println!(
        "valid POST behind 6 idle sockets (limit 4, deadline {deadline:?}): {answer:?} after {took:?}"
    );
    let answer = answer.expect("no answer within 10 s: idle sockets hold the connection limit");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took <= deadline + Duration::from_secs(1),
        "answered after {took:?}, past the header deadline {deadline:?} + 1 s"
    );
    // Every idle socket was closed by the server (read gives EOF or a reset), none answered.
    for (i, mut s) in idle.into_iter().enumerate() {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(deadline * 3, s.read(&mut buf)).await;
        let read = read.unwrap_or_else(|_| panic!("idle socket {i} still open"));
        assert!(matches!(read, Ok(0) | Err(_)), "idle socket {i}: {read:?}");
    }
    let text = metrics.encode();
    let line = text
        .lines()
        .find(|l| l.contains("reason=\"header_timeout\""))
        .unwrap_or_default()
        .to_string();
    assert!(line.ends_with(" 6"), "header_timeout count: {line:?}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops within its grace period")
        .unwrap();
}

// ------------------------------------------------------------ fetch on a failed signature

/// The provider's current secret, as a stand-in for the operator's provider read.
struct StubKeys {
    secret: &'static str,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl webhook_operator::ingress::key_fetch::KeySource for StubKeys {
    async fn current_secrets(
        &self,
        _: &EndpointKey,
        _: &str,
    ) -> Result<Vec<Vec<u8>>, webhook_operator::ingress::key_fetch::KeyFetchError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(vec![self.secret.as_bytes().to_vec()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_the_route_does_not_hold_is_fetched_once_and_then_accepted() {
    let h = Harness::start(|_, _| {}).await;
    h.dp.upsert_subscription(SubscriptionRoute {
        endpoint: h.key.clone(),
        name: "rotating".into(),
        provider: Provider::Smallest,
        keys: VerificationKeys {
            secrets: vec![PROVIDER_SECRET.as_bytes().to_vec()],
            ..Default::default()
        },
    });
    let hook = format!("/hooks/{TOKEN}/rotating");
    let body = |id: &str| ev(id, "call_completed").to_string();
    // Without a key source (today's ingress): the provider's new secret is refused.
    let (status, _) = h
        .post_to(&hook, body("k0"), "rotated", "application/json")
        .await;
    assert_eq!(status, 401, "no source, no fetch");

    let keys = Arc::new(StubKeys {
        secret: "rotated",
        calls: Default::default(),
    });
    h.dp.set_key_source(keys.clone());
    for id in ["k1", "k2", "k3"] {
        let (status, answer) = h
            .post_to(&hook, body(id), "rotated", "application/json")
            .await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(
        keys.calls.load(Ordering::SeqCst),
        1,
        "fetched once, then held"
    );
    // The secret the route held stays accepted (the overlap); a wrong one is refused
    // after one more (bounded) fetch.
    let (status, _) = h
        .post_to(&hook, body("k4"), PROVIDER_SECRET, "application/json")
        .await;
    assert_eq!(status, 200);
    let (status, _) = h
        .post_to(&hook, body("k5"), "forged", "application/json")
        .await;
    assert_eq!(status, 401);
    assert_eq!(keys.calls.load(Ordering::SeqCst), 2);
    // Atlas does not sign with a provider-issued secret: nothing is fetched for it.
    let (status, _) = h
        .post_to(
            &format!("/hooks/{TOKEN}/calls"),
            body("k6"),
            "forged",
            "application/json",
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(keys.calls.load(Ordering::SeqCst), 2);
    wait_for(
        "the four accepted events delivered",
        Duration::from_secs(20),
        || h.consumer.requests().len() >= 4,
    )
    .await;
    let metrics = h.metrics().await;
    for line in [
        "webhook_operator_key_fetches_total{provider=\"smallest\",result=\"fetched\"} 1",
        "webhook_operator_key_fetches_total{provider=\"smallest\",result=\"unchanged\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(!metrics.contains("rotated"), "no secret in the metrics");
}
