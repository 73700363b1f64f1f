//! Issue 44 item 1: a hook URL works on every replica from the moment the provider can use
//! it. Two `webhook-operator run` replicas on JetStream (as in `scaleout`); a new
//! WebhookSubscription is created again and again; the test polls the Atlas simulator's
//! registrations every few milliseconds and, the moment the registration appears, fires
//! one event at EACH replica (the Lease holder and the follower), once, with no retry (a
//! provider that never retries). Atlas does not sign, so a refusal can only be about the
//! route. Expected: no 404, no 503, every acknowledged event delivered.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::scaleout::{Cluster, atlas_body, new_id, post};
use crate::support::wait_until;

/// What the replicas answered, by role and status.
#[derive(Default, Debug)]
struct Answers {
    by_role: BTreeMap<(&'static str, String), usize>,
    acked: HashSet<String>,
    /// From the registration's appearance to the last answer of the round, the slowest.
    slowest_round: Duration,
}

impl Answers {
    fn count(&self, status: &str) -> usize {
        self.by_role
            .iter()
            .filter(|((_, s), _)| s == status)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The hook URL of the Atlas registration for `campaign`, as soon as the simulator holds
/// it (polled every 2 ms).
async fn registered(c: &Cluster, http: &reqwest::Client, campaign: &str) -> String {
    registered_other_than(c, http, campaign, &HashSet::new()).await
}

/// The same, for a registration whose hook URL is none of `before`.
async fn registered_other_than(
    c: &Cluster,
    http: &reqwest::Client,
    campaign: &str,
    before: &HashSet<String>,
) -> String {
    let url = format!("{}/_control/atlas/subscriptions", c.sandbox.base_url());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        let found = v["subscriptions"].as_array().and_then(|subs| {
            subs.iter()
                .filter(|s| s["campaignId"] == campaign)
                .filter_map(|s| s["hookUrl"].as_str())
                .find(|u| !before.contains(*u))
                .map(str::to_string)
        });
        if let Some(hook) = found {
            return hook;
        }
        assert!(
            Instant::now() < deadline,
            "campaign {campaign} never registered"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn set_answer_delay(c: &Cluster, ms: u64) {
    crate::fixtures::control(
        &c.sandbox,
        reqwest::Method::PUT,
        "atlas/faults",
        Some(json!({"answerDelayMs": ms})),
    )
    .await;
}

async fn apply_endpoint(c: &Cluster, name: &str) {
    crate::fixtures::apply_endpoint(
        &c.env,
        name,
        json!({"destination": {"service": {"name": "consumer", "port": 8080}}}),
    )
    .await;
}

/// `rounds` new subscriptions (each with a new endpoint unless `shared_endpoint`), each
/// fired at both replicas the moment its registration appears.
async fn race(prefix: &str, rounds: usize, answer_delay_ms: u64, shared_endpoint: bool) {
    let c = Cluster::new(prefix).await;
    crate::fixtures::create_secret(&c.env, "atlas-creds", json!({"apiKey": "atlas-test-key"}))
        .await;
    let replicas = [c.start_replica(0), c.start_replica(1)];
    let leader = wait_until(Duration::from_secs(60), "a Lease holder", || c.holder()).await;
    let li = replicas
        .iter()
        .position(|r| r.name == leader)
        .expect("holder is one of ours");
    let fi = 1 - li;
    c.wait_following(&replicas[fi].name).await;
    set_answer_delay(&c, answer_delay_ms).await;
    if shared_endpoint {
        apply_endpoint(&c, "shared").await;
        // The endpoint is Ready (its ingress URL is published) before any subscription.
        let eps: kube::Api<webhook_operator::api::WebhookEndpoint> =
            kube::Api::namespaced(c.env.client.clone(), &c.env.namespace);
        wait_until(Duration::from_secs(60), "the shared endpoint Ready", || {
            let eps = eps.clone();
            async move {
                eps.get("shared")
                    .await
                    .ok()?
                    .status?
                    .ingress_url
                    .map(|_| ())
            }
        })
        .await;
    }
    let http = reqwest::Client::new();
    let mut answers = Answers::default();
    for i in 0..rounds {
        let (ep, sub, campaign) = (
            if shared_endpoint {
                "shared".to_string()
            } else {
                format!("ep-{i}")
            },
            format!("sub-{i}"),
            format!("camp-{i}"),
        );
        if !shared_endpoint {
            apply_endpoint(&c, &ep).await;
        }
        crate::fixtures::apply_subscription(
            &c.env,
            &sub,
            json!({"provider": "atlas", "credentialsRef": {"name": "atlas-creds"},
                   "events": ["call_completed"], "atlas": {"campaignId": campaign},
                   "endpointRef": {"name": ep}}),
        )
        .await;
        let hook = registered(&c, &http, &campaign).await;
        let seen = Instant::now();
        let path = url::Url::parse(&hook).unwrap().path().to_string();
        // One event at each replica, at once, never retried.
        let shots = [(li, "leader"), (fi, "follower")].map(|(i, role)| {
            let (http, url, id) = (http.clone(), replicas[i].hook(&path), new_id());
            let body = atlas_body(&campaign, std::slice::from_ref(&id));
            async move { (role, id, post(&http, &url, body).await) }
        });
        for (role, id, answer) in futures::future::join_all(shots).await {
            let status = match answer {
                Ok(s) => s.to_string(),
                Err(e) => format!("error: {e}"),
            };
            if status == "200" {
                answers.acked.insert(id);
            } else {
                eprintln!("routes_race: round {i}: the {role} answered {status}");
            }
            *answers.by_role.entry((role, status)).or_default() += 1;
        }
        answers.slowest_round = answers.slowest_round.max(seen.elapsed());
    }
    c.wait_delivered(&answers.acked, Duration::from_secs(90))
        .await;
    let fired = 2 * rounds;
    eprintln!(
        "routes_race {prefix}: {rounds} new subscriptions{}, answer delay {answer_delay_ms} ms; {fired} events fired the moment each was registered: answers {:?}; 404: {}, 503: {}; {} acknowledged, all delivered",
        if shared_endpoint {
            " on an endpoint already Ready"
        } else {
            " each with a new endpoint"
        },
        answers.by_role,
        answers.count("404"),
        answers.count("503"),
        answers.acked.len(),
    );
    assert_eq!(answers.count("404"), 0, "{:?}", answers.by_role);
    assert_eq!(answers.count("503"), 0, "{:?}", answers.by_role);
    assert_eq!(answers.acked.len(), fired, "{:?}", answers.by_role);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_race_new_endpoint_and_subscription_on_both_replicas() {
    race("race-new", 20, 0, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_race_provider_answering_after_100ms() {
    race("race-slow", 20, 100, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_race_new_subscription_on_a_ready_endpoint() {
    race("race-sub", 10, 100, true).await;
}

/// The hook URL of the `provider` (Smallest or Atomic) webhook registered for
/// subscription `sub` once the provider would send to it (for Smallest: with an agent
/// subscription attached), polled every 2 ms.
async fn registered_signed(
    c: &Cluster,
    http: &reqwest::Client,
    provider: &str,
    sub: &str,
) -> String {
    let url = format!("{}/_control/{provider}/subscriptions", c.sandbox.base_url());
    let suffix = format!("/{sub}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
        let found = v["webhooks"].as_array().and_then(|hooks| {
            hooks.iter().find_map(|h| {
                let (url, ready) = match provider {
                    "smallest" => (
                        h["url"].as_str(),
                        h["subscriptions"].as_array().is_some_and(|s| !s.is_empty()),
                    ),
                    _ => (h["webhook"]["url"].as_str(), true),
                };
                url.filter(|u| ready && u.ends_with(&suffix))
                    .map(str::to_string)
            })
        });
        if let Some(hook) = found {
            return hook;
        }
        assert!(Instant::now() < deadline, "{sub} never registered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The same race for a provider that signs (its secret issued in the registration's
/// answer): the simulator signs each event with the secret it holds and sends it to one
/// replica (`baseUrl`). The route comes with no key (the secret does not exist yet); the
/// ingress's fetch of the current secret on a signature that does not verify (issue 44
/// item 2) accepts it: without that fetch every one of these is a 401.
async fn signed_race(prefix: &str, provider: &str, rounds: usize, answer_delay_ms: u64) {
    let c = Cluster::new(prefix).await;
    crate::fixtures::credentials(&c.env).await;
    let replicas = [c.start_replica(0), c.start_replica(1)];
    let leader = wait_until(Duration::from_secs(60), "a Lease holder", || c.holder()).await;
    let li = replicas
        .iter()
        .position(|r| r.name == leader)
        .expect("holder is one of ours");
    let fi = 1 - li;
    c.wait_following(&replicas[fi].name).await;
    crate::fixtures::control(
        &c.sandbox,
        reqwest::Method::PUT,
        &format!("{provider}/faults"),
        Some(json!({"answerDelayMs": answer_delay_ms})),
    )
    .await;
    let http = reqwest::Client::new();
    let mut by_role: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    let mut acked = 0u64;
    for i in 0..rounds {
        let (ep, sub) = (format!("ep-{i}"), format!("sub-{i}"));
        apply_endpoint(&c, &ep).await;
        let agent = format!("65f0c0ffee{i:014x}");
        let (spec, fire) = match provider {
            "smallest" => (
                json!({"provider": "smallest", "credentialsRef": {"name": "smallest-creds"},
                       "events": ["post-conversation"], "smallest": {"agentIds": [agent]},
                       "endpointRef": {"name": ep}}),
                json!({"event": "post-conversation", "agentId": agent}),
            ),
            _ => (
                json!({"provider": "atomic", "credentialsRef": {"name": "atomic-creds"},
                       "events": ["card-published"],
                       "atomic": {"organizationId": format!("org{i}"), "environmentId": format!("env{i}")},
                       "endpointRef": {"name": ep}}),
                json!({"event": "card-published", "organizationId": format!("org{i}"),
                       "environmentId": format!("env{i}")}),
            ),
        };
        crate::fixtures::apply_subscription(&c.env, &sub, spec).await;
        registered_signed(&c, &http, provider, &sub).await;
        let shots = [(li, "leader"), (fi, "follower")].map(|(r, role)| {
            let mut body = fire.clone();
            body["baseUrl"] = format!("http://127.0.0.1:{}", replicas[r].ingress_port()).into();
            let (http, url) = (
                http.clone(),
                format!("{}/_control/{provider}/fire", c.sandbox.base_url()),
            );
            async move {
                let v: Value = http
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                (role, v["deliveries"][0]["status"].as_u64().unwrap_or(0))
            }
        });
        for (role, status) in futures::future::join_all(shots).await {
            if status == 200 {
                acked += 1;
            } else {
                eprintln!("routes_race: {provider} round {i}: the {role} answered {status}");
            }
            *by_role.entry((role, status.to_string())).or_default() += 1;
        }
    }
    let count = |s: &str| -> usize {
        by_role
            .iter()
            .filter(|((_, x), _)| x == s)
            .map(|(_, n)| n)
            .sum()
    };
    eprintln!(
        "routes_race {prefix}: {rounds} new {provider} subscriptions each with a new endpoint, answer delay {answer_delay_ms} ms; {} events fired the moment each was registered: answers {by_role:?}; 404: {}, 503: {}, 401: {}",
        2 * rounds,
        count("404"),
        count("503"),
        count("401"),
    );
    let received = c.received.clone();
    wait_until(
        Duration::from_secs(90),
        "every acknowledged event delivered",
        || {
            let posts = received.lock().unwrap().posts;
            async move { (posts >= acked).then_some(()) }
        },
    )
    .await;
    assert_eq!(count("404"), 0, "{by_role:?}");
    assert_eq!(count("503"), 0, "{by_role:?}");
    assert_eq!(count("401"), 0, "{by_role:?}");
    assert_eq!(acked as usize, 2 * rounds, "{by_role:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_race_smallest_provider_answering_after_100ms() {
    signed_race("race-smallest", "smallest", 20, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_race_atomic_provider_answering_after_100ms() {
    signed_race("race-atomic", "atomic", 20, 100).await;
}

/// The hook URL changes (the endpoint's ingress token is rotated by deleting
/// `<endpoint>-ingress`): the new URL is registered at Atlas only once both replicas route
/// it. Fired at both the moment Atlas holds the new URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_race_token_rotation_on_both_replicas() {
    let rotations = 5;
    let c = Cluster::new("race-rot").await;
    crate::fixtures::create_secret(&c.env, "atlas-creds", json!({"apiKey": "atlas-test-key"}))
        .await;
    let replicas = [c.start_replica(0), c.start_replica(1)];
    let leader = wait_until(Duration::from_secs(60), "a Lease holder", || c.holder()).await;
    let li = replicas
        .iter()
        .position(|r| r.name == leader)
        .expect("holder is one of ours");
    let fi = 1 - li;
    c.wait_following(&replicas[fi].name).await;
    set_answer_delay(&c, 100).await;
    apply_endpoint(&c, "rotating").await;
    crate::fixtures::apply_subscription(
        &c.env,
        "rot",
        json!({"provider": "atlas", "credentialsRef": {"name": "atlas-creds"},
               "events": ["call_completed"], "atlas": {"campaignId": "camp-rot"},
               "endpointRef": {"name": "rotating"}}),
    )
    .await;
    let http = reqwest::Client::new();
    let mut seen: HashSet<String> = [registered(&c, &http, "camp-rot").await].into();
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(c.env.client.clone(), &c.env.namespace);
    let mut answers = Answers::default();
    for i in 0..rotations {
        secrets
            .delete("rotating-ingress", &Default::default())
            .await
            .unwrap();
        // The old registration may still be listed a moment after the new one appears.
        let hook = registered_other_than(&c, &http, "camp-rot", &seen).await;
        seen.insert(hook.clone());
        let path = url::Url::parse(&hook).unwrap().path().to_string();
        let shots = [(li, "leader"), (fi, "follower")].map(|(r, role)| {
            let (http, url, id) = (http.clone(), replicas[r].hook(&path), new_id());
            let body = atlas_body("camp-rot", std::slice::from_ref(&id));
            async move { (role, id, post(&http, &url, body).await) }
        });
        for (role, id, answer) in futures::future::join_all(shots).await {
            let status = match answer {
                Ok(s) => s.to_string(),
                Err(e) => format!("error: {e}"),
            };
            if status == "200" {
                answers.acked.insert(id);
            } else {
                eprintln!("routes_race: rotation {i}: the {role} answered {status}");
            }
            *answers.by_role.entry((role, status)).or_default() += 1;
        }
    }
    c.wait_delivered(&answers.acked, Duration::from_secs(90))
        .await;
    eprintln!(
        "routes_race race-rot: {rotations} ingress token rotations, answer delay 100 ms; {} events fired at the new URL the moment it was registered: answers {:?}; 404: {}, 503: {}; {} acknowledged, all delivered",
        2 * rotations,
        answers.by_role,
        answers.count("404"),
        answers.count("503"),
        answers.acked.len(),
    );
    assert_eq!(answers.count("404"), 0, "{:?}", answers.by_role);
    assert_eq!(answers.count("503"), 0, "{:?}", answers.by_role);
    assert_eq!(answers.acked.len(), 2 * rotations, "{:?}", answers.by_role);
}
