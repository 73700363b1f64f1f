//! Issue 44 item 2: an event the provider signs with its new secret is accepted from the
//! first one, on both replicas. Two `webhook-operator run` processes on JetStream (the
//! scale-out cluster), the provider simulators, and events signed with the provider's
//! CURRENT secret fired every 100 ms at BOTH ingresses, with no retries (Smallest never
//! retries): every answer must be 200 and every event delivered. Plus the attacker's side:
//! a flood of bad signatures makes at most the bounded number of provider calls, and
//! every one of them is answered 401.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use webhook_operator::api::WebhookSubscription;
use webhook_operator::providers::sign_hex;

use crate::fixtures::{apply_subscription, control, create_secret, upstream_for};
use crate::scaleout::{Cluster, Replica};
use crate::support::wait_until;

const AGENT: &str = "65f0c0ffee00000000000001";
const SMALLEST_KEY: &str = "smallest-test-key";
/// How long events are fired after the provider starts signing with the new secret.
const FIRING: Duration = Duration::from_secs(4);
/// The bound the ingress sets on fetches, per subscription, replica and minute.
const MAX_FETCHES: u64 = 6;

fn smallest_spec(resync: &str) -> Value {
    json!({"provider": "smallest", "credentialsRef": {"name": "smallest-creds"},
           "events": ["post-conversation"], "smallest": {"agentIds": [AGENT]},
           "endpointRef": {"name": "orders"}, "resyncInterval": resync})
}

fn atomic_spec(events: &[&str]) -> Value {
    json!({"provider": "atomic", "credentialsRef": {"name": "atomic-creds"}, "events": events,
           "atomic": {"organizationId": "org1", "environmentId": "env1"},
           "endpointRef": {"name": "orders"}})
}

/// Two replicas, the endpoint `orders`, and the subscriptions `subs`, all Ready.
async fn cluster(prefix: &str, subs: &[(&str, Value)]) -> (Cluster, [Replica; 2], String) {
    let c = Cluster::new(prefix).await;
    c.setup_objects(&[]).await;
    create_secret(&c.env, "smallest-creds", json!({"apiKey": SMALLEST_KEY})).await;
    create_secret(
        &c.env,
        "atomic-creds",
        json!({"clientId": "atomic-client", "clientSecret": "atomic-secret"}),
    )
    .await;
    for (name, spec) in subs {
        apply_subscription(&c.env, name, spec.clone()).await;
    }
    let replicas = [c.start_replica(0), c.start_replica(1)];
    for (name, _) in subs {
        c.wait_ready(name, Duration::from_secs(90)).await;
    }
    wait_until(Duration::from_secs(30), "a Lease holder", || c.holder()).await;
    let path = c.hook_path().await;
    (c, replicas, path)
}

/// The URL the provider calls for `name` (replica 0's, as published).
async fn published_url(c: &Cluster, name: &str) -> String {
    let subs: Api<WebhookSubscription> = Api::namespaced(c.env.client.clone(), &c.env.namespace);
    crate::fixtures::hook_url(&subs.get(name).await.unwrap())
}

/// Smallest's webhooks at `url`: (id, its current secret), read like the provider's own
/// SDK would (GET /webhook?webhookId=, which carries `decryptedSecretKey`).
async fn smallest_webhook(c: &Cluster, url: &str) -> Option<(String, String)> {
    let found = upstream_for(&c.sandbox, "smallest", url).await;
    let id = found.first()?.get("_id")?.as_str()?.to_string();
    let v: Value = reqwest::Client::new()
        .get(format!(
            "{}/smallest/atoms/v1/webhook",
            c.sandbox.base_url()
        ))
        .query(&[("webhookId", &id)])
        .bearer_auth(SMALLEST_KEY)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let secret = v.pointer("/data/decryptedSecretKey")?.as_str()?.to_string();
    Some((id, secret))
}

/// Atomic's enabled webhooks at `url`: (id, secret).
async fn atomic_webhooks(c: &Cluster, url: &str) -> Vec<(String, String)> {
    upstream_for(&c.sandbox, "atomic", url)
        .await
        .into_iter()
        .filter(|w| w.pointer("/webhook/enabled") != Some(&Value::Bool(false)))
        .filter_map(|w| {
            Some((
                w.pointer("/webhook/id")?.as_str()?.to_string(),
                w.pointer("/webhook/secret")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// One event as the provider sends it, with a fresh id (also as `callId`, which the
/// consumer records), signed with `secret`: (signature header, signature, body, id).
fn smallest_event(secret: &str) -> (&'static str, String, Vec<u8>, String) {
    let id = format!("call_{:016x}", rand::random::<u64>());
    let body = serde_json::to_vec(&json!({
        "url": "x", "description": "key race", "event": format!("{AGENT}.post-conversation"),
        "id": id, "callId": id,
        "metadata": {"agentId": AGENT, "eventType": "post-conversation", "conversationType": "outbound", "callId": id},
    }))
    .unwrap();
    ("x-signature", sign_hex(secret.as_bytes(), &body), body, id)
}

fn atomic_event(secret: &str, webhook: &str) -> (&'static str, String, Vec<u8>, String) {
    let id = format!("call_{:016x}", rand::random::<u64>());
    let body = serde_json::to_vec(&json!({
        "requestId": id, "environmentId": "env1", "webhookId": webhook, "isBatched": false,
        "data": {"id": id, "callId": id, "analyticsEvent": "card-published", "endUserId": "u1",
                 "timestamp": "2026-01-01T00:00:00Z"},
    }))
    .unwrap();
    (
        "x-atomic-signature",
        sign_hex(secret.as_bytes(), &body),
        body,
        id,
    )
}

/// Set-up, not the case under test: waits (bounded) until both replicas route the
/// subscription and verify `make`'s events, signed with the secret in force BEFORE the
/// change. A follower that does not route it yet (404) is item 1 of issue 44, not this case.
async fn wait_both_verify(
    replicas: &[Replica; 2],
    path: &str,
    make: impl Fn() -> (&'static str, String, Vec<u8>, String),
) {
    let http = reqwest::Client::new();
    for r in replicas {
        wait_until(Duration::from_secs(30), "both replicas verify", || {
            let (header, signature, body, _) = make();
            let req = http
                .post(r.hook(path))
                .header("content-type", "application/json")
                .header(header, signature)
                .body(body)
                .send();
            async move { (req.await.ok()?.status() == 200).then_some(()) }
        })
        .await;
    }
}

/// What each replica answered.
#[derive(Default, Debug)]
struct Tally {
    statuses: BTreeMap<String, usize>,
    acked: HashSet<String>,
}

impl Tally {
    fn refused(&self) -> usize {
        self.statuses
            .iter()
            .filter(|(s, _)| s.as_str() != "200")
            .map(|(_, n)| n)
            .sum()
    }
}

/// Every 100 ms for [`FIRING`], one event from `make` at each replica, concurrently; no
/// retries.
async fn fire_at_both(
    replicas: &[Replica; 2],
    path: &str,
    make: impl Fn() -> (&'static str, String, Vec<u8>, String),
) -> [Tally; 2] {
    let http = reqwest::Client::new();
    let mut tallies = [Tally::default(), Tally::default()];
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while start.elapsed() < FIRING {
        tick.tick().await;
        let posts = replicas.iter().map(|r| {
            let (header, signature, body, id) = make();
            let req = http
                .post(r.hook(path))
                .header("content-type", "application/json")
                .header(header, signature)
                .body(body)
                .timeout(Duration::from_secs(15))
                .send();
            async move { (req.await.map(|r| r.status().as_u16()), id) }
        });
        let answers = futures::future::join_all(posts).await;
        for (tally, (status, id)) in tallies.iter_mut().zip(answers) {
            let key = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("error: {e}"),
            };
            if key == "200" {
                tally.acked.insert(id);
            }
            *tally.statuses.entry(key).or_default() += 1;
        }
    }
    tallies
}

/// Asserts every answer was 200 and every event delivered; prints the figures.
async fn judge(case: &str, c: &Cluster, replicas: &[Replica; 2], tallies: [Tally; 2]) {
    let leader = c.holder().await.unwrap_or_default();
    for (r, t) in replicas.iter().zip(&tallies) {
        let role = if r.name == leader {
            "leader"
        } else {
            "follower"
        };
        eprintln!(
            "key_race {case}: {} ({role}): {} events, answers {:?}, 401s {}",
            r.name,
            t.statuses.values().sum::<usize>(),
            t.statuses,
            t.statuses.get("401").copied().unwrap_or(0)
        );
    }
    for (r, t) in replicas.iter().zip(&tallies) {
        assert_eq!(
            t.refused(),
            0,
            "{case}: {} refused events signed with the provider's current secret: {:?}",
            r.name,
            t.statuses
        );
    }
    let acked: HashSet<String> = tallies.iter().flat_map(|t| t.acked.clone()).collect();
    c.wait_delivered(&acked, Duration::from_secs(60)).await;
    eprintln!(
        "key_race {case}: {} accepted, {} delivered, 0 lost",
        acked.len(),
        acked.len()
    );
}

/// (a) Smallest's dashboard regenerates the secret: the provider signs with the new one
/// at once, and the operator learns of it only on a failed signature (its resync is 5 m).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_race_smallest_secret_rotated_at_the_provider_is_accepted_at_once() {
    let (c, replicas, path) = cluster("keyrot", &[("smallest", smallest_spec("5m"))]).await;
    let url = published_url(&c, "smallest").await;
    let (id, old) = smallest_webhook(&c, &url).await.expect("registered");
    let sub_path = format!("{path}/smallest");
    wait_both_verify(&replicas, &sub_path, || smallest_event(&old)).await;
    control(
        &c.sandbox,
        reqwest::Method::POST,
        "smallest/rotate",
        Some(json!({"id": id})),
    )
    .await;
    let (_, new) = smallest_webhook(&c, &url).await.expect("still registered");
    assert_ne!(old, new, "the simulator rotated the secret");
    let tallies = fire_at_both(&replicas, &format!("{path}/smallest"), || {
        smallest_event(&new)
    })
    .await;
    judge("smallest rotation", &c, &replicas, tallies).await;
}

/// (b) The webhook is deleted at Smallest; the operator recreates it in drift repair, with
/// a secret Smallest issues in that answer. Fired from the moment it exists upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_race_smallest_webhook_recreated_in_drift_repair_is_accepted_at_once() {
    let (c, replicas, path) = cluster("keydrift", &[("smallest", smallest_spec("30s"))]).await;
    let url = published_url(&c, "smallest").await;
    let (id, old) = smallest_webhook(&c, &url).await.expect("registered");
    wait_both_verify(&replicas, &format!("{path}/smallest"), || {
        smallest_event(&old)
    })
    .await;
    control(
        &c.sandbox,
        reqwest::Method::POST,
        "smallest/drop",
        Some(json!({"id": id})),
    )
    .await;
    let (new_id, new) = wait_until(Duration::from_secs(60), "the recreated webhook", || {
        let (c, url) = (&c, &url);
        async move { smallest_webhook(c, url).await }
    })
    .await;
    assert_ne!(id, new_id, "a new webhook");
    assert_ne!(old, new, "with a new secret");
    let tallies = fire_at_both(&replicas, &format!("{path}/smallest"), || {
        smallest_event(&new)
    })
    .await;
    judge("smallest drift repair", &c, &replicas, tallies).await;
}

/// (c) `spec.events` changes: Atomic has no update, so the operator creates a new webhook
/// (a new secret in the create response) and disables the old one. Fired from the moment
/// the new one exists upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_race_atomic_subscription_replaced_for_new_events_is_accepted_at_once() {
    let (c, replicas, path) =
        cluster("keyatomic", &[("atomic", atomic_spec(&["card-published"]))]).await;
    let url = published_url(&c, "atomic").await;
    let before = atomic_webhooks(&c, &url).await;
    assert_eq!(before.len(), 1, "one webhook upstream");
    wait_both_verify(&replicas, &format!("{path}/atomic"), || {
        atomic_event(&before[0].1, &before[0].0)
    })
    .await;
    let subs: Api<WebhookSubscription> = Api::namespaced(c.env.client.clone(), &c.env.namespace);
    subs.patch(
        "atomic",
        &PatchParams::apply("test"),
        &Patch::Merge(json!({"spec": {"events": ["card-published", "card-completed"]}})),
    )
    .await
    .unwrap();
    let (new_id, new) = wait_until(Duration::from_secs(60), "the replacement webhook", || {
        let (c, url, old) = (&c, &url, &before[0].0);
        async move {
            atomic_webhooks(c, url)
                .await
                .into_iter()
                .find(|(id, _)| id != old)
        }
    })
    .await;
    assert_ne!(new, before[0].1, "the replacement has a new secret");
    let tallies = fire_at_both(&replicas, &format!("{path}/atomic"), || {
        atomic_event(&new, &new_id)
    })
    .await;
    judge("atomic replacement", &c, &replicas, tallies).await;
}

/// The attacker's side: 200 bad signatures (100 at each replica, 10 at a time) make at
/// most [`MAX_FETCHES`] fetches per replica (one list call each at Smallest), and all get
/// 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_race_bad_signatures_cause_bounded_fetches_and_all_get_401() {
    let (c, replicas, path) = cluster("keyflood", &[("smallest", smallest_spec("5m"))]).await;
    let calls = |c: &Cluster| {
        let base = c.sandbox.base_url();
        async move {
            let v: Value = reqwest::get(format!("{base}/_control/smallest/calls"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["management"].as_u64().unwrap()
        }
    };
    let url = published_url(&c, "smallest").await;
    let (_, secret) = smallest_webhook(&c, &url).await.expect("registered");
    wait_both_verify(&replicas, &format!("{path}/smallest"), || {
        smallest_event(&secret)
    })
    .await;
    let before = calls(&c).await;
    let http = reqwest::Client::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let started = Instant::now();
    for _ in 0..10 {
        let posts = (0..20).map(|i| {
            let (header, _, body, _) = smallest_event("attacker's guess");
            let bad = "00".repeat(32);
            http.post(replicas[i % 2].hook(&format!("{path}/smallest")))
                .header("content-type", "application/json")
                .header(header, bad)
                .body(body)
                .timeout(Duration::from_secs(15))
                .send()
        });
        for r in futures::future::join_all(posts).await {
            *statuses.entry(r.unwrap().status().as_u16()).or_default() += 1;
        }
    }
    let took = started.elapsed();
    let made = calls(&c).await - before;
    eprintln!(
        "key_race flood: 200 bad signatures in {took:?}: answers {statuses:?}, {made} provider calls (bound {})",
        2 * MAX_FETCHES
    );
    assert_eq!(statuses.get(&401), Some(&200), "{statuses:?}");
    assert!(
        made <= 2 * MAX_FETCHES,
        "{made} provider calls for 200 bad signatures"
    );
    assert!(made >= 2, "each replica fetched at least once: {made}");
}
