//! Behaviours through the real binary that no other test reaches: the operator's own log
//! never holds a secret, endpoint headers come from a Secret, SIGTERM with deliveries in
//! flight, `managementPolicy: ObserveOnly`, and subscriptions to an external `url`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, ExitStatus};
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};
use webhook_operator::api::WebhookSubscription;
use webhook_sandbox::SandboxHandle;

use crate::delivery_e2e::{
    Consumer, OperatorProcess, atlas_event, consumer_destination, delivered, ingress_url,
    post_accepted, post_event, send_json, signing_secret, wait_endpoint,
};
use crate::fixtures::*;
use crate::ports::free_port;
use crate::support::{TestEnv, test_env, wait_until};

/// A simulator, a consumer and the operator binary for one test.
pub(super) struct Run {
    pub(super) env: TestEnv,
    pub(super) sandbox: SandboxHandle,
    pub(super) consumer: Consumer,
    pub(super) operator: OperatorProcess,
    pub(super) dir: tempfile::TempDir,
    pub(super) port: u16,
}

impl Run {
    /// Starts the operator, logging at info, in a fresh namespace holding the providers'
    /// credentials and no endpoint.
    async fn with_credentials(prefix: &str) -> Run {
        let env = test_env(prefix).await;
        credentials(&env).await;
        Run::start(env, None, "webhook_operator=info").await
    }

    /// Starts the operator in `env` (whose Secrets the caller has created), after applying
    /// endpoint `orders` with `endpoint_spec` when given; waits until it is Ready.
    pub(super) async fn start(env: TestEnv, endpoint_spec: Option<Value>, rust_log: &str) -> Run {
        let sandbox = sandbox().await;
        let consumer = Consumer::start().await;
        if let Some(spec) = &endpoint_spec {
            apply_endpoint(&env, "orders", spec.clone()).await;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let operator = OperatorProcess::start_logging(
            &env,
            &sandbox,
            &consumer,
            port,
            dir.path(),
            &[],
            rust_log,
        );
        if endpoint_spec.is_some() {
            ingress_url(&env, "orders").await;
            *consumer.secret.lock().unwrap() = Some(signing_secret(&env, "orders").await);
        }
        Run {
            env,
            sandbox,
            consumer,
            operator,
            dir,
            port,
        }
    }

    /// Everything the process wrote, without terminal colour codes (a value split by
    /// them would escape a plain search).
    pub(super) fn log(&self) -> String {
        let raw = self.operator.logs.lock().unwrap().join("\n");
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ parameters, ending with a letter.
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// Sends SIGTERM and waits (bounded) for the process to exit.
pub(super) async fn sigterm(operator: &mut OperatorProcess, within: Duration) -> ExitStatus {
    let pid = operator.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success(), "kill -TERM {pid}");
    wait_until(within, "the operator exits after SIGTERM", || {
        let status = operator.child.try_wait().unwrap();
        async move { status }
    })
    .await
}

/// Fires one event from each provider's simulator at the subscriptions set up by
/// `specs()` plus the Atllas one; each must be accepted by the ingress.
async fn fire_one_per_provider(run: &Run) {
    for (provider, result) in fire_each_provider(&run.env, &run.sandbox).await {
        assert_eq!(
            result["deliveries"][0]["status"], 200,
            "{provider}: the ingress accepted the delivery: {result}"
        );
    }
}

fn header<'a>(r: &'a crate::delivery_e2e::Received, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn no_secret_reaches_the_operator_log_for_any_provider() {
    let env = test_env("logsecret").await;
    let tag = format!("{:08x}", rand::random::<u32>());
    credentials(&env).await;
    for (name, data) in [
        (
            "consumer-auth",
            json!({"token": format!("consumer-header-{tag}")}),
        ),
        (
            "atlas-wrong",
            json!({"apiKey": format!("wrong-atlas-key-{tag}")}),
        ),
        (
            "atomic-wrong",
            // Another client id: the operator caches Atomic tokens by organisation and client
            // id, so a wrong secret next to a good one with the same id is never sent.
            json!({"clientId": "atomic-other", "clientSecret": format!("wrong-atomic-secret-{tag}")}),
        ),
        (
            "smallest-wrong",
            json!({"apiKey": format!("wrong-smallest-key-{tag}")}),
        ),
    ] {
        create_secret(&env, name, data).await;
    }
    let endpoint = json!({"destination": consumer_destination(),
        "headers": [{"name": "X-Consumer-Key", "secretKeyRef": {"name": "consumer-auth", "key": "token"}}]});
    // The most talkative level a user might set, for every crate in the process.
    let mut run = Run::start(env, Some(endpoint), "debug").await;
    let env = &run.env;

    // Every provider, with good credentials and with wrong ones.
    for (name, spec) in specs() {
        apply_subscription(env, name, spec.clone()).await;
        let mut wrong = spec;
        wrong["credentialsRef"]["name"] = json!(format!("{name}-wrong"));
        apply_subscription(env, &format!("{name}-wrong"), wrong).await;
    }
    apply_subscription(env, "atllas", json!({"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}})).await;
    for name in ["atlas", "atomic", "smallest", "atllas"] {
        wait_condition(env, name, "Ready", "True", None).await;
    }
    for name in ["atlas-wrong", "atomic-wrong", "smallest-wrong"] {
        wait_condition(env, name, "Synced", "False", None).await;
    }

    // Deliveries from each provider, and requests the ingress refuses.
    fire_one_per_provider(&run).await;
    let url = ingress_url(env, "orders").await;
    let http = reqwest::Client::new();
    let refused = [
        (format!("{url}/atomic"), "x-atomic-signature", "00"),
        (format!("{url}/atllas"), "x-atllas-token", "wrong"),
        (format!("{url}/smallest"), "x-signature", "wrong"),
    ];
    for (target, name, value) in refused {
        let status = http
            .post(&target)
            .header(name, value)
            .json(&json!({"event": "x"}))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_client_error(), "{target}: {status}");
    }
    wait_endpoint(env, "orders", "four deliveries", |ep| delivered(ep) == 4).await;

    let status = sigterm(&mut run.operator, Duration::from_secs(30)).await;
    assert!(status.success(), "operator exited with {status}");
    let log = run.log();
    let env = &run.env;
    assert!(
        log.lines()
            .any(|l| l.contains("atlas-wrong") && l.contains("reconciled")),
        "the log covers the subscriptions with wrong credentials ({} lines)",
        log.lines().count()
    );

    // Every value held in a Secret of the namespace, the ingress token, and the
    // credentials' base64 forms.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for s in secrets.list(&ListParams::default()).await.unwrap() {
        for (key, v) in s.data.unwrap_or_default() {
            // Not secrets: an id, and the end of a rotation window.
            if ["clientId", "previous-until", "rotation-request"].contains(&key.as_str()) {
                continue;
            }
            let v = String::from_utf8_lossy(&v.0).to_string();
            if v.len() >= 8 {
                values.insert(v, format!("{}/{key}", s.metadata.name.clone().unwrap()));
            }
        }
    }
    let token = url.rsplit('/').next().unwrap().to_string();
    values.insert(token, "ingress token".into());
    for must in [
        "atlas-test-key".to_string(),
        "atomic-secret".into(),
        "smallest-test-key".into(),
        format!("consumer-header-{tag}"),
        format!("wrong-atlas-key-{tag}"),
        format!("wrong-atomic-secret-{tag}"),
        format!("wrong-smallest-key-{tag}"),
        signing_secret(env, "orders").await,
    ] {
        assert!(
            values.contains_key(&must),
            "{must} is among the checked values"
        );
    }
    // The signing secret Atomic issued and the Atllas header value, by Secret name.
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let atllas = subs.get("atllas").await.unwrap().status.unwrap();
    let issued = [
        "atomic-provider-signing".to_string(),
        atllas.manual_setup.unwrap().secret_name.unwrap(),
    ];
    for secret in issued {
        assert!(
            values
                .values()
                .any(|w| w.starts_with(&format!("{secret}/"))),
            "{secret} is among the checked values"
        );
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for (value, what) in &values {
        for form in [value.clone(), b64.encode(value)] {
            assert!(
                !log.contains(&form),
                "{what} appears in the operator's log ({} lines)",
                log.lines().count()
            );
        }
    }
}

#[tokio::test]
async fn endpoint_headers_from_a_secret_reach_the_consumer() {
    let env = test_env("headers").await;
    credentials(&env).await;
    let value = format!("consumer-key-{:08x}", rand::random::<u32>());
    create_secret(&env, "consumer-auth", json!({"token": value.clone()})).await;
    let endpoint = json!({"destination": consumer_destination(),
        "headers": [{"name": "X-Consumer-Key", "secretKeyRef": {"name": "consumer-auth", "key": "token"}}]});
    let run = Run::start(env, Some(endpoint), "webhook_operator=info").await;
    let env = &run.env;
    apply_subscription(env, "atlas", specs()[0].1.clone()).await;
    wait_condition(env, "atlas", "Ready", "True", None).await;
    let url = format!("{}/atlas", ingress_url(env, "orders").await);
    let r = send_json(&url, &atlas_event("with-header")).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let received = wait_until(Duration::from_secs(60), "the delivery", || {
        let got = run.consumer.received();
        async move { (!got.is_empty()).then_some(got) }
    })
    .await;
    assert!(received[0].verified);
    assert_eq!(header(&received[0], "x-consumer-key"), Some(value.as_str()));

    // A header whose Secret is missing: the endpoint says so, without any value.
    apply_endpoint(
        env,
        "broken",
        json!({"destination": consumer_destination(),
            "headers": [{"name": "X-Consumer-Key", "secretKeyRef": {"name": "absent", "key": "token"}}]}),
    )
    .await;
    let ep = wait_endpoint(env, "broken", "broken not Ready: SecretMissing", |ep| {
        crate::delivery_e2e::condition(ep, "Ready")
            .is_some_and(|(s, r)| s == "False" && r == "SecretMissing")
    })
    .await;
    let status = serde_json::to_string(&ep.status).unwrap();
    assert!(
        status.contains("X-Consumer-Key"),
        "names the header: {status}"
    );
    let orders = wait_endpoint(env, "orders", "orders delivered", |ep| delivered(ep) == 1).await;
    assert!(
        !serde_json::to_string(&orders.status)
            .unwrap()
            .contains(&value)
    );
}

#[tokio::test]
async fn sigterm_with_deliveries_in_flight_loses_nothing_and_delivers_nothing_twice() {
    let env = test_env("sigterm").await;
    credentials(&env).await;
    let endpoint = json!({"destination": consumer_destination(), "delivery": {"maxInFlight": 4}});
    let mut run = Run::start(env, Some(endpoint), "webhook_operator=info").await;
    apply_subscription(&run.env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&run.env, "atlas", "Ready", "True", None).await;
    let url = format!("{}/atlas", ingress_url(&run.env, "orders").await);

    // Each answer takes a second, well inside the operator's shutdown grace period.
    run.consumer.delay_ms.store(1000, Ordering::SeqCst);
    const EVENTS: usize = 30;
    let http = reqwest::Client::new();
    let mut accepted = BTreeSet::new();
    for n in 0..EVENTS {
        let id = format!("term-{n}");
        post_accepted(&http, &url, &id).await;
        accepted.insert(id);
    }
    let consumer = run.consumer.clone();
    wait_until(Duration::from_secs(60), "deliveries in flight", || {
        let n = consumer.in_flight.load(Ordering::SeqCst);
        async move { (n > 0).then_some(()) }
    })
    .await;
    let status = sigterm(&mut run.operator, Duration::from_secs(30)).await;
    assert!(status.success(), "operator exited with {status}");
    let at_exit = run.consumer.received();
    assert!(
        !at_exit.is_empty(),
        "the attempts in flight at SIGTERM finished inside the grace period"
    );

    // The rest is delivered after a restart on the same volume, the finished ones not again.
    run.consumer.delay_ms.store(0, Ordering::SeqCst);
    let _operator = OperatorProcess::start(
        &run.env,
        &run.sandbox,
        &run.consumer,
        run.port,
        run.dir.path(),
    );
    let consumer = run.consumer.clone();
    let expected = accepted.clone();
    wait_until(Duration::from_secs(120), "every event delivered", || {
        let got: BTreeSet<String> = consumer
            .received()
            .iter()
            .filter_map(|r| r.body["callId"].as_str().map(String::from))
            .collect();
        let done = expected.is_subset(&got);
        async move { done.then_some(()) }
    })
    .await;
    // Anything redelivered after the restart was due at once; an event acknowledged now
    // comes after it, so once it arrives the record is complete.
    let r = post_event(&http, &url, "term-marker").await;
    assert!(r.status().is_success());
    wait_until(Duration::from_secs(60), "the marker event", || {
        let got = consumer
            .received()
            .iter()
            .any(|r| r.body["callId"] == "term-marker");
        async move { got.then_some(()) }
    })
    .await;
    println!(
        "sigterm test: {} of {EVENTS} delivered before the exit",
        at_exit.len()
    );
    let mut times: BTreeMap<String, usize> = BTreeMap::new();
    for r in run.consumer.received() {
        *times
            .entry(r.body["callId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
}

/// The upstream objects of `provider` (all of them), as the simulator holds them.
async fn upstream_all(sandbox: &SandboxHandle, provider: &str) -> Value {
    control(
        sandbox,
        reqwest::Method::GET,
        &format!("{provider}/subscriptions"),
        None,
    )
    .await
}

#[tokio::test]
async fn observe_only_never_writes_upstream_and_reports_what_exists() {
    let run = Run::with_credentials("observe").await;
    let env = &run.env;
    let receiver = "https://receiver.example.com/calls";
    let spec = |policy: &str, url: &str| {
        json!({"provider": "atlas", "credentialsRef": {"name": "atlas-creds"}, "events": ["call_completed"],
            "atlas": {"campaignId": "camp-1"}, "url": url, "managementPolicy": policy, "deletionPolicy": "Orphan"})
    };
    // Something exists upstream: registered by a managed subscription, then orphaned.
    apply_subscription(env, "creator", spec("Manage", receiver)).await;
    let creator = wait_condition(env, "creator", "Ready", "True", None).await;
    let upstream_id = creator.status.unwrap().upstream.unwrap().id.unwrap();
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    subs.delete("creator", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "creator gone", || {
        let subs = subs.clone();
        async move {
            subs.get_opt("creator")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    let before = upstream_all(&run.sandbox, "atlas").await;
    assert_eq!(upstream_for(&run.sandbox, "atlas", receiver).await.len(), 1);

    // Observed: reported with the provider's id, nothing written.
    apply_subscription(env, "observer", spec("ObserveOnly", receiver)).await;
    let observer = wait_condition(env, "observer", "Synced", "True", Some("ObserveOnly")).await;
    wait_condition(env, "observer", "Ready", "True", None).await;
    let upstream = observer.status.unwrap().upstream.unwrap();
    assert_eq!(upstream.id.as_deref(), Some(upstream_id.as_str()));
    assert!(upstream.applied.is_none(), "nothing applied: {upstream:?}");

    // Nothing upstream: reported, not created.
    apply_subscription(
        env,
        "missing",
        spec("ObserveOnly", "https://receiver.example.com/none"),
    )
    .await;
    wait_condition(env, "missing", "Ready", "False", Some("NotFoundUpstream")).await;

    // Deleting an observing subscription leaves upstream alone, whatever its policy says.
    let mut delete_policy = spec("ObserveOnly", receiver);
    delete_policy["deletionPolicy"] = json!("Delete");
    apply_subscription(env, "observer", delete_policy).await;
    wait_condition(env, "observer", "Ready", "True", None).await;
    for name in ["observer", "missing"] {
        subs.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_until(Duration::from_secs(60), "observers gone", || {
        let subs = subs.clone();
        async move {
            let left = subs.list(&ListParams::default()).await.ok()?.items.len();
            (left == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        upstream_all(&run.sandbox, "atlas").await,
        before,
        "ObserveOnly wrote nothing upstream"
    );
}

#[tokio::test]
async fn a_subscription_to_an_external_url_is_registered_and_removed() {
    let run = Run::with_credentials("exturl").await;
    let env = &run.env;
    let mut names = Vec::new();
    for (name, mut spec) in specs() {
        let url = format!("https://receiver.example.com/{name}");
        spec.as_object_mut().unwrap().remove("endpointRef");
        spec["url"] = json!(url);
        apply_subscription(env, name, spec).await;
        names.push((name, url));
    }
    for (name, url) in &names {
        let sub = wait_condition(env, name, "Ready", "True", None).await;
        assert_eq!(hook_url(&sub), *url, "{name}: registered the external URL");
        let upstream = upstream_for(&run.sandbox, name, url).await;
        assert_eq!(
            upstream.len(),
            1,
            "{name}: one upstream object: {upstream:?}"
        );
    }
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    for (name, _) in &names {
        subs.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for (name, url) in &names {
        wait_until(
            Duration::from_secs(60),
            &format!("{name} removed upstream"),
            || {
                let (subs, sandbox) = (subs.clone(), &run.sandbox);
                async move {
                    // Atomic has no delete: its webhook is disabled instead.
                    let live = upstream_for(sandbox, name, url)
                        .await
                        .into_iter()
                        .filter(|u| u.pointer("/webhook/enabled") != Some(&json!(false)))
                        .count();
                    let gone = subs.get_opt(name).await.unwrap().is_none();
                    (gone && live == 0).then_some(())
                }
            },
        )
        .await;
    }
}
