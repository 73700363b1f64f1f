//! The whole path with the real binary: provider simulator → operator ingress → durable
//! queue → delivery → a loopback consumer that checks every signature with an independent
//! Standard Webhooks implementation (the `standardwebhooks` crate, not our code).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use k8s_openapi::api::core::v1::{Event, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};
use webhook_sandbox::SandboxHandle;

use crate::fixtures::*;
use crate::ports::free_port;
use crate::support::{TestEnv, test_env, wait_until};

/// One delivery as the consumer saw it.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) webhook_id: String,
    pub(crate) body: Value,
    pub(crate) headers: HeaderMap,
    pub(crate) verified: bool,
    /// Whether each of `Consumer::also_verify_with` verifies it, in order.
    verified_with: Vec<bool>,
    /// `webhook-timestamp`: the operator's clock when it signed this attempt.
    signed_at: i64,
}

/// A loopback consumer: answers with `status`, records what arrives, verifies signatures.
#[derive(Clone)]
pub(crate) struct Consumer {
    pub(crate) port: u16,
    status: Arc<AtomicU16>,
    pub(crate) secret: Arc<Mutex<Option<String>>>,
    also_verify_with: Arc<Mutex<Vec<String>>>,
    received: Arc<Mutex<Vec<Received>>>,
    /// How long each answer takes.
    pub(crate) delay_ms: Arc<AtomicU64>,
    /// Requests being answered right now.
    pub(crate) in_flight: Arc<AtomicUsize>,
    /// `(marker, status)`: a body that contains the marker gets that status instead.
    answers_by_body: Arc<Mutex<Vec<(String, u16)>>>,
}

impl Consumer {
    pub(crate) async fn start() -> Consumer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let consumer = Consumer {
            port: listener.local_addr().unwrap().port(),
            status: Arc::new(AtomicU16::new(200)),
            secret: Arc::default(),
            also_verify_with: Arc::default(),
            received: Arc::default(),
            answers_by_body: Arc::default(),
            delay_ms: Arc::default(),
            in_flight: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(consumer.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        consumer
    }

    pub(crate) fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn receive(
    State(c): State<Consumer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let delay = c.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        // Counted only while the answer is pending; a request the operator abandons
        // drops this future and is never recorded as received.
        struct Pending(Arc<AtomicUsize>);
        impl Drop for Pending {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        c.in_flight.fetch_add(1, Ordering::SeqCst);
        let _pending = Pending(c.in_flight.clone());
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let text = String::from_utf8_lossy(&body);
    let by_body = c
        .answers_by_body
        .lock()
        .unwrap()
        .iter()
        .find(|(marker, _)| text.contains(marker.as_str()))
        .map(|(_, status)| *status);
    let status =
        StatusCode::from_u16(by_body.unwrap_or_else(|| c.status.load(Ordering::SeqCst))).unwrap();
    if !status.is_success() {
        return status;
    }
    let verifies = |s: &str| {
        standardwebhooks::Webhook::new(s)
            .and_then(|wh| wh.verify(&body, &headers))
            .is_ok()
    };
    let secret = c.secret.lock().unwrap().clone();
    let verified = secret.is_some_and(|s| verifies(&s));
    let verified_with = c
        .also_verify_with
        .lock()
        .unwrap()
        .iter()
        .map(|s| verifies(s))
        .collect();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    c.received.lock().unwrap().push(Received {
        webhook_id,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        headers: headers.clone(),
        verified,
        verified_with,
        signed_at: headers
            .get("webhook-timestamp")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or_default(),
    });
    status
}

/// `webhook-operator run` as a child process, its log lines collected.
pub(crate) struct OperatorProcess {
    pub(crate) child: Child,
    pub(crate) logs: Arc<Mutex<Vec<String>>>,
}

impl OperatorProcess {
    pub(crate) fn start(
        env: &TestEnv,
        sandbox: &SandboxHandle,
        consumer: &Consumer,
        ingress_port: u16,
        data_dir: &Path,
    ) -> OperatorProcess {
        Self::start_with(env, sandbox, consumer, ingress_port, data_dir, &[])
    }

    pub(crate) fn start_with(
        env: &TestEnv,
        sandbox: &SandboxHandle,
        consumer: &Consumer,
        ingress_port: u16,
        data_dir: &Path,
        extra: &[&str],
    ) -> OperatorProcess {
        Self::spawn(
            env,
            sandbox,
            consumer,
            ingress_port,
            data_dir,
            extra,
            "webhook_operator=info",
            true,
        )
    }

    /// Under the production address policy: no `--allow-loopback`.
    pub(crate) fn start_strict(
        env: &TestEnv,
        sandbox: &SandboxHandle,
        consumer: &Consumer,
        ingress_port: u16,
        data_dir: &Path,
    ) -> OperatorProcess {
        Self::spawn(
            env,
            sandbox,
            consumer,
            ingress_port,
            data_dir,
            &[],
            "webhook_operator=info",
            false,
        )
    }

    /// Both output streams of the process are collected, at the `RUST_LOG` level given.
    pub(crate) fn start_logging(
        env: &TestEnv,
        sandbox: &SandboxHandle,
        consumer: &Consumer,
        ingress_port: u16,
        data_dir: &Path,
        extra: &[&str],
        rust_log: &str,
    ) -> OperatorProcess {
        Self::spawn(
            env,
            sandbox,
            consumer,
            ingress_port,
            data_dir,
            extra,
            rust_log,
            true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        env: &TestEnv,
        sandbox: &SandboxHandle,
        consumer: &Consumer,
        ingress_port: u16,
        data_dir: &Path,
        extra: &[&str],
        rust_log: &str,
        allow_loopback: bool,
    ) -> OperatorProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-operator"))
            .arg("run")
            .args(allow_loopback.then_some("--allow-loopback"))
            .args(["--ingress-addr", &format!("127.0.0.1:{ingress_port}")])
            .args(if extra.contains(&"--ops-addr") {
                &[][..]
            } else {
                &["--ops-addr", "127.0.0.1:0"][..]
            })
            .args([
                "--public-base-url",
                &format!("http://127.0.0.1:{ingress_port}"),
            ])
            .args(["--provider-sandbox-url", &sandbox.base_url()])
            // The consumer is on loopback: mapped to it only where loopback is allowed
            // (the operator refuses a `--resolve` to an address its policy refuses).
            .args(
                allow_loopback
                    .then(|| {
                        [
                            "--resolve".to_string(),
                            format!(
                                "consumer.{}.svc:8080=127.0.0.1:{}",
                                env.namespace, consumer.port
                            ),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .args(["--namespace", &env.namespace])
            .arg("--data-dir")
            .arg(data_dir)
            // Last, so that a test's flags override the defaults above.
            .args(extra)
            .env("KUBECONFIG", &env.cp.kubeconfig)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start operator");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        OperatorProcess { child, logs }
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub(crate) fn consumer_destination() -> Value {
    json!({"service": {"name": "consumer", "port": 8080, "path": "/events"}})
}

/// Waits until the endpoint's status satisfies `check`.
pub(crate) async fn wait_endpoint<F>(
    env: &TestEnv,
    name: &str,
    what: &str,
    check: F,
) -> WebhookEndpoint
where
    F: Fn(&WebhookEndpoint) -> bool,
{
    let api: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_until(Duration::from_secs(90), what, || {
        let api = api.clone();
        let check = &check;
        async move {
            let ep = api.get(name).await.ok()?;
            check(&ep).then_some(ep)
        }
    })
    .await
}

pub(crate) fn condition(ep: &WebhookEndpoint, type_: &str) -> Option<(String, String)> {
    ep.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits for the endpoint's `Ready=True`.
pub(crate) async fn wait_ready(env: &TestEnv, endpoint: &str, what: &str) -> WebhookEndpoint {
    wait_endpoint(env, endpoint, what, |ep| {
        condition(ep, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await
}

/// Waits for the endpoint's condition `type_` to be `False` with `reason`.
pub(crate) async fn wait_false(
    env: &TestEnv,
    endpoint: &str,
    what: &str,
    type_: &str,
    reason: &str,
) -> WebhookEndpoint {
    wait_endpoint(env, endpoint, what, |ep| {
        condition(ep, type_).is_some_and(|(s, r)| s == "False" && r == reason)
    })
    .await
}

/// Waits for the endpoint's `status.delivery.deadLettered` to be `n`.
pub(crate) async fn wait_dead_lettered(
    env: &TestEnv,
    endpoint: &str,
    n: u64,
    what: &str,
) -> WebhookEndpoint {
    wait_endpoint(env, endpoint, what, |ep| {
        ep.status
            .as_ref()
            .and_then(|s| s.delivery.as_ref())
            .is_some_and(|d| d.dead_lettered == n)
    })
    .await
}

/// The endpoint's condition `type_`; panics when it has none.
pub(crate) fn condition_of(ep: WebhookEndpoint, type_: &str) -> Condition {
    ep.status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .unwrap()
}

pub(crate) fn delivered(ep: &WebhookEndpoint) -> u64 {
    ep.status
        .as_ref()
        .and_then(|s| s.delivery.as_ref())
        .map_or(0, |d| d.delivered)
}

pub(crate) async fn signing_secret(env: &TestEnv, endpoint: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let s = secrets.get(&format!("{endpoint}-signing")).await.unwrap();
    String::from_utf8(s.data.unwrap()["secret"].0.clone()).unwrap()
}

pub(crate) async fn ingress_url(env: &TestEnv, endpoint: &str) -> String {
    let ep = wait_ready(env, endpoint, "endpoint Ready").await;
    ep.status.unwrap().ingress_url.unwrap()
}

/// POSTs `body` as JSON to `url` with a fresh client.
pub(crate) async fn send_json(url: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new().post(url).json(body).send().await
}

/// Posts the Atlas event `id` to `url` with `http`; returns the answer.
pub(crate) async fn post_event(http: &reqwest::Client, url: &str, id: &str) -> reqwest::Response {
    http.post(url).json(&atlas_event(id)).send().await.unwrap()
}

/// Posts the Atlas event `id` to `url`; the ingress must accept it.
pub(crate) async fn post_accepted(http: &reqwest::Client, url: &str, id: &str) {
    let r = post_event(http, url, id).await;
    assert!(r.status().is_success(), "{id}: {}", r.status());
}

/// Applies the `atlas` subscription of `specs()` to endpoint `orders`, waits for it to be
/// Ready, and returns its ingress URL.
pub(crate) async fn atlas_ready_url(env: &TestEnv) -> String {
    apply_subscription(env, "atlas", specs()[0].1.clone()).await;
    wait_condition(env, "atlas", "Ready", "True", None).await;
    format!("{}/atlas", ingress_url(env, "orders").await)
}

/// What `setup` returns: the namespace, the simulator, the consumer, the operator, its data
/// directory and its ingress port.
pub(crate) type Setup = (
    TestEnv,
    SandboxHandle,
    Consumer,
    OperatorProcess,
    tempfile::TempDir,
    u16,
);

/// Sandbox, consumer, credentials, endpoint `orders` and a running operator.
async fn setup(prefix: &str, endpoint_spec: Value) -> Setup {
    setup_with(prefix, endpoint_spec, &[]).await
}

/// `setup_with` an endpoint `orders` that delivers to the consumer as it is.
pub(crate) async fn setup_to_consumer(prefix: &str, extra: &[&str]) -> Setup {
    setup_with(
        prefix,
        json!({"destination": consumer_destination()}),
        extra,
    )
    .await
}

pub(crate) async fn setup_with(prefix: &str, endpoint_spec: Value, extra: &[&str]) -> Setup {
    setup_in(test_env(prefix).await, endpoint_spec, extra).await
}

/// [`setup_with`] in an environment the test prepared (Secrets the endpoint names).
pub(crate) async fn setup_in(env: TestEnv, endpoint_spec: Value, extra: &[&str]) -> Setup {
    let sandbox = sandbox().await;
    let consumer = Consumer::start().await;
    credentials(&env).await;
    apply_endpoint(&env, "orders", endpoint_spec).await;
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let operator =
        OperatorProcess::start_with(&env, &sandbox, &consumer, port, data_dir.path(), extra);
    ingress_url(&env, "orders").await;
    *consumer.secret.lock().unwrap() = Some(signing_secret(&env, "orders").await);
    (env, sandbox, consumer, operator, data_dir, port)
}

pub(crate) fn atlas_event(call_id: &str) -> Value {
    json!([{"callId": call_id, "campaignId": "camp-1", "triggerName": "call_completed", "customerNumber": "+15550100"}])
}

#[tokio::test]
async fn each_provider_event_reaches_the_consumer_once_signed() {
    let (env, sandbox, consumer, operator, _dir, _) =
        setup("e2e", json!({"destination": consumer_destination()})).await;
    for (name, spec) in specs() {
        apply_subscription(&env, name, spec).await;
    }
    apply_subscription(&env, "atllas", json!({"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}})).await;
    for name in ["atlas", "atomic", "smallest", "atllas"] {
        wait_condition(&env, name, "Ready", "True", None).await;
    }
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    for (provider, result) in fire_each_provider(&env, &sandbox).await {
        let statuses: Vec<u64> = result["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["status"].as_u64().unwrap())
            .collect();
        assert_eq!(
            statuses,
            [200],
            "{provider}: the ingress accepted exactly one delivery: {result}"
        );
    }
    wait_until(Duration::from_secs(30), "four deliveries", || {
        let n = consumer.received().len();
        async move { (n >= 4).then_some(()) }
    })
    .await;
    // The operator's own count settles at four acknowledged deliveries before the
    // consumer's record is checked for duplicates.
    wait_endpoint(&env, "orders", "delivered=4", |ep| delivered(ep) == 4).await;
    let received = consumer.received();
    assert_eq!(received.len(), 4, "each event exactly once: {received:?}");
    assert!(
        received.iter().all(|r| r.verified),
        "every signature verifies with the independent library"
    );
    let ids: BTreeSet<_> = received.iter().map(|r| r.webhook_id.clone()).collect();
    assert_eq!(ids.len(), 4, "distinct webhook-id per event");

    // Status reflects it: delivered count, Healthy, events received per subscription.
    let ep = wait_endpoint(&env, "orders", "delivered=4 and Healthy", |ep| {
        delivered(ep) == 4
            && condition(ep, "Healthy").is_some_and(|(s, r)| s == "True" && r == "Delivering")
    })
    .await;
    assert!(
        ep.status
            .unwrap()
            .delivery
            .unwrap()
            .latency_p99_ms
            .is_some()
    );
    for name in ["atlas", "atomic", "smallest", "atllas"] {
        wait_subscription(
            &subs,
            name,
            Duration::from_secs(30),
            &format!("{name} counts its event"),
            |s| (s.status?.events?.received == 1).then_some(()),
        )
        .await;
    }
    drop(operator);
}

/// The status an oversize POST gets. Sent by hand: the ingress answers 413 from the
/// declared length without reading the body, and an HTTP client still writing the body
/// may see the connection close before it reads that answer.
async fn oversize_status(url: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url::Url::parse(url).unwrap();
    let mut stream = tokio::net::TcpStream::connect((url.host_str().unwrap(), url.port().unwrap()))
        .await
        .unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        url.path(),
        url.host_str().unwrap(),
        2 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b' '; 4096]).await.unwrap();
    let mut response = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    let line = String::from_utf8_lossy(&response[..n]).to_string();
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_reaches_the_consumer() {
    let (env, _sandbox, consumer, operator, _dir, port) =
        setup("reject", json!({"destination": consumer_destination()})).await;
    apply_subscription(&env, "atomic", specs()[1].1.clone()).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    apply_subscription(&env, "atllas", json!({"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}})).await;
    for name in ["atomic", "atlas", "atllas"] {
        wait_condition(&env, name, "Ready", "True", None).await;
    }
    let base = ingress_url(&env, "orders").await;
    let http = reqwest::Client::new();
    let post = |url: String, body: Vec<u8>, headers: Vec<(&'static str, &'static str)>| {
        let http = http.clone();
        async move {
            let mut req = http
                .post(url)
                .header("content-type", "application/json")
                .body(body);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    let atomic_body = br#"{"requestId":"r","environmentId":"env1","webhookId":"w","isBatched":false,"data":{"id":"e1","analyticsEvent":"card-published","timestamp":"2026-01-01T00:00:00Z"}}"#.to_vec();
    let atllas_body =
        br#"{"type":"call.finished","timestamp":1,"call":{"id":"c1","status":"finished"}}"#
            .to_vec();
    let cases = [
        (
            "bad Atomic signature",
            post(
                format!("{base}/atomic"),
                atomic_body,
                vec![("x-atomic-signature", "00")],
            )
            .await,
            401,
        ),
        (
            "wrong Atllas header",
            post(
                format!("{base}/atllas"),
                atllas_body,
                vec![("x-webhook-token", "wrong")],
            )
            .await,
            401,
        ),
        (
            "unknown token",
            post(
                format!("http://127.0.0.1:{port}/hooks/0000/atlas"),
                atlas_event("c").to_string().into_bytes(),
                vec![],
            )
            .await,
            404,
        ),
        (
            "unknown subscription",
            post(
                format!("{base}/nobody"),
                atlas_event("c").to_string().into_bytes(),
                vec![],
            )
            .await,
            404,
        ),
        (
            "oversize",
            oversize_status(&format!("{base}/atlas")).await,
            413,
        ),
        (
            "malformed JSON",
            post(format!("{base}/atlas"), b"[{\"callId\":".to_vec(), vec![]).await,
            400,
        ),
    ];
    for (what, got, want) in cases {
        assert_eq!(got, want, "{what}");
    }
    // A good event sent after the refused ones arrives; then it is the only delivery.
    let good = post(
        format!("{base}/atlas"),
        atlas_event("good").to_string().into_bytes(),
        vec![],
    )
    .await;
    assert_eq!(good, 200, "a valid event after the refused ones");
    wait_endpoint(&env, "orders", "the good event delivered", |ep| {
        delivered(ep) >= 1
    })
    .await;
    let received = consumer.received();
    assert_eq!(
        received
            .iter()
            .map(|r| r.body["callId"].clone())
            .collect::<Vec<_>>(),
        [json!("good")],
        "nothing unverified was delivered"
    );
    let metrics_seen = operator
        .logs
        .lock()
        .unwrap()
        .iter()
        .all(|l| !l.contains("panicked"));
    assert!(metrics_seen, "the operator did not panic");
}

#[tokio::test]
async fn failing_consumer_is_retried_health_degrades_then_recovers() {
    let spec = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"maxAttempts": 100, "initialDelay": "200ms", "maxDelay": "2s"}}});
    // A short health window, so recovery shows within the test rather than after 5 min.
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup_with("retry", spec, &["--health-window", "10s"]).await;
    let url = atlas_ready_url(&env).await;
    consumer.answer(500);
    let http = reqwest::Client::new();
    for i in 0..3 {
        let status = post_event(&http, &url, &format!("retry-{i}"))
            .await
            .status();
        assert!(status.is_success());
    }
    let ep = wait_endpoint(&env, "orders", "Healthy=False", |ep| {
        condition(ep, "Healthy").is_some_and(|(s, _)| s == "False")
    })
    .await;
    let (_, reason) = condition(&ep, "Healthy").unwrap();
    assert!(
        reason == "DeliveryFailing" || reason == "Degraded",
        "{reason}"
    );
    // Retried, not given up: attempts keep failing and nothing is dead-lettered.
    wait_endpoint(&env, "orders", "several failed attempts per event", |ep| {
        ep.status
            .as_ref()
            .and_then(|s| s.delivery.as_ref())
            .is_some_and(|d| d.failed >= 9 && d.dead_lettered == 0)
    })
    .await;
    consumer.answer(200);
    let ep = wait_endpoint(
        &env,
        "orders",
        "delivered after recovery and Healthy again",
        |ep| delivered(ep) == 3 && condition(ep, "Healthy").is_some_and(|(s, _)| s == "True"),
    )
    .await;
    assert!(
        ep.status.unwrap().delivery.unwrap().failed >= 3,
        "attempts failed while the consumer was down"
    );
    let mut ids: Vec<String> = consumer
        .received()
        .iter()
        .map(|r| r.body["callId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["retry-0", "retry-1", "retry-2"]);
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == &reason),
        "an Event for the failure: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "Delivering"),
        "an Event for the recovery: {reasons:?}"
    );
}

#[tokio::test]
async fn exhausted_events_are_dead_lettered_and_replayed() {
    let spec = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"maxAttempts": 2, "initialDelay": "100ms", "maxDelay": "200ms"}}});
    let (env, _sandbox, consumer, _operator, _dir, _) = setup("dlq", spec).await;
    let url = atlas_ready_url(&env).await;
    consumer.answer(503);
    let http = reqwest::Client::new();
    for i in 0..2 {
        assert!(
            post_event(&http, &url, &format!("dlq-{i}"))
                .await
                .status()
                .is_success()
        );
    }
    wait_dead_lettered(&env, "orders", 2, "two dead letters").await;
    consumer.answer(200);
    // `webhook-operator replay` sets the annotation and waits for the operator's echo.
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-operator"))
        .args([
            "replay",
            "orders",
            "--namespace",
            &env.namespace,
            "--timeout",
            "60s",
        ])
        .env("KUBECONFIG", &env.cp.kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("handled"));
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let notes: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("re-queued 2 dead-lettered events")),
        "{notes:?}"
    );
    wait_until(Duration::from_secs(30), "replayed events delivered", || {
        let n = consumer.received().len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    assert!(consumer.received().iter().all(|r| r.verified));
}

#[tokio::test]
async fn sigkill_mid_delivery_loses_no_acknowledged_event() {
    let spec = json!({"destination": consumer_destination(),
        "delivery": {"ratePerSecond": 1500, "maxInFlight": 32, "retry": {"initialDelay": "100ms", "maxDelay": "1s"}}});
    let (env, sandbox, consumer, mut operator, dir, port) = setup("crash", spec).await;
    let url = atlas_ready_url(&env).await;

    const TOTAL: usize = 10_000;
    let accepted: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = |stop_at: usize| {
        let (accepted, next, url) = (accepted.clone(), next.clone(), url.clone());
        async move {
            let http = reqwest::Client::new();
            let workers: Vec<_> = (0..32)
                .map(|_| {
                    let (accepted, next, url, http) =
                        (accepted.clone(), next.clone(), url.clone(), http.clone());
                    tokio::spawn(async move {
                        while accepted.lock().unwrap().len() < stop_at {
                            let n = next.fetch_add(1, Ordering::SeqCst);
                            let id = format!("load-{n}");
                            if let Ok(r) = http.post(&url).json(&atlas_event(&id)).send().await
                                && r.status().is_success()
                            {
                                accepted.lock().unwrap().insert(id);
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.await.unwrap();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), load(TOTAL / 4))
        .await
        .expect("first quarter of the load");
    // From here the consumer refuses, so whatever the pace of delivery, every event
    // acknowledged from now on is still undelivered (and being retried) at the kill.
    consumer.answer(503);
    tokio::time::timeout(Duration::from_secs(120), load(TOTAL / 2))
        .await
        .expect("second quarter of the load");
    operator.kill9();
    let delivered_at_kill = consumer.received().len();
    consumer.answer(200);
    let _operator = OperatorProcess::start(&env, &sandbox, &consumer, port, dir.path());
    wait_until(Duration::from_secs(30), "ingress back", || {
        let url = url.clone();
        async move {
            let r = send_json(&url, &atlas_event("probe")).await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    accepted.lock().unwrap().insert("probe".into());
    tokio::time::timeout(Duration::from_secs(120), load(TOTAL))
        .await
        .expect("second half of the load");

    let accepted = accepted.lock().unwrap().clone();
    wait_until(
        Duration::from_secs(180),
        "every acknowledged event delivered",
        || {
            let got: BTreeSet<String> = consumer
                .received()
                .iter()
                .filter_map(|r| r.body["callId"].as_str().map(String::from))
                .collect();
            let missing = accepted.difference(&got).count();
            async move { (missing == 0).then_some(()) }
        },
    )
    .await;
    // A redelivery after the crash is allowed, but only with the same webhook-id.
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in consumer.received() {
        assert!(r.verified);
        ids.entry(r.body["callId"].as_str().unwrap().to_string())
            .or_default()
            .insert(r.webhook_id);
    }
    assert!(
        ids.values().all(|s| s.len() == 1),
        "a duplicate carried a new webhook-id"
    );
    println!(
        "crash test: {} acknowledged, {} delivered at the kill, {} deliveries in all ({} duplicates)",
        accepted.len(),
        delivered_at_kill,
        consumer.received().len(),
        consumer.received().len() - ids.len()
    );
}

/// A header the data plane cannot send (a reserved name the schema lets through, a value
/// with a line break inside) gets its own reason, `HeaderInvalid`, not `DestinationForbidden`.
#[tokio::test]
async fn a_header_the_data_plane_refuses_gets_its_own_reason() {
    let (env, _sandbox, _consumer, _operator, _dir, _) =
        setup("badheader", json!({"destination": consumer_destination()})).await;
    create_secret(&env, "auth", json!({"line": "one\ntwo", "ok": "t0ken"})).await;
    for (header, key) in [("X-Token", "line"), ("Upgrade", "ok")] {
        apply_endpoint(
            &env,
            "orders",
            json!({"destination": consumer_destination(),
                   "headers": [{"name": header, "secretKeyRef": {"name": "auth", "key": key}}]}),
        )
        .await;
        let ep = wait_endpoint(&env, "orders", "Ready=False", |ep| {
            condition(ep, "Ready").is_some_and(|(s, _)| s == "False")
        })
        .await;
        let ready = condition_of(ep, "Ready");
        println!(
            "header {header}: Ready=False {} {:?}",
            ready.reason, ready.message
        );
        assert_eq!(ready.reason, "HeaderInvalid", "{header}: {}", ready.message);
        assert!(ready.message.contains(header), "{}", ready.message);
        // Fixed: Ready again before the next case.
        apply_endpoint(
            &env,
            "orders",
            json!({"destination": consumer_destination()}),
        )
        .await;
        wait_ready(&env, "orders", "Ready again").await;
    }
}

#[tokio::test]
async fn link_local_destination_is_refused_with_a_condition() {
    let env = test_env("ssrf").await;
    // http to a public or link-local host is refused by the API server already.
    let api: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let obj = json!({"apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
        "metadata": {"name": "metadata"}, "spec": {"destination": {"url": "http://169.254.169.254/"}}});
    let err = api
        .patch("metadata", &PatchParams::apply("test"), &Patch::Apply(&obj))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.destination.url"), "{err}");

    // https passes the schema; the operator refuses it at delivery and says so.
    let sandbox = sandbox().await;
    let consumer = Consumer::start().await;
    apply_endpoint(
        &env,
        "metadata",
        json!({"destination": {"url": "https://169.254.169.254/latest/meta-data"}}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _operator = OperatorProcess::start(&env, &sandbox, &consumer, free_port(), dir.path());
    let ep = wait_false(
        &env,
        "metadata",
        "Ready=False DestinationForbidden",
        "Ready",
        "DestinationForbidden",
    )
    .await;
    let msg = condition_of(ep, "Ready").message;
    assert!(msg.contains("forbidden"), "{msg}");
}

#[tokio::test]
async fn rotating_the_signing_secret_signs_with_both_during_the_overlap() {
    let spec =
        json!({"destination": consumer_destination(), "signing": {"rotationOverlap": "10s"}});
    let (env, _sandbox, consumer, _operator, _dir, _) = setup("rotate", spec).await;
    let url = atlas_ready_url(&env).await;
    let old = signing_secret(&env, "orders").await;
    *consumer.also_verify_with.lock().unwrap() = vec![old.clone()];

    // Events flow the whole time, numbered in the order they are acknowledged.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let (stop, sent, url) = (stop.clone(), sent.clone(), url.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::SeqCst) {
                let n = sent.load(Ordering::SeqCst);
                let r = post_event(&http, &url, &format!("rot-{n}")).await;
                assert!(r.status().is_success());
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let number = |r: &Received| -> usize {
        r.body["callId"].as_str().unwrap()["rot-".len()..]
            .parse()
            .unwrap()
    };
    wait_until(
        Duration::from_secs(60),
        "deliveries before the rotation",
        || {
            let n = consumer.received().len();
            async move { (n >= 10).then_some(()) }
        },
    )
    .await;

    let api: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let before = api
        .get("orders")
        .await
        .unwrap()
        .status
        .unwrap()
        .signing_secret_hash
        .unwrap();
    let patch = json!({"metadata": {"annotations": {"hooks.webhook-operator.dev/rotate-signing-secret": "1"}}});
    api.patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let ep = wait_endpoint(&env, "orders", "new secret hash", |ep| {
        ep.status
            .as_ref()
            .and_then(|s| s.signing_secret_hash.as_ref())
            .is_some_and(|h| *h != before)
    })
    .await;
    assert_eq!(
        ep.status.unwrap().last_handled_rotation.as_deref(),
        Some("1")
    );
    let new = signing_secret(&env, "orders").await;
    assert_ne!(new, old);
    // The consumer switches to the new secret at once; it keeps checking the old one too.
    *consumer.secret.lock().unwrap() = Some(new.clone());
    *consumer.also_verify_with.lock().unwrap() = vec![old.clone(), new.clone()];
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let owned = secrets.get("orders-signing").await.unwrap().data.unwrap();
    let until: jiff::Timestamp = String::from_utf8(owned["previous-until"].0.clone())
        .unwrap()
        .parse()
        .unwrap();

    // The window ends when the operator drops the old secret from its own Secret; the
    // first delivery signed with the new secret only shows the data plane has it too, so
    // every event acknowledged after that one is signed with the new secret only.
    wait_until(Duration::from_secs(60), "old secret dropped", || {
        let secrets = secrets.clone();
        async move {
            let data = secrets.get("orders-signing").await.ok()?.data?;
            (!data.contains_key("previous")).then_some(())
        }
    })
    .await;
    let acked_before_new_only = wait_until(Duration::from_secs(60), "a new-only delivery", || {
        let received = consumer.received();
        let sent = sent.load(Ordering::SeqCst);
        async move {
            received
                .iter()
                .any(|r| r.verified_with.len() == 2 && r.verified_with[1] && !r.verified_with[0])
                .then_some(sent)
        }
    })
    .await;
    wait_until(
        Duration::from_secs(60),
        "ten events after the window",
        || {
            let n = sent.load(Ordering::SeqCst);
            async move { (n > acked_before_new_only + 10).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    sender.await.unwrap();
    let sent = sent.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(60), "every event delivered", || {
        let n = consumer.received().len();
        async move { (n >= sent).then_some(()) }
    })
    .await;

    let received = consumer.received();
    let (mut inside, mut after) = (0, 0);
    for r in &received {
        let v = &r.verified_with;
        if v.len() == 1 {
            assert!(
                v[0],
                "before the rotation every delivery verifies with the old secret"
            );
            continue;
        }
        let (with_old, with_new) = (v[0], v[1]);
        assert!(with_new || with_old, "no delivery fails verification");
        // Signed with the new secret before the window ended by the operator's own clock
        // (the timestamp is whole seconds, so strictly before the second `until` falls in).
        if with_new && r.signed_at < until.as_second() {
            assert!(
                with_old,
                "inside the window both secrets verify: signed at {} until {until}, id {}",
                r.signed_at, r.webhook_id
            );
            inside += 1;
        }
        if number(r) > acked_before_new_only {
            assert!(
                with_new && !with_old,
                "after the window only the new secret verifies: {}",
                r.webhook_id
            );
            after += 1;
        }
    }
    assert!(
        inside >= 5 && after >= 10,
        "the test observed both periods ({inside} inside, {after} after)"
    );
    assert!(
        received
            .iter()
            .filter(|r| r.verified_with.len() == 2)
            .all(|r| r.verified),
        "the switched consumer accepts everything from the rotation on"
    );
}

#[tokio::test]
async fn a_replay_window_redelivers_exactly_the_events_in_it() {
    let spec =
        json!({"destination": consumer_destination(), "delivery": {"retry": {"maxAttempts": 1}}});
    let (env, _sandbox, consumer, _operator, _dir, _) = setup("window", spec).await;
    let url = atlas_ready_url(&env).await;
    consumer.answer(503);
    let http = reqwest::Client::new();
    let send = |ids: Vec<&'static str>| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            for id in ids {
                assert!(post_event(&http, &url, id).await.status().is_success());
            }
        }
    };
    let dead = |n: u64| {
        let env = &env;
        async move {
            wait_endpoint(env, "orders", &format!("{n} dead letters"), |ep| {
                ep.status
                    .as_ref()
                    .and_then(|s| s.delivery.as_ref())
                    .is_some_and(|d| d.dead_lettered == n)
            })
            .await;
        }
    };
    send(vec!["early-1", "early-2"]).await;
    dead(2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(vec!["late-1", "late-2", "late-3"]).await;
    dead(5).await;
    consumer.answer(200);

    // Reviewed in Git, applied as annotations: received since `since` only.
    let api: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let replay = |value: &str, window: Option<String>| {
        let mut annotations = json!({"hooks.webhook-operator.dev/replay-requested-at": value});
        if let Some(since) = window {
            annotations["hooks.webhook-operator.dev/replay-since"] = json!(since);
            annotations["hooks.webhook-operator.dev/replay-by"] = json!("received");
        } else {
            annotations["hooks.webhook-operator.dev/replay-since"] = Value::Null;
            annotations["hooks.webhook-operator.dev/replay-by"] = Value::Null;
        }
        json!({"metadata": {"annotations": annotations}})
    };
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&replay("late", Some(since.to_string()))),
    )
    .await
    .unwrap();
    // The operator's own count of what it re-queued, from its Event: once it says three,
    // three deliveries are all there is to wait for. Later replays update the same Event
    // as a series (its first note stays), so each replay handled adds one to its count.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.namespace);
    let replayed = || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.unwrap().items;
            let replays: Vec<_> = list
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("Replayed"))
                .collect();
            assert!(replays.len() <= 1, "one Replayed Event series: {replays:?}");
            replays.into_iter().next().map(|e| {
                let times = e.series.map_or(1, |s| s.count);
                (e.note.unwrap_or_default(), times)
            })
        }
    };
    wait_until(Duration::from_secs(30), "the window re-queued", || async {
        replayed()
            .await
            .filter(|(note, times)| note == "re-queued 3 dead-lettered events" && *times == 1)
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "the window's events delivered",
        || {
            let n = consumer.received().len();
            async move { (n >= 3).then_some(()) }
        },
    )
    .await;
    let mut ids: Vec<String> = consumer
        .received()
        .iter()
        .map(|r| r.body["callId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["late-1", "late-2", "late-3"],
        "exactly the events in the window"
    );

    // The same request again does nothing; a new one without a window takes the rest.
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&replay("late", Some(since.to_string()))),
    )
    .await
    .unwrap();
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(&replay("rest", None)),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "the rest delivered", || {
        let n = consumer.received().len();
        async move { (n >= 5).then_some(()) }
    })
    .await;
    // Handled in order: had the repeated request been handled again, it would count
    // before the rest does.
    let (_, times) = wait_until(Duration::from_secs(30), "the rest re-queued", || async {
        replayed().await.filter(|(_, times)| *times >= 2)
    })
    .await;
    assert_eq!(times, 2, "a request is handled once");
    assert_eq!(consumer.received().len(), 5, "each event delivered once");
    assert!(consumer.received().iter().all(|r| r.verified));
}

#[tokio::test]
async fn a_test_annotation_sends_one_test_event_through_the_whole_path() {
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup("testev", json!({"destination": consumer_destination()})).await;
    for (name, spec) in specs() {
        apply_subscription(&env, name, spec).await;
    }
    apply_subscription(&env, "atllas", json!({"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}})).await;
    let names = ["atlas", "atomic", "smallest", "atllas"];
    for name in names {
        wait_condition(&env, name, "Ready", "True", None).await;
    }
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let request = json!({"metadata": {"annotations": {"hooks.webhook-operator.dev/test-requested-at": "2026-11-23T08:00:00Z"}}});
    let requested = std::time::Instant::now();
    for name in names {
        subs.patch(name, &PatchParams::default(), &Patch::Merge(&request))
            .await
            .unwrap();
    }
    for name in names {
        let api = subs.clone();
        let last = wait_until(
            Duration::from_secs(60),
            &format!("{name}: lastTest Delivered"),
            || {
                let api = api.clone();
                async move {
                    let t = api.get(name).await.ok()?.status?.last_test?;
                    assert_ne!(t.result, "Failed", "{name}: {t:?}");
                    (t.result == "Delivered").then_some(t)
                }
            },
        )
        .await;
        assert_eq!(last.requested_at, "2026-11-23T08:00:00Z");
        // Measured by the operator between ingest and delivery: a real duration, and no
        // longer than the whole request took as seen from here.
        let bound = requested.elapsed().as_secs_f64() * 1000.0;
        assert!(
            last.latency_ms.is_some_and(|ms| ms > 0.0 && ms <= bound),
            "{name}: latency not in (0, {bound}] ms: {last:?}"
        );
    }
    let provider_sent = subs
        .get("atomic")
        .await
        .unwrap()
        .status
        .unwrap()
        .last_test
        .unwrap()
        .message
        .unwrap();
    assert!(
        provider_sent.contains("provider's test endpoint"),
        "Atomic uses its own test endpoint: {provider_sent}"
    );
    let received = consumer.received();
    assert_eq!(
        received.len(),
        4,
        "exactly one test event per subscription: {received:?}"
    );
    assert!(received.iter().all(|r| r.verified));

    // Applying the same value again does nothing. The positive signal that the operator
    // has handled those patches: a new value patched after them is delivered (reconciles
    // of one object run in order), and then exactly one more event per subscription exists.
    for name in names {
        subs.patch(name, &PatchParams::default(), &Patch::Merge(&request))
            .await
            .unwrap();
    }
    let again = json!({"metadata": {"annotations": {"hooks.webhook-operator.dev/test-requested-at": "2026-11-23T09:00:00Z"}}});
    for name in names {
        subs.patch(name, &PatchParams::default(), &Patch::Merge(&again))
            .await
            .unwrap();
    }
    for name in names {
        wait_subscription(
            &subs,
            name,
            Duration::from_secs(60),
            &format!("{name}: second test Delivered"),
            |sub| {
                let t = sub.status?.last_test?;
                (t.requested_at == "2026-11-23T09:00:00Z" && t.result == "Delivered").then_some(())
            },
        )
        .await;
    }
    let received = consumer.received();
    assert_eq!(
        received.len(),
        8,
        "each requested value is handled once: {received:?}"
    );
}

#[tokio::test]
async fn a_changed_provider_secret_is_accepted_old_and_new_during_the_overlap() {
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup("provsecret", json!({"destination": consumer_destination()})).await;
    let mut spec = specs()[1].1.clone();
    apply_subscription(&env, "atomic", spec.clone()).await;
    wait_condition(&env, "atomic", "Ready", "True", None).await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let read = |secrets: Api<Secret>| async move {
        let data = secrets
            .get("atomic-provider-signing")
            .await
            .unwrap()
            .data
            .unwrap();
        data["secret"].0.clone()
    };
    let old = read(secrets.clone()).await;

    // Atomic has no update: a new event set replaces the webhook, with a new secret.
    spec["events"] = json!(["card-dismissed"]);
    apply_subscription(&env, "atomic", spec).await;
    let new = wait_until(Duration::from_secs(60), "a new provider secret", || {
        let (secrets, old) = (secrets.clone(), old.clone());
        async move {
            let now = read(secrets).await;
            (now != old).then_some(now)
        }
    })
    .await;
    wait_condition(&env, "atomic", "Ready", "True", None).await;

    let url = format!("{}/atomic", ingress_url(&env, "orders").await);
    let http = reqwest::Client::new();
    let post_event = |secret: Vec<u8>, id: &'static str, event: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = json!({"requestId": id, "environmentId": "env1", "webhookId": "w", "isBatched": false,
                "data": {"id": id, "analyticsEvent": event, "timestamp": "2026-11-23T08:00:00Z"}})
            .to_string();
            let sig = webhook_operator::providers::sign_hex(&secret, body.as_bytes());
            http.post(&url)
                .header("content-type", "application/json")
                .header("x-atomic-signature", sig)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let post = |secret: Vec<u8>, id: &'static str| post_event(secret, id, "card-dismissed");
    // The ingress verifies with the new secret once its routes have it: probed until a
    // first event signed with it is accepted (and later delivered, once).
    wait_until(
        Duration::from_secs(30),
        "the ingress verifies the new secret",
        || {
            let probe = post_event(new.clone(), "probe", "card-dismissed");
            async move { (probe.await == 200).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        post(new.clone(), "signed-new").await,
        200,
        "the new secret verifies"
    );
    assert_eq!(
        post(old.clone(), "signed-old").await,
        200,
        "the old secret still verifies inside the window"
    );
    assert_eq!(
        post(b"neither".to_vec(), "signed-other").await,
        401,
        "anything else does not"
    );
    wait_until(
        Duration::from_secs(30),
        "the probe and both accepted events delivered",
        || {
            let n = consumer.received().len();
            async move { (n == 3).then_some(()) }
        },
    )
    .await;
}

impl OperatorProcess {
    /// SIGTERM, then waits for the process to exit (SIGKILL after 60 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the operator did not stop within 60 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a client posting in a tight loop across restarts saw.
#[derive(Default)]
struct LoopResult {
    accepted: BTreeSet<String>,
    not_found: u64,
    unavailable: u64,
    not_listening: u64,
}

/// Posts a new Atlas event to `url` until `stop`, as fast as the ingress answers.
async fn post_until(url: String, stop: Arc<std::sync::atomic::AtomicBool>) -> LoopResult {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut seen = LoopResult::default();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let id = format!("loop-{n}");
        match http.post(&url).json(&atlas_event(&id)).send().await {
            Ok(r) if r.status().is_success() => {
                seen.accepted.insert(id);
            }
            Ok(r) if r.status() == StatusCode::NOT_FOUND => seen.not_found += 1,
            Ok(r) => {
                assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert!(
                    r.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
                seen.unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                seen.not_listening += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    seen
}

/// Asks every subscription for a pass (the requested-at annotation) and waits until each
/// has echoed it: proof that each one was reconciled.
async fn every_subscription_reconciled(
    env: &TestEnv,
    operator: &OperatorProcess,
    names: &[&str],
    token: &str,
    within: Duration,
) {
    let api: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let patch =
        json!({"metadata": {"annotations": {"hooks.webhook-operator.dev/requested-at": token}}});
    for name in names {
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let subs = api.list(&ListParams::default()).await.unwrap();
        let waiting: Vec<String> = subs
            .items
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.last_handled_requested_at.as_deref())
                    != Some(token)
            })
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        if waiting.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {within:?}, these subscriptions had no pass for {token}: {waiting:?}\noperator log:\n{}",
            operator.logs.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn restarts_never_answer_404_and_reconcile_every_subscription() {
    let (env, sandbox, consumer, mut operator, dir, port) =
        setup("restart", json!({"destination": consumer_destination()})).await;
    let mut subs = specs();
    for campaign in ["camp-2", "camp-3"] {
        let mut spec = subs[0].1.clone();
        spec["atlas"]["campaignId"] = json!(campaign);
        subs.push((
            if campaign == "camp-2" {
                "atlas-2"
            } else {
                "atlas-3"
            },
            spec,
        ));
    }
    subs.push((
        "atllas",
        json!({"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}}),
    ));
    let names: Vec<&str> = subs.iter().map(|(n, _)| *n).collect();
    for (name, spec) in &subs {
        apply_subscription(&env, name, spec.clone()).await;
    }
    for name in &names {
        wait_condition(&env, name, "Ready", "True", None).await;
    }
    let url = format!("{}/atlas", ingress_url(&env, "orders").await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = tokio::spawn(post_until(url, stop.clone()));

    const RESTARTS: usize = 6;
    for round in 0..RESTARTS {
        // Let the loop get some events in before each stop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if round % 2 == 0 {
            operator.kill9();
        } else {
            let status = operator.terminate();
            assert!(
                status.success(),
                "SIGTERM: the operator exited with {status}"
            );
        }
        operator = OperatorProcess::start(&env, &sandbox, &consumer, port, dir.path());
        every_subscription_reconciled(
            &env,
            &operator,
            &names,
            &format!("restart-{round}"),
            Duration::from_secs(30),
        )
        .await;
    }
    // Deletes finish too (the finalizer's pass is not stuck behind anything).
    let api: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    for name in ["atomic", "smallest", "atlas-3"] {
        api.delete(name, &Default::default()).await.unwrap();
    }
    let remaining = names.len() - 3;
    wait_until(
        Duration::from_secs(30),
        "three subscriptions deleted",
        || {
            let api = api.clone();
            async move {
                let left = api.list(&ListParams::default()).await.ok()?.items.len();
                (left == remaining).then_some(())
            }
        },
    )
    .await;

    stop.store(true, Ordering::SeqCst);
    let seen = client.await.unwrap();
    println!(
        "restart loop: {} accepted, {} x 503 while loading, {} x not listening, {} x 404",
        seen.accepted.len(),
        seen.unavailable,
        seen.not_listening,
        seen.not_found
    );
    assert_eq!(seen.not_found, 0, "a valid hook URL was answered 404");
    assert!(!seen.accepted.is_empty());
    wait_until(
        Duration::from_secs(120),
        "every acknowledged event delivered",
        || {
            let got: BTreeSet<String> = consumer
                .received()
                .iter()
                .filter_map(|r| r.body["callId"].as_str().map(String::from))
                .collect();
            let missing = seen.accepted.difference(&got).count();
            async move { (missing == 0).then_some(()) }
        },
    )
    .await;
}

/// The `callId`s of every event the consumer received.
pub(crate) fn call_ids(consumer: &Consumer) -> BTreeSet<String> {
    consumer
        .received()
        .iter()
        .filter_map(|r| r.body["callId"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn atomic_deliveries_by_put_reach_the_consumer() {
    let (env, sandbox, consumer, _operator, _dir, _) =
        setup("put", json!({"destination": consumer_destination()})).await;
    let mut spec = specs()[1].1.clone();
    spec["atomic"]["method"] = json!("PUT");
    apply_subscription(&env, "atomic", spec).await;
    wait_condition(&env, "atomic", "Ready", "True", None).await;
    let result = control(
        &sandbox,
        reqwest::Method::POST,
        "atomic/fire",
        Some(json!({"event": "card-published", "organizationId": "org1", "environmentId": "env1"})),
    )
    .await;
    let statuses: Vec<u64> = result["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [200],
        "the ingress accepts Atomic's PUT: {result}"
    );
    assert_registered_and_sent_by_put(&sandbox, &result).await;
    wait_until(Duration::from_secs(30), "the PUT event delivered", || {
        let n = consumer.received().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    assert!(consumer.received()[0].verified);
    assert_eq!(
        consumer.received()[0].body["analyticsEvent"],
        "card-published"
    );
}

/// The subscription registered its webhook with `method: PUT` at the simulated Atomic API
/// (the simulator's default is POST), and the fired event reached the ingress by PUT.
async fn assert_registered_and_sent_by_put(sandbox: &SandboxHandle, fired: &Value) {
    let registered = control(sandbox, reqwest::Method::GET, "atomic/subscriptions", None).await;
    let methods: Vec<&str> = registered["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["webhook"]["method"].as_str())
        .collect();
    println!("Atomic webhooks registered with methods {methods:?}; fired: {fired}");
    assert_eq!(methods, ["PUT"], "{registered}");
    let sent: Vec<&str> = fired["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["method"].as_str())
        .collect();
    assert_eq!(sent, ["PUT"], "{fired}");
}

#[tokio::test]
async fn a_partly_bad_atlas_array_delivers_the_good_events_and_keeps_the_bad_one() {
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup("partial", json!({"destination": consumer_destination()})).await;
    let url = atlas_ready_url(&env).await;
    let batch = json!([
        {"callId": "good-1", "campaignId": "camp-1", "triggerName": "call_completed"},
        "not an event object",
        {"callId": "good-2", "campaignId": "camp-1", "triggerName": "call_completed"}
    ]);
    let r = send_json(&url, &batch).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["malformed"].as_u64()),
        (Some(2), Some(1)),
        "{answer}"
    );
    wait_until(
        Duration::from_secs(30),
        "both good events delivered",
        || {
            let ids = call_ids(&consumer);
            async move { (ids.len() == 2).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        call_ids(&consumer),
        BTreeSet::from(["good-1".to_string(), "good-2".to_string()])
    );
    // The bad one is counted, kept as a dead letter and announced; it is never sent.
    wait_endpoint(&env, "orders", "malformed=1, deadLettered=1", |ep| {
        let d = ep.status.as_ref().and_then(|s| s.delivery.as_ref());
        d.is_some_and(|d| d.malformed == 1 && d.dead_lettered == 1 && d.delivered == 2)
    })
    .await;
    wait_event_where(&env, "a MalformedEvents Event", |e| {
        e.reason.as_deref() == Some("MalformedEvents")
    })
    .await;
    assert_eq!(consumer.received().len(), 2);
}

#[tokio::test]
async fn every_press_of_the_atllas_test_button_reaches_the_consumer() {
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup("testbutton", json!({"destination": consumer_destination()})).await;
    apply_subscription(&env, "atllas", json!({"provider": "atllas", "events": ["call.finished", "call.completed"], "endpointRef": {"name": "orders"}})).await;
    let sub = wait_condition(&env, "atllas", "Ready", "True", None).await;
    let manual = sub.status.unwrap().manual_setup.unwrap();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let value = String::from_utf8(
        secrets
            .get(&manual.secret_name.unwrap())
            .await
            .unwrap()
            .data
            .unwrap()["value"]
            .0
            .clone(),
    )
    .unwrap();
    // The portal's Test button sends this same example payload on every press.
    let pressed = json!({
        "type": "call.completed", "timestamp": 1730179200000u64,
        "webhook": {"id": "webhook_test_outbound_456", "type": "outbound"},
        "call": {"id": "call_test_abc123def456", "status": "finished", "summary": "Example call summary from the test button."},
        "campaign": {"id": "campaign_test_xyz789", "name": "Example Campaign"}
    });
    let http = reqwest::Client::new();
    for press in 1..=3 {
        let r = http
            .post(manual.hook_url.as_deref().unwrap())
            .header(manual.header_name.as_deref().unwrap(), &value)
            .json(&pressed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "press {press}");
        wait_until(
            Duration::from_secs(30),
            &format!("press {press} delivered"),
            || {
                let n = consumer.received().len();
                async move { (n == press).then_some(()) }
            },
        )
        .await;
    }
    assert!(
        consumer
            .received()
            .iter()
            .all(|r| r.body["call"]["id"] == "call_test_abc123def456")
    );
}

#[tokio::test]
async fn a_refused_event_is_dead_lettered_and_breakers_belong_to_one_endpoint() {
    let spec = |path: &str| {
        json!({"destination": {"service": {"name": "consumer", "port": 8080, "path": path}},
            "delivery": {"retry": {"maxAttempts": 20, "initialDelay": "100ms", "maxDelay": "200ms"}}})
    };
    let (env, _sandbox, consumer, _operator, _dir, _) = setup("breaker", spec("/orders")).await;
    apply_endpoint(&env, "billing", spec("/billing")).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    let mut billing_sub = specs()[0].1.clone();
    billing_sub["endpointRef"]["name"] = json!("billing");
    billing_sub["atlas"]["campaignId"] = json!("camp-2");
    apply_subscription(&env, "billing", billing_sub).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    wait_condition(&env, "billing", "Ready", "True", None).await;
    let orders = format!("{}/atlas", ingress_url(&env, "orders").await);
    let billing = format!("{}/billing", ingress_url(&env, "billing").await);
    consumer
        .answers_by_body
        .lock()
        .unwrap()
        .extend([("poison".to_string(), 400), ("flaky".to_string(), 503)]);
    let http = reqwest::Client::new();
    let post = |url: &str, id: &str| {
        let req = http.post(url).json(&atlas_event(id));
        async move { assert!(req.send().await.unwrap().status().is_success()) }
    };

    // Fifteen events the consumer refuses (400): each is dead-lettered after one attempt,
    // and the endpoint's breaker does not open, so a good event right after goes out.
    for n in 0..15 {
        post(&orders, &format!("poison-{n}")).await;
    }
    wait_endpoint(&env, "orders", "15 refused events dead-lettered", |ep| {
        let d = ep.status.as_ref().and_then(|s| s.delivery.as_ref());
        d.is_some_and(|d| d.dead_lettered == 15)
    })
    .await;
    post(&orders, "good-orders").await;
    wait_until(
        Duration::from_secs(10),
        "orders delivers after the refusals",
        || {
            let ids = call_ids(&consumer);
            async move { ids.contains("good-orders").then_some(()) }
        },
    )
    .await;
    let ep = wait_endpoint(&env, "orders", "failed=15", |ep| {
        ep.status
            .as_ref()
            .and_then(|s| s.delivery.as_ref())
            .is_some_and(|d| d.failed == 15)
    })
    .await;
    assert_eq!(
        ep.status.unwrap().delivery.unwrap().dead_lettered,
        15,
        "one attempt each"
    );

    // Transient failures open the orders breaker; billing, behind the same origin, is not
    // held back by it.
    for n in 0..12 {
        post(&orders, &format!("flaky-{n}")).await;
    }
    wait_endpoint(&env, "orders", "orders failing (breaker open)", |ep| {
        ep.status
            .as_ref()
            .and_then(|s| s.delivery.as_ref())
            .is_some_and(|d| d.consecutive_failures >= 10)
    })
    .await;
    post(&billing, "good-billing").await;
    wait_until(
        Duration::from_secs(10),
        "billing delivers while orders' breaker is open",
        || {
            let ids = call_ids(&consumer);
            async move { ids.contains("good-billing").then_some(()) }
        },
    )
    .await;
}

/// Signature schemes are partly guesses (PROVIDERS.md): a refused signature shows on the
/// subscription, with what was checked, until a delivery verifies again.
#[tokio::test]
async fn a_signature_mismatch_is_reported_on_the_subscription() {
    let (env, sandbox, _consumer, operator, _dir, _) =
        setup("sigmis", json!({"destination": consumer_destination()})).await;
    let spec = specs().into_iter().find(|(n, _)| *n == "atomic").unwrap().1;
    apply_subscription(&env, "atomic", spec).await;
    let sub = wait_condition(&env, "atomic", "Ready", "True", None).await;
    let url = hook_url(&sub);
    let body = json!({"requestId": "r1", "environmentId": "env1", "webhookId": "w1", "isBatched": false,
        "data": {"id": "e1", "analyticsEvent": "card-published"}});
    let r = reqwest::Client::new()
        .post(&url)
        .header("x-atomic-signature", "00".repeat(32))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let sub = wait_condition(
        &env,
        "atomic",
        "SignaturesVerified",
        "False",
        Some("SignatureMismatch"),
    )
    .await;
    let st = sub.status.unwrap();
    let cond = st
        .conditions
        .iter()
        .find(|c| c.type_ == "SignaturesVerified")
        .unwrap();
    assert!(
        cond.message.contains("X-Atomic-Signature")
            && cond.message.contains("spec.atomic.signature"),
        "{}",
        cond.message
    );
    assert_eq!(st.events.unwrap().signature_mismatches, 1);

    // A delivery the provider signs verifies: the condition clears.
    let result = control(
        &sandbox,
        reqwest::Method::POST,
        "atomic/fire",
        Some(json!({"event": "card-published", "organizationId": "org1", "environmentId": "env1"})),
    )
    .await;
    assert_eq!(result["deliveries"][0]["status"], 200, "{result}");
    wait_condition(
        &env,
        "atomic",
        "SignaturesVerified",
        "True",
        Some("SignaturesVerifyAgain"),
    )
    .await;
    drop(operator);
}

/// Delivery numbers move with every event; the status says so at most once per refresh
/// period (two seconds), not once per event, and a status write does not trigger a pass
/// that writes again.
#[tokio::test]
async fn status_writes_are_batched_under_load() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup("batched", json!({"destination": consumer_destination()})).await;
    let url = atlas_ready_url(&env).await;

    let count_writes = |name: &'static str, api: Api<kube::core::DynamicObject>| {
        let stream = watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .applied_objects();
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(obj)) = stream.next().await {
                sink.lock()
                    .unwrap()
                    .insert(obj.metadata.resource_version.unwrap_or_default());
            }
        });
        (seen, task)
    };
    let dynamic = |plural: &str| {
        let ar = kube::core::ApiResource {
            group: "hooks.webhook-operator.dev".into(),
            version: "v1alpha1".into(),
            api_version: "hooks.webhook-operator.dev/v1alpha1".into(),
            kind: String::new(),
            plural: plural.into(),
        };
        Api::<kube::core::DynamicObject>::namespaced_with(env.client.clone(), &env.namespace, &ar)
    };
    let (ep_versions, ep_task) = count_writes("orders", dynamic("webhookendpoints"));
    let (sub_versions, sub_task) = count_writes("atlas", dynamic("webhooksubscriptions"));
    // The watches' first lists are in before the load starts.
    wait_until(Duration::from_secs(10), "watches listed", || {
        let n = ep_versions.lock().unwrap().len() + sub_versions.lock().unwrap().len();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    let before = (
        ep_versions.lock().unwrap().len(),
        sub_versions.lock().unwrap().len(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn(post_until(url, stop.clone()));
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.unwrap();
    // The load really moved the numbers: everything it sent was delivered and counted.
    wait_endpoint(&env, "orders", "the load delivered and counted", |ep| {
        delivered(ep) == seen.accepted.len() as u64
    })
    .await;
    assert!(
        seen.accepted.len() >= 100,
        "load too small: {}",
        seen.accepted.len()
    );
    assert!(consumer.received().len() >= seen.accepted.len());
    ep_task.abort();
    sub_task.abort();
    let ep_writes = ep_versions.lock().unwrap().len() - before.0;
    let sub_writes = sub_versions.lock().unwrap().len() - before.1;
    println!(
        "{} events in 8 s: {ep_writes} endpoint writes, {sub_writes} subscription writes",
        seen.accepted.len()
    );
    // One write per two-second period, plus the final one after the load: about five
    // each over eight seconds; twelve leaves room for a slow machine.
    assert!(ep_writes <= 12, "endpoint status written {ep_writes} times");
    assert!(
        sub_writes <= 12,
        "subscription status written {sub_writes} times"
    );
}
