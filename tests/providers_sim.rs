//! Provider clients against the in-process simulators, over real loopback sockets, plus
//! simulated deliveries into a loopback receiver checked by the inbound parsers.

#[path = "common/sdk.rs"]
mod sdk;
use sdk::{conformance_script, sdk_python_present};

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use bytes::Bytes;
use serde_json::{Value, json};
use webhook_operator::inbound::{
    InboundEvent, InboundParser, InboundRequest, Rejection, SignatureEncoding, VerificationKeys,
};
use webhook_operator::providers::{
    AtomicMethod, Credentials, DesiredSubscription, Provider, ProviderClients, ProviderError,
    ProviderParser, Scope, SyncAction, UpstreamState, install_crypto_provider,
};
use webhook_sandbox::{SandboxConfig, SandboxHandle, serve};

const ATLAS_KEY: &str = "atlas-key-Zq81";
const SMALLEST_KEY: &str = "smallest-key-Pw07";
const ATOMIC_ID: &str = "atomic-client";
const ATOMIC_SECRET: &str = "atomic-secret-Xy55";
const AGENT_X: &str = "60d0fe4f5311236168a109ca";
const AGENT_Y: &str = "60d0fe4f5311236168a109cb";

/// Every test is bounded: a hang fails the test instead of stalling CI.
async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test exceeded 30 s");
}

fn config() -> SandboxConfig {
    SandboxConfig {
        atlas_api_key: ATLAS_KEY.into(),
        smallest_api_key: SMALLEST_KEY.into(),
        atomic_client_id: ATOMIC_ID.into(),
        atomic_client_secret: ATOMIC_SECRET.into(),
        ..SandboxConfig::default()
    }
}

struct Sim {
    handle: SandboxHandle,
    clients: ProviderClients,
    http: reqwest::Client,
}

async fn sim_with(cfg: SandboxConfig) -> Sim {
    install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handle = serve(listener, cfg).await.unwrap();
    let mut ep = ProviderClients::sandbox(&handle.base_url());
    ep.request_timeout = Duration::from_secs(2);
    let clients = ProviderClients::new(ep);
    Sim {
        handle,
        clients,
        http: reqwest::Client::new(),
    }
}

async fn sim() -> Sim {
    sim_with(config()).await
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.handle.base_url())
    }
    async fn get(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
    async fn faults(&self, provider: &str, f: Value) {
        let r = self
            .http
            .put(self.url(&format!("/_control/{provider}/faults")))
            .json(&f)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
    }
    /// Management calls that are not GET or HEAD.
    async fn writes(&self, provider: &str) -> u64 {
        let v = self.get(&format!("/_control/{provider}/calls")).await;
        v["writes"].as_u64().unwrap()
    }
    async fn calls(&self, provider: &str) -> (u64, u64) {
        let v = self.get(&format!("/_control/{provider}/calls")).await;
        (
            v["management"].as_u64().unwrap(),
            v["token"].as_u64().unwrap(),
        )
    }
}

#[derive(Clone, Debug)]
struct Got {
    method: http::Method,
    headers: http::HeaderMap,
    query: Option<String>,
    body: Bytes,
}

/// A loopback receiver that records every request and answers 200.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let seen: Arc<Mutex<Vec<Got>>> = Arc::default();
    let s2 = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let seen = s2.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            seen.lock().unwrap().push(Got {
                method: parts.method,
                headers: parts.headers,
                query: parts.uri.query().map(str::to_string),
                body,
            });
            "ok"
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn parse(
    provider: Provider,
    keys: &VerificationKeys,
    g: &Got,
) -> Result<Vec<InboundEvent>, Rejection> {
    ProviderParser
        .parse(
            provider,
            keys,
            &InboundRequest {
                method: &g.method,
                headers: &g.headers,
                query: g.query.as_deref(),
                body: &g.body,
            },
        )
        .map(|parsed| parsed.events)
}

fn secret_keys(secret: &str) -> VerificationKeys {
    VerificationKeys {
        secrets: vec![secret.as_bytes().to_vec()],
        header_name: None,
        ..Default::default()
    }
}

fn assert_no_secret(e: &ProviderError, secrets: &[&str]) {
    let text = format!("{e} {e:?}");
    for s in secrets {
        assert!(!text.contains(s), "error leaks a secret: {text}");
    }
}

// ---------------------------------------------------------------- Atlas

fn atlas(hook: &str, campaign: &str, events: &[&str]) -> DesiredSubscription {
    DesiredSubscription {
        provider: Provider::Atlas,
        hook_url: hook.into(),
        events: events.iter().map(|s| s.to_string()).collect(),
        scope: Scope::Atlas {
            campaign_id: campaign.into(),
        },
        owner: "ns/atlas-sub".into(),
    }
}

async fn atlas_subs(s: &Sim) -> Vec<Value> {
    s.get("/_control/atlas/subscriptions").await["subscriptions"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn atlas_lifecycle() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atlas);
        let creds = Credentials::api_key(ATLAS_KEY);
        let d = atlas(
            "https://hooks.example/atlas/t0k3n",
            "camp1",
            &["call_started", "call_completed"],
        );

        let o = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(o.action, SyncAction::Created);
        let subs = atlas_subs(&s).await;
        assert_eq!(subs.len(), 2);
        for sub in &subs {
            // One hook URL per trigger, so a delivery is known by where it arrived.
            let trigger = sub["triggerName"].as_str().unwrap();
            assert_eq!(sub["hookUrl"], format!("{}?trigger={trigger}", d.hook_url));
            assert_eq!(sub["campaignId"], "camp1");
            assert_eq!(sub["provider"], "custom");
            assert!(sub["id"].as_str().unwrap().starts_with("sub_"));
        }
        let mut ids: Vec<&str> = subs.iter().map(|x| x["id"].as_str().unwrap()).collect();
        let mut got: Vec<&str> = o.id.split(',').collect();
        ids.sort();
        got.sort();
        assert_eq!(ids, got);
        assert!(
            !o.echo.values().any(|v| v.contains("t0k3n")),
            "the hook URL is Atlas' secret"
        );

        let before = s.calls("atlas").await.0;
        let again = c.ensure(&creds, &d, Some(&d)).await.unwrap();
        assert_eq!(again.action, SyncAction::Unchanged);
        assert_eq!(again.id, o.id);
        assert_eq!(atlas_subs(&s).await.len(), 2);
        assert_eq!(
            s.calls("atlas").await.0 - before,
            1,
            "a no-op ensure only lists"
        );

        let d2 = atlas(&d.hook_url, "camp1", &["call_completed", "message_sent"]);
        assert_eq!(
            c.ensure(&creds, &d2, Some(&d)).await.unwrap().action,
            SyncAction::Updated
        );
        let mut triggers: Vec<String> = atlas_subs(&s)
            .await
            .iter()
            .map(|x| x["triggerName"].as_str().unwrap().to_string())
            .collect();
        triggers.sort();
        assert_eq!(triggers, ["call_completed", "message_sent"]);

        let d3 = atlas(&d.hook_url, "camp2", &["message_sent"]);
        assert_eq!(
            c.ensure(&creds, &d3, Some(&d2)).await.unwrap().action,
            SyncAction::Replaced
        );
        let subs = atlas_subs(&s).await;
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0]["campaignId"], "camp2");

        // Drift: dropped behind our back, observed missing, recreated.
        let (st, _) = s
            .post("/_control/atlas/drop", json!({"id": subs[0]["id"]}))
            .await;
        assert_eq!(st, 204);
        assert!(c.observe(&creds, &d3).await.unwrap().is_none());
        assert_eq!(
            c.ensure(&creds, &d3, Some(&d3)).await.unwrap().action,
            SyncAction::Recreated
        );

        c.delete(&creds, &d3).await.unwrap();
        assert!(atlas_subs(&s).await.is_empty());
        // Already gone: still a success.
        c.delete(&creds, &d3).await.unwrap();
    })
    .await;
}

/// Deleting sends one unsubscribe per registered trigger: the form Atlas lists (today the
/// per-trigger URL), not both URL forms blindly.
#[tokio::test]
async fn atlas_delete_unsubscribes_only_what_is_registered() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atlas);
        let creds = Credentials::api_key(ATLAS_KEY);
        let d = atlas(
            "https://hooks.example/atlas/t0k3n",
            "camp1",
            &["call_started", "call_completed"],
        );
        c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(atlas_subs(&s).await.len(), 2);
        let before = s.writes("atlas").await;
        c.delete(&creds, &d).await.unwrap();
        let unsubscribes = s.writes("atlas").await - before;
        println!("Atlas delete of 2 triggers: {unsubscribes} unsubscribe calls");
        assert!(atlas_subs(&s).await.is_empty());
        assert_eq!(unsubscribes, 2, "one unsubscribe per registered trigger");
    })
    .await;
}

#[tokio::test]
async fn atlas_adopts_existing_subscription() {
    bounded(async {
        let s = sim().await;
        let d = atlas("https://hooks.example/atlas/a", "c9", &["call_completed"]);
        let r = s
            .http
            .post(s.url("/atlas/v1/api/events-gateway/trigger/subscribe"))
            .header("api-key", ATLAS_KEY)
            .json(&json!({"hookUrl": d.hook_url, "campaignId": "c9", "triggerName": "call_completed", "provider": "custom"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let o = s
            .clients
            .get(Provider::Atlas)
            .ensure(&Credentials::api_key(ATLAS_KEY), &d, None)
            .await
            .unwrap();
        assert_eq!(o.action, SyncAction::Adopted);
        assert_eq!(o.id, id);
        assert_eq!(atlas_subs(&s).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn atlas_errors() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atlas);
        let d = atlas("https://hooks.example/atlas/e", "c", &["call_started"]);
        let e = c
            .ensure(&Credentials::api_key("wrong-key-123"), &d, None)
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Unauthorized(_)), "{e:?}");
        assert_no_secret(&e, &["wrong-key-123", ATLAS_KEY]);

        let creds = Credentials::api_key(ATLAS_KEY);
        s.faults("atlas", json!({"rateLimitRatio": 1.0, "retryAfterSecs": 7}))
            .await;
        let e = c.ensure(&creds, &d, None).await.unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(e.reason(), "RateLimited");

        s.faults("atlas", json!({"errorRatio": 1.0, "errorStatus": 503}))
            .await;
        let e = c.observe(&creds, &d).await.unwrap_err();
        assert!(matches!(e, ProviderError::Unavailable(_)), "{e:?}");
        assert_no_secret(&e, &[ATLAS_KEY]);

        s.faults("atlas", json!({})).await;
        let bad = atlas("not a url", "c", &["call_started"]);
        let e = c.ensure(&creds, &bad, None).await.unwrap_err();
        assert!(
            matches!(e, ProviderError::Invalid(ref m) if m.contains("hookUrl")),
            "{e:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn atlas_hang_times_out_as_unavailable() {
    bounded(async {
        let s = sim().await;
        let mut ep = ProviderClients::sandbox(&s.handle.base_url());
        ep.request_timeout = Duration::from_millis(300);
        let clients = ProviderClients::new(ep);
        s.faults("atlas", json!({"hang": true})).await;
        let d = atlas("https://hooks.example/atlas/h", "c", &["call_started"]);
        let e = clients
            .get(Provider::Atlas)
            .observe(&Credentials::api_key(ATLAS_KEY), &d)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "UpstreamUnavailable");
        assert!(e.to_string().contains("timed out"), "{e}");
    })
    .await;
}

#[tokio::test]
async fn atlas_fire_reaches_receiver_and_parses() {
    bounded(async {
        let s = sim().await;
        let (base, seen) = receiver().await;
        let d = atlas(
            &format!("{base}/hooks/atlas-abc"),
            "camp7",
            &["call_completed"],
        );
        s.clients
            .get(Provider::Atlas)
            .ensure(&Credentials::api_key(ATLAS_KEY), &d, None)
            .await
            .unwrap();
        let (st, v) = s
            .post(
                "/_control/atlas/fire",
                json!({"event": "call_completed", "campaignId": "camp7"}),
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(v["deliveries"][0]["status"], 200);
        // Another campaign's event does not reach this hook.
        let (_, v) = s
            .post(
                "/_control/atlas/fire",
                json!({"event": "call_completed", "campaignId": "other"}),
            )
            .await;
        assert_eq!(v["deliveries"].as_array().unwrap().len(), 0);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].method, http::Method::POST);
        assert_eq!(got[0].headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&got[0].body).unwrap();
        assert!(body.is_array());
        let evs = parse(Provider::Atlas, &VerificationKeys::default(), &got[0]).unwrap();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].event_type, "call_completed");
        let call_id = body[0]["callId"].as_str().unwrap();
        assert_eq!(evs[0].dedupe_key, format!("call:{call_id}:call_completed"));
    })
    .await;
}

// ---------------------------------------------------------------- Atomic

fn atomic(hook: &str, events: &[&str], method: AtomicMethod) -> DesiredSubscription {
    DesiredSubscription {
        provider: Provider::Atomic,
        hook_url: hook.into(),
        events: events.iter().map(|s| s.to_string()).collect(),
        scope: Scope::Atomic {
            organization_id: "org1".into(),
            environment_id: "envA".into(),
            card_template_id: None,
            action_flow_config_id: None,
            method,
        },
        owner: "ns/atomic-sub".into(),
    }
}

fn atomic_creds() -> Credentials {
    Credentials::client(ATOMIC_ID, ATOMIC_SECRET)
}

async fn atomic_hooks(s: &Sim) -> Vec<Value> {
    s.get("/_control/atomic/subscriptions").await["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["webhook"].clone())
        .collect()
}

#[tokio::test]
async fn atomic_lifecycle() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atomic);
        let creds = atomic_creds();
        let d = atomic(
            "https://hooks.example/atomic/1",
            &["card-published", "card-completed"],
            AtomicMethod::Post,
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(o.action, SyncAction::Created);
        let hooks = atomic_hooks(&s).await;
        assert_eq!(hooks.len(), 1);
        let h = &hooks[0];
        assert_eq!(h["id"], o.id.as_str());
        assert_eq!(h["url"], d.hook_url);
        assert_eq!(h["types"], json!(["card-completed", "card-published"]));
        assert_eq!(h["enabled"], true);
        assert_eq!(h["headers"]["X-Webhook-Operator-Owner"], "ns/atomic-sub");
        assert_eq!(o.signing_secret.as_deref(), h["secret"].as_str());
        assert!(!format!("{o:?}").contains(h["secret"].as_str().unwrap()));

        let again = c.ensure(&creds, &d, Some(&d)).await.unwrap();
        assert_eq!(again.action, SyncAction::Unchanged);
        assert_eq!(atomic_hooks(&s).await.len(), 1);

        // No update endpoint: a new webhook replaces the old, which is disabled.
        let d2 = atomic(&d.hook_url, &["card-dismissed"], AtomicMethod::Post);
        let o2 = c.ensure(&creds, &d2, Some(&d)).await.unwrap();
        assert_eq!(o2.action, SyncAction::Replaced);
        assert_ne!(o2.id, o.id);
        let hooks = atomic_hooks(&s).await;
        assert_eq!(hooks.len(), 2);
        let old = hooks.iter().find(|h| h["id"] == o.id.as_str()).unwrap();
        let new = hooks.iter().find(|h| h["id"] == o2.id.as_str()).unwrap();
        assert_eq!(old["enabled"], false);
        assert_eq!(new["enabled"], true);
        assert_eq!(new["types"], json!(["card-dismissed"]));

        c.delete(&creds, &d2).await.unwrap();
        assert!(atomic_hooks(&s).await.iter().all(|h| h["enabled"] == false));
        let after = c.observe(&creds, &d2).await.unwrap().unwrap();
        assert!(matches!(after.state, UpstreamState::Disabled { .. }));
    })
    .await;
}

#[tokio::test]
async fn atomic_disabled_upstream_is_reported_then_recreated() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atomic);
        let creds = atomic_creds();
        let d = atomic(
            "https://hooks.example/atomic/2",
            &["card-published"],
            AtomicMethod::Put,
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        let (st, _) = s
            .post("/_control/atomic/disable", json!({"id": o.id}))
            .await;
        assert_eq!(st, 204);
        let seen = c.observe(&creds, &d).await.unwrap().unwrap();
        assert!(
            matches!(seen.state, UpstreamState::Disabled { .. }),
            "{seen:?}"
        );
        let r = c.ensure(&creds, &d, Some(&d)).await.unwrap();
        assert_eq!(r.action, SyncAction::Recreated);
        assert_ne!(r.id, o.id);
        assert_eq!(r.state, UpstreamState::Enabled);
        let enabled = atomic_hooks(&s)
            .await
            .iter()
            .filter(|h| h["enabled"] == true)
            .count();
        assert_eq!(enabled, 1);
    })
    .await;
}

#[tokio::test]
async fn atomic_adopts_identical_webhook() {
    bounded(async {
        let s = sim().await;
        let d = atomic(
            "https://hooks.example/atomic/3",
            &["card-completed"],
            AtomicMethod::Post,
        );
        let id =
            atomic_raw_create(&s, json!({"types": ["card-completed"], "url": d.hook_url})).await;
        let o = s
            .clients
            .get(Provider::Atomic)
            .ensure(&atomic_creds(), &d, None)
            .await
            .unwrap();
        assert_eq!(o.action, SyncAction::Adopted);
        assert_eq!(o.id, id);
        assert_eq!(atomic_hooks(&s).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn atomic_token_is_cached_and_refreshed() {
    bounded(async {
        let s = sim_with(SandboxConfig {
            atomic_token_ttl: Duration::from_secs(2),
            ..config()
        })
        .await;
        let c = s.clients.get(Provider::Atomic);
        let creds = atomic_creds();
        let d = atomic(
            "https://hooks.example/atomic/4",
            &["card-published"],
            AtomicMethod::Post,
        );
        c.ensure(&creds, &d, None).await.unwrap();
        c.observe(&creds, &d).await.unwrap();
        c.observe(&creds, &d).await.unwrap();
        // ensure = list + create, then two lists: four API calls on one token, one write.
        assert_eq!(s.calls("atomic").await, (4, 1));
        assert_eq!(s.writes("atomic").await, 1);
        // A 2 s token is refreshed half-way through its life.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        c.observe(&creds, &d).await.unwrap();
        assert_eq!(s.calls("atomic").await.1, 2);
        c.observe(&creds, &d).await.unwrap();
        assert_eq!(s.calls("atomic").await.1, 2);
    })
    .await;
}

#[tokio::test]
async fn a_wrong_atomic_secret_does_not_borrow_a_cached_token() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atomic);
        let d = atomic(
            "https://hooks.example/atomic/5",
            &["card-published"],
            AtomicMethod::Post,
        );
        c.ensure(&atomic_creds(), &d, None).await.unwrap();
        // Same client id, wrong secret: the token endpoint must be asked, and refuse.
        let wrong = Credentials::client(ATOMIC_ID, "not-the-secret");
        let err = c.observe(&wrong, &d).await.unwrap_err();
        assert_eq!(err.reason(), "Unauthorized", "{err}");
    })
    .await;
}

#[tokio::test]
async fn atomic_revoked_token_is_renewed_once() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atomic);
        let creds = atomic_creds();
        let d = atomic(
            "https://hooks.example/atomic/6",
            &["card-published"],
            AtomicMethod::Post,
        );
        c.ensure(&creds, &d, None).await.unwrap();
        let r = s
            .http
            .post(s.url("/_control/atomic/revoke-tokens"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
        let (calls, tokens) = s.calls("atomic").await;
        assert!(c.observe(&creds, &d).await.unwrap().is_some());
        // The cached token got a 401: one new token, the list retried once.
        assert_eq!(s.calls("atomic").await, (calls + 2, tokens + 1));
    })
    .await;
}

#[tokio::test]
async fn atomic_errors() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atomic);
        let d = atomic(
            "https://hooks.example/atomic/5",
            &["card-published"],
            AtomicMethod::Post,
        );
        let e = c
            .ensure(&Credentials::client(ATOMIC_ID, "bad-secret-987"), &d, None)
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Unauthorized(_)), "{e:?}");
        assert_no_secret(&e, &["bad-secret-987", ATOMIC_SECRET]);

        let e = c
            .ensure(&Credentials::api_key("x"), &d, None)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");

        s.faults(
            "atomic",
            json!({"rateLimitRatio": 1.0, "retryAfterSecs": 3}),
        )
        .await;
        let e = c.ensure(&atomic_creds(), &d, None).await.unwrap_err();
        assert_eq!(
            e,
            ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(3))
            }
        );

        s.faults("atomic", json!({"errorRatio": 1.0})).await;
        let e = c.ensure(&atomic_creds(), &d, None).await.unwrap_err();
        assert!(matches!(e, ProviderError::Unavailable(_)), "{e:?}");
        assert_no_secret(&e, &[ATOMIC_SECRET]);
    })
    .await;
}

#[tokio::test]
async fn atomic_fire_batched_put_is_signed_and_parses() {
    bounded(async {
        let s = sim().await;
        let (base, seen) = receiver().await;
        let d = atomic(
            &format!("{base}/hooks/atomic"),
            &["card-completed"],
            AtomicMethod::Put,
        );
        let o = s
            .clients
            .get(Provider::Atomic)
            .ensure(&atomic_creds(), &d, None)
            .await
            .unwrap();
        let (_, v) = s
            .post(
                "/_control/atomic/fire",
                json!({"event": "card-completed", "organizationId": "org1", "environmentId": "envA", "batched": true}),
            )
            .await;
        assert_eq!(v["deliveries"][0]["status"], 200);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].method, http::Method::PUT);
        assert_eq!(got[0].headers["x-webhook-operator-owner"], "ns/atomic-sub");
        let secret = o.signing_secret.unwrap();
        let evs = parse(Provider::Atomic, &secret_keys(&secret), &got[0]).unwrap();
        assert_eq!(evs.len(), 2);
        assert!(evs.iter().all(|e| e.event_type == "card-completed"));
        assert_ne!(evs[0].dedupe_key, evs[1].dedupe_key);
        assert!(parse(Provider::Atomic, &secret_keys("not-the-secret"), &got[0]).is_err());
    })
    .await;
}

// ---------------------------------------------------------------- Smallest

fn smallest(hook: &str, agents: &[&str], events: &[&str], owner: &str) -> DesiredSubscription {
    DesiredSubscription {
        provider: Provider::Smallest,
        hook_url: hook.into(),
        events: events.iter().map(|s| s.to_string()).collect(),
        scope: Scope::Smallest {
            agent_ids: agents.iter().map(|s| s.to_string()).collect(),
        },
        owner: owner.into(),
    }
}

async fn smallest_hooks(s: &Sim) -> Vec<Value> {
    s.get("/_control/smallest/subscriptions").await["webhooks"]
        .as_array()
        .unwrap()
        .clone()
}

fn pairs(hook: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = hook["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["agentId"]["_id"].as_str().unwrap().to_string(),
                x["eventType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn smallest_lifecycle() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Smallest);
        let creds = Credentials::api_key(SMALLEST_KEY);
        let d = smallest(
            "https://hooks.example/sm/1",
            &[AGENT_X, AGENT_Y],
            &["post-conversation", "pre-conversation"],
            "ns/a",
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(o.action, SyncAction::Created);
        let hooks = smallest_hooks(&s).await;
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0]["_id"], o.id.as_str());
        assert_eq!(hooks[0]["url"], d.hook_url);
        assert_eq!(hooks[0]["status"], "enabled");
        assert!(hooks[0]["description"].as_str().unwrap().ends_with("ns/a"));
        assert_eq!(pairs(&hooks[0]).len(), 4);
        assert!(o.signing_secret.as_deref().is_some_and(|x| x.len() >= 32));

        let before = s.calls("smallest").await.0;
        assert_eq!(
            c.ensure(&creds, &d, Some(&d)).await.unwrap().action,
            SyncAction::Unchanged
        );
        assert_eq!(
            s.calls("smallest").await.0 - before,
            1,
            "a no-op ensure only lists: the list carries the secret (as the SDK documents)"
        );
        assert_eq!(smallest_hooks(&s).await.len(), 1);

        let d2 = smallest(&d.hook_url, &[AGENT_X], &["analytics-completed"], "ns/a");
        assert_eq!(
            c.ensure(&creds, &d2, Some(&d)).await.unwrap().action,
            SyncAction::Replaced
        );
        assert_eq!(
            pairs(&smallest_hooks(&s).await[0]),
            [(AGENT_X.to_string(), "analytics-completed".to_string())]
        );

        c.delete(&creds, &d2).await.unwrap();
        assert!(smallest_hooks(&s).await.is_empty());
        c.delete(&creds, &d2).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn smallest_two_owners_share_an_agent() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Smallest);
        let creds = Credentials::api_key(SMALLEST_KEY);
        let a = smallest(
            "https://hooks.example/sm/a",
            &[AGENT_X],
            &["post-conversation"],
            "ns/a",
        );
        let b = smallest(
            "https://hooks.example/sm/b",
            &[AGENT_X, AGENT_Y],
            &["pre-conversation"],
            "ns/b",
        );
        c.ensure(&creds, &a, None).await.unwrap();
        c.ensure(&creds, &b, None).await.unwrap();
        let a2 = smallest(
            &a.hook_url,
            &[AGENT_X],
            &["analytics-completed", "post-conversation"],
            "ns/a",
        );
        assert_eq!(
            c.ensure(&creds, &a2, Some(&a)).await.unwrap().action,
            SyncAction::Updated
        );

        let by_url = |hooks: &[Value], url: &str| hooks.iter().find(|h| h["url"] == url).cloned();
        let hooks = smallest_hooks(&s).await;
        let b_pairs = vec![
            (AGENT_X.to_string(), "pre-conversation".to_string()),
            (AGENT_Y.to_string(), "pre-conversation".to_string()),
        ];
        assert_eq!(pairs(&by_url(&hooks, &b.hook_url).unwrap()), b_pairs);
        assert_eq!(pairs(&by_url(&hooks, &a.hook_url).unwrap()).len(), 2);

        // Deleting A goes through the agent-wide DELETE; B's subscriptions must survive it.
        c.delete(&creds, &a2).await.unwrap();
        let hooks = smallest_hooks(&s).await;
        assert!(by_url(&hooks, &a.hook_url).is_none());
        assert_eq!(pairs(&by_url(&hooks, &b.hook_url).unwrap()), b_pairs);

        // And events still flow to B for agent X.
        let (_, v) = s
            .post(
                "/_control/smallest/fire",
                json!({"event": "pre-conversation", "agentId": AGENT_X}),
            )
            .await;
        assert_eq!(v["deliveries"][0]["url"], b.hook_url.as_str());
    })
    .await;
}

#[tokio::test]
async fn smallest_adopts_and_reports_disabled() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Smallest);
        let creds = Credentials::api_key(SMALLEST_KEY);
        let d = smallest(
            "https://hooks.example/sm/adopt",
            &[AGENT_X],
            &["post-conversation"],
            "ns/z",
        );
        let r = s
            .http
            .post(s.url("/smallest/atoms/v1/webhook"))
            .bearer_auth(SMALLEST_KEY)
            .json(&json!({"endpoint": d.hook_url, "description": "made by hand", "events": [{"agentId": AGENT_X, "eventType": "post-conversation"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let id = r.json::<Value>().await.unwrap()["data"]
            .as_str()
            .unwrap()
            .to_string();
        let o = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(o.action, SyncAction::Adopted);
        assert_eq!(o.id, id);
        let hooks = smallest_hooks(&s).await;
        assert_eq!(hooks.len(), 1);
        assert!(
            hooks[0]["description"]
                .as_str()
                .unwrap()
                .ends_with("ns/z")
        );

        let (st, _) = s
            .post("/_control/smallest/disable", json!({"id": id}))
            .await;
        assert_eq!(st, 204);
        let seen = c.observe(&creds, &d).await.unwrap().unwrap();
        assert!(matches!(seen.state, UpstreamState::Disabled { .. }));
    })
    .await;
}

#[tokio::test]
async fn smallest_errors() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Smallest);
        let d = smallest(
            "https://hooks.example/sm/e",
            &[AGENT_X],
            &["post-conversation"],
            "ns/e",
        );
        let e = c
            .ensure(&Credentials::api_key("nope-key-4242"), &d, None)
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Unauthorized(_)), "{e:?}");
        assert_no_secret(&e, &["nope-key-4242", SMALLEST_KEY]);

        let creds = Credentials::api_key(SMALLEST_KEY);
        s.faults(
            "smallest",
            json!({"rateLimitRatio": 1.0, "retryAfterSecs": 11}),
        )
        .await;
        let e = c.ensure(&creds, &d, None).await.unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(11)));
        s.faults("smallest", json!({"errorRatio": 1.0, "errorStatus": 500}))
            .await;
        let e = c.delete(&creds, &d).await.unwrap_err();
        assert_eq!(e.reason(), "UpstreamUnavailable");
        assert_no_secret(&e, &[SMALLEST_KEY]);
        let r = s
            .http
            .delete(s.url("/_control/smallest/faults"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 204);
        assert!(c.ensure(&creds, &d, None).await.is_ok());
    })
    .await;
}

#[tokio::test]
async fn smallest_fire_is_signed_and_parses() {
    bounded(async {
        let s = sim().await;
        let (base, seen) = receiver().await;
        let d = smallest(
            &format!("{base}/hooks/sm"),
            &[AGENT_Y],
            &["post-conversation"],
            "ns/f",
        );
        let o = s
            .clients
            .get(Provider::Smallest)
            .ensure(&Credentials::api_key(SMALLEST_KEY), &d, None)
            .await
            .unwrap();
        let (_, v) = s
            .post(
                "/_control/smallest/fire",
                json!({"event": "post-conversation", "agentId": AGENT_Y}),
            )
            .await;
        assert_eq!(v["deliveries"][0]["status"], 200);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        let body: Value = serde_json::from_slice(&got[0].body).unwrap();
        assert_eq!(body["event"], format!("{AGENT_Y}.post-conversation"));
        assert_eq!(body["url"], d.hook_url);
        assert!(body["metadata"]["callData"].is_object());
        let keys = secret_keys(o.signing_secret.as_deref().unwrap());
        let evs = parse(Provider::Smallest, &keys, &got[0]).unwrap();
        assert_eq!(evs[0].event_type, "post-conversation");
        assert_eq!(evs[0].dedupe_key, body["id"].as_str().unwrap());
        assert_eq!(evs[0].payload, got[0].body);
    })
    .await;
}

// ---------------------------------------------------------------- Atllas

#[tokio::test]
async fn atllas_is_manual_and_deliveries_verify() {
    bounded(async {
        // Unroutable endpoints: Atllas must not touch the network.
        let mut ep = ProviderClients::sandbox("http://127.0.0.1:1");
        ep.connect_timeout = Duration::from_millis(100);
        let clients = ProviderClients::new(ep);
        let d = DesiredSubscription {
            provider: Provider::Atllas,
            hook_url: "https://hooks.example/atllas".into(),
            events: vec!["call.finished".into()],
            scope: Scope::Atllas {
                header_name: "X-Atllas-Token".into(),
            },
            owner: "ns/m".into(),
        };
        let o = clients
            .get(Provider::Atllas)
            .ensure(&Credentials::default(), &d, None)
            .await
            .unwrap();
        assert_eq!(o.id, "manual");
        assert_eq!(o.state, UpstreamState::Manual);
        clients
            .get(Provider::Atllas)
            .delete(&Credentials::default(), &d)
            .await
            .unwrap();

        let s = sim().await;
        let (base, seen) = receiver().await;
        for method in ["POST", "GET"] {
            let (_, v) = s
                .post(
                    "/_control/atllas/fire",
                    json!({"url": format!("{base}/hooks/atllas"), "method": method, "headerName": "X-Atllas-Token", "headerValue": "v4lue"}),
                )
                .await;
            assert_eq!(v["deliveries"][0]["status"], 200);
        }
        let keys = VerificationKeys {
            secrets: vec![b"v4lue".to_vec()],
            header_name: Some("X-Atllas-Token".into()),
            ..Default::default()
        };
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].method, http::Method::GET);
        for g in &got {
            let evs = parse(Provider::Atllas, &keys, g).unwrap();
            assert_eq!(evs[0].event_type, "call.finished");
        }
        let wrong = VerificationKeys {
            secrets: vec![b"other".to_vec()],
            header_name: Some("X-Atllas-Token".into()),
            ..Default::default()
        };
        assert!(parse(Provider::Atllas, &wrong, &got[0]).is_err());
    })
    .await;
}

// ------------------------------------------- fail-safe assumptions (issue 16)

/// An Atomic access token from the simulator's token endpoint (client credentials).
async fn atomic_token(s: &Sim) -> String {
    let tok: Value = s
        .http
        .post(s.url("/atomic/org1/auth/token"))
        .basic_auth(ATOMIC_ID, Some(ATOMIC_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tok["access_token"].as_str().unwrap().to_string()
}

/// Creates an Atomic webhook straight through the simulator's API (someone else's).
async fn atomic_raw_create(s: &Sim, body: Value) -> String {
    let r = s
        .http
        .post(s.url("/atomic/org1/v1/envA/webhook"))
        .bearer_auth(atomic_token(s).await)
        .header("user-agent", "test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    r.json::<Value>().await.unwrap()["data"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn atomic_without_assumed_echo_resyncs_create_nothing() {
    bounded(async {
        let s = sim_with(SandboxConfig {
            atomic_echo_assumed_fields: false,
            ..config()
        })
        .await;
        let c = s.clients.get(Provider::Atomic);
        let creds = atomic_creds();
        let mut d = atomic(
            "https://hooks.example/atomic/noecho",
            &["card-completed"],
            AtomicMethod::Put,
        );
        if let Scope::Atomic {
            card_template_id,
            action_flow_config_id,
            ..
        } = &mut d.scope
        {
            *card_template_id = Some("tmpl-1".into());
            *action_flow_config_id = Some("flow-1".into());
        }
        let first = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(first.action, SyncAction::Created);
        for _ in 0..3 {
            let again = c.ensure(&creds, &d, Some(&d)).await.unwrap();
            assert_eq!(again.action, SyncAction::Unchanged);
            assert_eq!(again.id, first.id);
        }
        let hooks = atomic_hooks(&s).await;
        assert_eq!(hooks.len(), 1, "resyncs created webhooks: {hooks:?}");
        assert_eq!(hooks[0]["enabled"], true);
        let seen = c.observe(&creds, &d).await.unwrap().unwrap();
        assert_eq!(seen.state, UpstreamState::Enabled);
        assert!(!seen.echo.contains_key("enabled"), "{:?}", seen.echo);

        // A change in a field the provider does not echo still replaces (we know what
        // we sent last time).
        let mut post = d.clone();
        if let Scope::Atomic { method, .. } = &mut post.scope {
            *method = AtomicMethod::Post;
        }
        let moved = c.ensure(&creds, &post, Some(&d)).await.unwrap();
        assert_eq!(moved.action, SyncAction::Replaced);
        let hooks = atomic_hooks(&s).await;
        assert_eq!(hooks.len(), 2);
        let old = hooks.iter().find(|h| h["id"] == first.id.as_str()).unwrap();
        assert_eq!(old["enabled"], false);
        let again = c.ensure(&creds, &post, Some(&post)).await.unwrap();
        assert_eq!(again.action, SyncAction::Unchanged);
        assert_eq!(atomic_hooks(&s).await.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn atomic_does_not_adopt_a_webhook_whose_enabled_is_unknown() {
    bounded(async {
        let s = sim_with(SandboxConfig {
            atomic_echo_assumed_fields: false,
            ..config()
        })
        .await;
        let d = atomic(
            "https://hooks.example/atomic/foreign",
            &["card-completed"],
            AtomicMethod::Post,
        );
        // Someone else's twin, disabled: the list does not say so.
        let foreign =
            atomic_raw_create(&s, json!({"types": ["card-completed"], "url": d.hook_url})).await;
        let (st, _) = s
            .post("/_control/atomic/disable", json!({"id": foreign}))
            .await;
        assert_eq!(st, 204);
        let o = s
            .clients
            .get(Provider::Atomic)
            .ensure(&atomic_creds(), &d, None)
            .await
            .unwrap();
        assert_eq!(o.action, SyncAction::Created);
        assert_ne!(o.id, foreign);
        let hooks = atomic_hooks(&s).await;
        let ours = hooks.iter().find(|h| h["id"] == o.id.as_str()).unwrap();
        assert_eq!(ours["enabled"], true);
    })
    .await;
}

#[tokio::test]
async fn atlas_unlistable_is_cannot_observe_not_recreate() {
    bounded(async {
        let s = sim().await;
        let mut ep = ProviderClients::sandbox(&s.handle.base_url());
        ep.atlas_list_path = "/events-gateway/trigger/not-the-real-path".into();
        let clients = ProviderClients::new(ep);
        let c = clients.get(Provider::Atlas);
        let creds = Credentials::api_key(ATLAS_KEY);
        let d = atlas(
            "https://hooks.example/atlas/unlistable",
            "camp-1",
            &["call_started", "call_completed"],
        );
        // A new spec is applied with the subscribe calls, even unobserved.
        let first = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(first.action, SyncAction::Created);
        let before = atlas_subs(&s).await;
        assert_eq!(before.len(), 2);
        // Once applied, a refused list is "unknown": reported, never re-created.
        for _ in 0..3 {
            match c.observe(&creds, &d).await {
                Err(e @ ProviderError::CannotObserve(_)) => {
                    assert_eq!(e.reason(), "CannotObserve");
                    assert!(e.to_string().contains("--atlas-list-path"), "{e}");
                }
                other => panic!("observe must report CannotObserve, got {other:?}"),
            }
            match c.ensure(&creds, &d, Some(&d)).await {
                Err(ProviderError::CannotObserve(_)) => {}
                other => panic!("ensure must not re-create on a refused list, got {other:?}"),
            }
        }
        assert_eq!(atlas_subs(&s).await, before);
        // The default path still lists (the simulator serves it).
        let seen = s
            .clients
            .get(Provider::Atlas)
            .observe(&creds, &d)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen.state, UpstreamState::Enabled);
    })
    .await;
}

#[tokio::test]
async fn atlas_ids_holding_the_hook_url_are_redacted() {
    bounded(async {
        let s = sim_with(SandboxConfig {
            atlas_ids_are_hook_urls: true,
            ..config()
        })
        .await;
        let c = s.clients.get(Provider::Atlas);
        let creds = Credentials::api_key(ATLAS_KEY);
        let token = "tok5f1d0c9a7e3b24680aceb";
        let d = atlas(
            &format!("https://hooks.example/hooks/{token}/atlas-sub"),
            "camp-2",
            &["call_started", "message_sent"],
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        let seen = c.observe(&creds, &d).await.unwrap().unwrap();
        // The simulator did use the hook URL as the id.
        assert!(
            atlas_subs(&s)
                .await
                .iter()
                .all(|x| x["id"].as_str().unwrap().contains(token))
        );
        for obs in [&o, &seen] {
            let shown = format!("{} {:?} {obs:?}", obs.id, obs.echo);
            assert!(!shown.contains(token), "hook token leaked: {shown}");
            assert!(!shown.contains("hooks.example"), "hook URL leaked: {shown}");
            assert_eq!(obs.id.split(',').count(), 2);
        }
        assert_eq!(o.id, seen.id);
        // Plain ids are left as they are.
        let plain = sim().await;
        let p = plain
            .clients
            .get(Provider::Atlas)
            .ensure(&creds, &d, None)
            .await
            .unwrap();
        assert!(p.id.split(',').all(|id| id.starts_with("sub_")), "{}", p.id);
    })
    .await;
}

#[tokio::test]
async fn atlas_event_without_trigger_is_known_by_the_url_it_arrived_on() {
    bounded(async {
        let s = sim_with(SandboxConfig {
            atlas_events_name_trigger: false,
            ..config()
        })
        .await;
        let (base, seen) = receiver().await;
        let d = atlas(
            &format!("{base}/hooks/atlas-notrigger"),
            "camp8",
            &["call_started", "message_received"],
        );
        s.clients
            .get(Provider::Atlas)
            .ensure(&Credentials::api_key(ATLAS_KEY), &d, None)
            .await
            .unwrap();
        for event in ["call_started", "message_received"] {
            let (st, v) = s
                .post(
                    "/_control/atlas/fire",
                    json!({"event": event, "campaignId": "camp8"}),
                )
                .await;
            assert_eq!(st, 200);
            assert_eq!(v["deliveries"][0]["status"], 200, "{v}");
        }
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        let mut types = Vec::new();
        for g in &got {
            let body: Value = serde_json::from_slice(&g.body).unwrap();
            assert!(body[0].get("triggerName").is_none(), "{body}");
            let evs = parse(Provider::Atlas, &VerificationKeys::default(), g).unwrap();
            types.push(evs[0].event_type.clone());
        }
        types.sort();
        assert_eq!(types, ["call_started", "message_received"]);
    })
    .await;
}

// ------------------------------------------- conformance with the official Smallest SDK

#[tokio::test]
async fn smallest_official_sdk_conforms() {
    let s = sim().await;
    let python = sdk_python_present(" (it installs the pinned smallestai SDK)");
    let script = conformance_script("smallest_sdk.py");
    let base = s.url("/smallest/atoms/v1");
    let run = tokio::process::Command::new(&python)
        .args([script.as_str(), &base, SMALLEST_KEY])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the SDK run exceeded 60 s")
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the SDK disagrees with the simulator:\n{text}"
    );
    assert!(text.contains("conformant"), "{text}");
    // Every step ran (a step that is skipped would not print).
    assert_eq!(
        text.matches("\nok   ").count() + usize::from(text.starts_with("ok   ")),
        7,
        "{text}"
    );
}

#[tokio::test]
async fn atomic_signature_header_and_encoding_are_configurable() {
    bounded(async {
        // An account whose deliveries are signed differently from the operator's guess.
        let s = sim_with(SandboxConfig {
            atomic_signature: (
                "X-Signature-256".into(),
                webhook_sandbox::wire::SignatureEncoding::Base64,
            ),
            ..config()
        })
        .await;
        let (base, seen) = receiver().await;
        let d = atomic(
            &format!("{base}/hooks/atomic-sig"),
            &["card-completed"],
            AtomicMethod::Post,
        );
        let o = s
            .clients
            .get(Provider::Atomic)
            .ensure(&atomic_creds(), &d, None)
            .await
            .unwrap();
        let (_, v) = s
            .post(
                "/_control/atomic/fire",
                json!({"event": "card-completed", "organizationId": "org1", "environmentId": "envA"}),
            )
            .await;
        assert_eq!(v["deliveries"][0]["status"], 200);
        let got = seen.lock().unwrap().clone();
        let secret = o.signing_secret.unwrap();
        // The default guess refuses it...
        assert_eq!(
            parse(Provider::Atomic, &secret_keys(&secret), &got[0]),
            Err(Rejection::Unauthorized("missing signature"))
        );
        // ...the configured scheme accepts it, and still refuses another secret.
        let keys = |secret: &str| VerificationKeys {
            secrets: vec![secret.as_bytes().to_vec()],
            header_name: Some("X-Signature-256".into()),
            signature_encoding: SignatureEncoding::Base64,
        };
        let evs = parse(Provider::Atomic, &keys(&secret), &got[0]).unwrap();
        assert_eq!(evs[0].event_type, "card-completed");
        assert_eq!(
            parse(Provider::Atomic, &keys("not-the-secret"), &got[0]),
            Err(Rejection::Unauthorized("bad signature"))
        );
    })
    .await;
}

#[tokio::test]
async fn smallest_reads_the_secret_by_id_when_the_list_lacks_it() {
    bounded(async {
        let s = sim_with(SandboxConfig {
            smallest_secret_in_list: false,
            ..config()
        })
        .await;
        let c = s.clients.get(Provider::Smallest);
        let creds = Credentials::api_key(SMALLEST_KEY);
        let d = smallest(
            "https://hooks.example/smallest/nolistsecret",
            &[AGENT_X],
            &["post-conversation"],
            "ns/a",
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        let before = s.calls("smallest").await.0;
        let again = c.ensure(&creds, &d, Some(&d)).await.unwrap();
        assert_eq!(again.action, SyncAction::Unchanged);
        assert_eq!(again.signing_secret, o.signing_secret);
        assert!(again.signing_secret.is_some());
        assert_eq!(
            s.calls("smallest").await.0 - before,
            2,
            "list, then get by id"
        );
    })
    .await;
}

/// The simulators' wire types are their own (`crates/sandbox/src/wire.rs`, written from
/// PROVIDERS.md), so an answer a simulator writes must read back through the client's
/// type field for field: a field renamed, dropped or retyped on either side fails here
/// (and in the lifecycle tests above, which go through HTTP).
#[test]
fn simulator_answers_read_back_field_for_field_through_the_clients_types() {
    use webhook_sandbox::wire;
    fn read_back<Sim: serde::Serialize, Client: serde::Serialize + serde::de::DeserializeOwned>(
        what: &str,
        sim: Sim,
    ) {
        let written = serde_json::to_value(&sim).unwrap();
        let client: Client = serde_json::from_value(written.clone())
            .unwrap_or_else(|e| panic!("{what}: the client cannot read the simulator: {e}"));
        assert_eq!(
            serde_json::to_value(&client).unwrap(),
            written,
            "{what}: the client's type and the simulator's disagree"
        );
    }
    read_back::<_, webhook_operator::providers::atlas::TriggerSubscription>(
        "Atlas list element",
        wire::atlas::TriggerSubscription {
            id: "sub_1".into(),
            hook_url: "https://hooks.example/h/t/calls".into(),
            campaign_id: "c1".into(),
            trigger_name: "call_completed".into(),
            provider: wire::atlas::PROVIDER_CUSTOM.into(),
        },
    );
    read_back::<_, webhook_operator::providers::atomic::Webhook>(
        "Atomic webhook",
        wire::atomic::Webhook {
            id: "w1".into(),
            types: vec!["card-published".into()],
            url: "https://hooks.example/h/t/cards".into(),
            headers: [("x-a".to_string(), "b".to_string())].into(),
            secret: Some("s3cret".into()),
            created: "2026-01-01T00:00:00Z".into(),
            updated: "2026-01-01T00:00:00Z".into(),
            card_template_id: Some("tpl".into()),
            action_flow_config_id: Some("flow".into()),
            method: Some(wire::atomic::Method::Put),
            enabled: Some(false),
        },
    );
    let agent = wire::smallest::IdRef::Populated(wire::smallest::Populated {
        id: AGENT_X.into(),
        name: Some("agent".into()),
        description: Some("d".into()),
    });
    read_back::<_, webhook_operator::providers::smallest::Webhook>(
        "Smallest webhook",
        wire::smallest::Webhook {
            id: "65f0c0ffee0000000000beef".into(),
            url: "https://hooks.example/h/t/agents".into(),
            description: "managed".into(),
            status: "enabled".into(),
            organization_id: Some("org".into()),
            created_by: Some("me".into()),
            subscriptions: vec![wire::smallest::Subscription {
                id: "s1".into(),
                webhook_id: wire::smallest::IdRef::Id("65f0c0ffee0000000000beef".into()),
                agent_id: agent,
                event_type: "post-conversation".into(),
                created_at: Some("2026-01-01T00:00:00Z".into()),
                updated_at: Some("2026-01-01T00:00:00Z".into()),
            }],
            decrypted_secret_key: Some("key".into()),
            created_at: Some("2026-01-01T00:00:00Z".into()),
            updated_at: Some("2026-01-01T00:00:00Z".into()),
        },
    );
}

/// `answerDelayMs` delays the answer, not the work: the registration is listed (the
/// provider may send to it) while the caller still waits for the answer.
#[tokio::test]
async fn answer_delay_comes_after_the_registration_is_stored() {
    bounded(async {
        let s = Arc::new(sim().await);
        s.faults("atlas", json!({"answerDelayMs": 1500})).await;
        let d = atlas(
            "https://hooks.example/atlas/late",
            "late",
            &["call_started"],
        );
        let started = std::time::Instant::now();
        let call = tokio::spawn({
            let s = s.clone();
            async move {
                s.clients
                    .get(Provider::Atlas)
                    .ensure(&Credentials::api_key(ATLAS_KEY), &d, None)
                    .await
                    .map(|_| started.elapsed())
            }
        });
        let listed = loop {
            let v = s.get("/_control/atlas/subscriptions").await;
            if v["subscriptions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["campaignId"] == "late"))
            {
                break started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(!call.is_finished(), "listed before the answer came");
        let answered = call.await.unwrap().unwrap();
        assert!(
            answered >= Duration::from_millis(1500) && listed < answered,
            "listed after {listed:?}, answered after {answered:?}"
        );
    })
    .await;
}

/// The read-only fetch behind the ingress's fetch on a failed signature: Smallest's
/// secret after its dashboard regenerated it, from one list call (the list carries it)
/// and with no write; nothing for a URL Smallest does not know.
#[tokio::test]
async fn smallest_signing_secrets_follow_a_rotation_at_the_provider_read_only() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Smallest);
        let creds = Credentials::api_key(SMALLEST_KEY);
        let d = smallest(
            "https://hooks.example/sm/rot",
            &[AGENT_X],
            &["post-conversation"],
            "ns/a",
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        let first = o.signing_secret.clone().unwrap();
        let (status, _) = s
            .post("/_control/smallest/rotate", json!({"id": o.id}))
            .await;
        assert_eq!(status, 204);
        let (calls, writes) = (s.calls("smallest").await.0, s.writes("smallest").await);
        let now = c.signing_secrets(&creds, &d).await.unwrap();
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], first, "the rotated secret");
        assert_eq!(s.calls("smallest").await.0 - calls, 1, "one list call");
        assert_eq!(s.writes("smallest").await, writes, "no write");
        let other = smallest("https://hooks.example/sm/none", &[AGENT_X], &[], "ns/b");
        assert!(c.signing_secrets(&creds, &other).await.unwrap().is_empty());
        // Atlas issues no secret: nothing to fetch, no call.
        let atlas_client = s.clients.get(Provider::Atlas);
        let before = s.calls("atlas").await.0;
        assert!(
            atlas_client
                .signing_secrets(
                    &Credentials::api_key(ATLAS_KEY),
                    &atlas("https://h/a", "c", &["call_completed"])
                )
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.calls("atlas").await.0, before);
    })
    .await;
}

/// Atomic replaced for new types: the replacement's secret, whichever types are asked
/// for (a replica's cache may still show the old spec); the replaced, disabled webhook's
/// secret is not returned.
#[tokio::test]
async fn atomic_signing_secrets_list_the_replacement_first_whatever_its_types() {
    bounded(async {
        let s = sim().await;
        let c = s.clients.get(Provider::Atomic);
        let creds = atomic_creds();
        let d = atomic(
            "https://hooks.example/atomic/sec",
            &["card-published"],
            AtomicMethod::Post,
        );
        let o = c.ensure(&creds, &d, None).await.unwrap();
        assert_eq!(
            c.signing_secrets(&creds, &d).await.unwrap(),
            vec![o.signing_secret.clone().unwrap()]
        );
        let d2 = atomic(
            &d.hook_url,
            &["card-published", "card-completed"],
            AtomicMethod::Post,
        );
        let o2 = c.ensure(&creds, &d2, Some(&d)).await.unwrap();
        assert_eq!(o2.action, SyncAction::Replaced);
        // Asked with the OLD spec's types (a replica whose cache lags): still the new one.
        for asked in [&d, &d2] {
            assert_eq!(
                c.signing_secrets(&creds, asked).await.unwrap(),
                vec![o2.signing_secret.clone().unwrap()],
                "the replaced webhook is disabled: only the replacement's secret"
            );
        }
    })
    .await;
}
