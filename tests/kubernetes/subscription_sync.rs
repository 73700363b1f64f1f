//! The WebhookSubscription reconciler against the real API server and the provider
//! simulators. The controller runs in-process; the data plane is replaced by a recorder
//! (it has its own tests), so these tests see exactly what the controller asks of it.
//! The check that no secret reaches the logs reads the real binary's output instead
//! (`behaviours::no_secret_reaches_the_operator_log_for_any_provider`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clap::Parser;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use webhook_operator::api::{Provider, WebhookSubscription};
use webhook_operator::config::OperatorConfig;
use webhook_operator::controller::routes::{
    EndpointDelivery, EndpointHealthView, EndpointKey, IngressRoutes, TestInjection,
};
use webhook_operator::controller::{self, Context};
use webhook_operator::inbound::VerificationKeys;
use webhook_sandbox::SandboxHandle;

use crate::fixtures::*;
use crate::support::{TestEnv, test_env, wait_until};

/// Records what the controller tells the data plane.
#[derive(Default)]
struct RecordedRoutes {
    subscriptions: Mutex<HashMap<(EndpointKey, String), (Provider, VerificationKeys)>>,
}

impl TestInjection for RecordedRoutes {
    fn inject(
        &self,
        _: String,
        _: String,
        _: http::HeaderMap,
        _: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<u16>> {
        Box::pin(async { anyhow::bail!("no ingress in these tests") })
    }
    fn last_test(&self, _: EndpointKey, _: String) -> Option<(SystemTime, Duration)> {
        None
    }
}

impl IngressRoutes for RecordedRoutes {
    fn upsert_subscription(
        &self,
        endpoint: EndpointKey,
        subscription: String,
        provider: Provider,
        keys: VerificationKeys,
    ) {
        self.subscriptions
            .lock()
            .unwrap()
            .insert((endpoint, subscription), (provider, keys));
    }
    fn remove_subscription(&self, endpoint: EndpointKey, subscription: String) {
        self.subscriptions
            .lock()
            .unwrap()
            .remove(&(endpoint, subscription));
    }
    fn subscription_counters(
        &self,
        _: EndpointKey,
        _: String,
    ) -> Option<(u64, Option<SystemTime>)> {
        None
    }
    fn configure_endpoint(
        &self,
        _: &EndpointDelivery,
    ) -> Result<(), webhook_operator::controller::routes::Refusal> {
        Ok(())
    }
    fn remove_endpoint(&self, _: EndpointKey) {}
    fn mark_loaded(&self) {}
    fn endpoint_health(&self, _: EndpointKey) -> Option<EndpointHealthView> {
        None
    }
    fn replay(
        &self,
        _: EndpointKey,
        _: webhook_operator::queue::ReplayFilter,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<u64>> {
        Box::pin(async { Ok(0) })
    }
    fn purge_endpoint(
        &self,
        _: EndpointKey,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<u64>> {
        Box::pin(async { Ok(0) })
    }
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    config: OperatorConfig,
}

struct Operator {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    async fn start(env: &TestEnv, sandbox: &SandboxHandle) -> Operator {
        let config = Args::parse_from([
            "test",
            "--namespace",
            &env.namespace,
            "--public-base-url",
            "http://127.0.0.1:9",
            "--provider-sandbox-url",
            &sandbox.base_url(),
        ])
        .config;
        let ctx = Arc::new(Context::new(
            env.client.clone(),
            config,
            Arc::new(RecordedRoutes::default()),
        ));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(controller::run(ctx, shutdown.clone()));
        Operator { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("controller stops")
            .unwrap();
    }
}

#[tokio::test]
async fn each_provider_gets_exactly_one_upstream_subscription_and_is_ready() {
    let env = test_env("sync").await;
    let sandbox = sandbox().await;
    credentials(&env).await;
    create_endpoint(&env, "orders").await;
    let operator = Operator::start(&env, &sandbox).await;
    for (name, spec) in specs() {
        apply_subscription(&env, name, spec).await;
    }
    let mut urls = Vec::new();
    for (name, _) in specs() {
        let sub = wait_condition(&env, name, "Ready", "True", None).await;
        let url = hook_url(&sub);
        assert!(
            url.starts_with("http://127.0.0.1:9/hooks/") && url.ends_with(&format!("/{name}")),
            "{url}"
        );
        assert_eq!(
            upstream_for(&sandbox, name, &url).await.len(),
            1,
            "{name}: one upstream object"
        );
        assert!(sub.status.unwrap().upstream.unwrap().id.is_some());
        urls.push((name, url));
    }
    // kubectl wait sees it too.
    let out = env.cp.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=10s",
        "-n",
        &env.namespace,
        "webhooksubscriptions",
        "--all",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Apply again and restart the operator: still exactly one each.
    operator.stop().await;
    for (name, spec) in specs() {
        apply_subscription(&env, name, spec).await;
    }
    let operator = Operator::start(&env, &sandbox).await;
    // A requested reconcile, echoed in status once a whole pass of the restarted
    // operator has run: only then is the upstream count final.
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let request = json!({"metadata": {"annotations": {"hooks.webhook-operator.dev/requested-at": "after-restart"}}});
    for (name, _) in &urls {
        subs.patch(name, &PatchParams::default(), &Patch::Merge(&request))
            .await
            .unwrap();
    }
    for (name, url) in &urls {
        wait_subscription(
            &subs,
            name,
            Duration::from_secs(60),
            &format!("{name}: a pass after the restart"),
            |sub| {
                let st = sub.status?;
                (st.last_handled_requested_at.as_deref() == Some("after-restart")).then_some(())
            },
        )
        .await;
        wait_condition(&env, name, "Ready", "True", None).await;
        assert_eq!(
            upstream_for(&sandbox, name, url).await.len(),
            1,
            "{name} after restart"
        );
    }

    // No credential or signing secret in any status or Event.
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let text = format!(
        "{}{}",
        serde_json::to_string(&subs.list(&ListParams::default()).await.unwrap().items).unwrap(),
        serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap()
    );
    for secret in ["atlas-test-key", "atomic-secret", "smallest-test-key"] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into status or Events"
        );
    }
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    for name in ["atomic", "smallest"] {
        let s = secrets
            .get(&format!("{name}-provider-signing"))
            .await
            .unwrap();
        let value = &s.data.unwrap()["secret"].0;
        assert!(!value.is_empty());
        assert!(
            !text.contains(std::str::from_utf8(value).unwrap()),
            "{name} signing secret leaked"
        );
    }
    operator.stop().await;
}

#[tokio::test]
async fn changes_replace_upstream_and_delete_honours_the_deletion_policy() {
    let env = test_env("change").await;
    let sandbox = sandbox().await;
    credentials(&env).await;
    create_endpoint(&env, "orders").await;
    let operator = Operator::start(&env, &sandbox).await;
    let mut spec = specs()[0].1.clone();
    apply_subscription(&env, "atlas", spec.clone()).await;
    let url = hook_url(&wait_condition(&env, "atlas", "Ready", "True", None).await);

    spec["events"] = json!(["call_started", "message_sent"]);
    apply_subscription(&env, "atlas", spec.clone()).await;
    wait_until(
        Duration::from_secs(30),
        "upstream follows the new events",
        || {
            let sandbox = &sandbox;
            let url = url.clone();
            async move {
                let mut triggers: Vec<String> = upstream_for(sandbox, "atlas", &url)
                    .await
                    .iter()
                    .map(|s| s["triggerName"].as_str().unwrap().to_string())
                    .collect();
                triggers.sort();
                (triggers == ["call_started", "message_sent"]).then_some(())
            }
        },
    )
    .await;

    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    subs.delete("atlas", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "object and upstream gone", || {
        let subs = subs.clone();
        let sandbox = &sandbox;
        let url = url.clone();
        async move {
            let gone = subs.get_opt("atlas").await.unwrap().is_none();
            (gone && upstream_for(sandbox, "atlas", &url).await.is_empty()).then_some(())
        }
    })
    .await;

    // Orphan: the object goes, the upstream subscription stays.
    let mut orphan = specs()[2].1.clone();
    orphan["deletionPolicy"] = json!("Orphan");
    apply_subscription(&env, "smallest", orphan).await;
    let url = hook_url(&wait_condition(&env, "smallest", "Ready", "True", None).await);
    subs.delete("smallest", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "orphaned object gone", || {
        let subs = subs.clone();
        async move {
            subs.get_opt("smallest")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        upstream_for(&sandbox, "smallest", &url).await.len(),
        1,
        "Orphan keeps upstream"
    );
    operator.stop().await;
}

#[tokio::test]
async fn credentials_missing_then_wrong_then_fixed_recovers_without_restart() {
    let env = test_env("creds").await;
    let sandbox = sandbox().await;
    create_endpoint(&env, "orders").await;
    let operator = Operator::start(&env, &sandbox).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Synced", "False", Some("CredentialsMissing")).await;
    wait_condition(&env, "atlas", "Stalled", "True", Some("CredentialsMissing")).await;

    create_secret(&env, "atlas-creds", json!({"apiKey": "wrong-key"})).await;
    let sub = wait_condition(&env, "atlas", "Synced", "False", Some("Unauthorized")).await;
    assert!(
        !serde_json::to_string(&sub.status)
            .unwrap()
            .contains("wrong-key")
    );

    create_secret(&env, "atlas-creds", json!({"apiKey": "atlas-test-key"})).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    wait_condition(&env, "atlas", "Synced", "True", None).await;
    operator.stop().await;
}

#[tokio::test]
async fn dropped_upstream_subscription_is_recreated_within_one_resync() {
    let env = test_env("drift").await;
    let sandbox = sandbox().await;
    credentials(&env).await;
    create_endpoint(&env, "orders").await;
    let operator = Operator::start(&env, &sandbox).await;
    let mut spec = specs()[1].1.clone();
    spec["resyncInterval"] = json!("30s");
    apply_subscription(&env, "atomic", spec).await;
    let sub = wait_condition(&env, "atomic", "Ready", "True", None).await;
    let url = hook_url(&sub);
    let id = upstream_for(&sandbox, "atomic", &url).await[0]
        .pointer("/webhook/id")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    control(
        &sandbox,
        reqwest::Method::POST,
        "atomic/drop",
        Some(json!({"id": id})),
    )
    .await;
    assert!(upstream_for(&sandbox, "atomic", &url).await.is_empty());

    let sub = wait_condition(&env, "atomic", "Synced", "True", Some("DriftRepaired")).await;
    assert_eq!(upstream_for(&sandbox, "atomic", &url).await.len(), 1);
    assert_ne!(
        sub.status.unwrap().upstream.unwrap().id.as_deref(),
        Some(id.as_str())
    );
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let list = events.list(&ListParams::default()).await.unwrap();
    assert!(
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("DriftRepaired")),
        "DriftRepaired Event"
    );
    operator.stop().await;
}

#[tokio::test]
async fn provider_outage_is_retried_within_the_backoff_schedule_then_recovers() {
    let env = test_env("outage").await;
    let sandbox = sandbox().await;
    credentials(&env).await;
    create_endpoint(&env, "orders").await;
    control(
        &sandbox,
        reqwest::Method::PUT,
        "atlas/faults",
        Some(json!({"errorRatio": 1.0, "errorStatus": 503})),
    )
    .await;
    control(&sandbox, reqwest::Method::DELETE, "atlas/calls", None).await;
    let operator = Operator::start(&env, &sandbox).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(
        &env,
        "atlas",
        "Synced",
        "False",
        Some("UpstreamUnavailable"),
    )
    .await;
    // Backoff 1, 2, 4, 8 s (±20 %) between passes, one call each (the first call fails).
    // Each call is seen by polling the simulator's counter; a gap can look shorter than
    // it was by the polling delay only, so the check keeps a 0.5 s margin below each
    // step (load only makes gaps longer). A hot loop makes gaps of milliseconds.
    let mut seen: Vec<std::time::Instant> = Vec::new();
    let mut counted = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} upstream calls in 120 s of outage",
            seen.len()
        );
        let calls =
            control(&sandbox, reqwest::Method::GET, "atlas/calls", None).await["management"]
                .as_u64()
                .unwrap();
        let now = std::time::Instant::now();
        seen.extend((counted..calls).map(|_| now));
        counted = calls;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, pair) in seen.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let step = Duration::from_secs_f64(0.8 * f64::from(1u32 << i));
        assert!(
            gap + Duration::from_millis(500) >= step,
            "pass {} came {gap:?} after the previous one; its backoff step is at least {step:?}",
            i + 2
        );
    }

    control(&sandbox, reqwest::Method::DELETE, "atlas/faults", None).await;
    let api: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    // The next pass comes at most one backoff step (64 s +20 %) after the last failure.
    wait_subscription(
        &api,
        "atlas",
        Duration::from_secs(120),
        "recovery after the outage",
        |sub| {
            sub.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn two_smallest_subscriptions_on_one_agent_coexist() {
    let env = test_env("coexist").await;
    let sandbox = sandbox().await;
    credentials(&env).await;
    create_endpoint(&env, "orders").await;
    let operator = Operator::start(&env, &sandbox).await;
    let spec = specs()[2].1.clone();
    apply_subscription(&env, "first", spec.clone()).await;
    apply_subscription(&env, "second", spec).await;
    let first = hook_url(&wait_condition(&env, "first", "Ready", "True", None).await);
    let second = hook_url(&wait_condition(&env, "second", "Ready", "True", None).await);
    let subscribed = |hooks: Vec<Value>| {
        hooks
            .first()
            .and_then(|h| h["subscriptions"].as_array().map(|s| s.len()))
            .unwrap_or(0)
    };
    assert_eq!(
        subscribed(upstream_for(&sandbox, "smallest", &first).await),
        1
    );
    assert_eq!(
        subscribed(upstream_for(&sandbox, "smallest", &second).await),
        1
    );

    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    subs.delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "first gone upstream", || {
        let sandbox = &sandbox;
        let first = first.clone();
        async move {
            upstream_for(sandbox, "smallest", &first)
                .await
                .is_empty()
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        subscribed(upstream_for(&sandbox, "smallest", &second).await),
        1,
        "second keeps its agent subscription"
    );
    operator.stop().await;
}

#[tokio::test]
async fn a_subscription_the_provider_disabled_is_reported_until_re_enabled() {
    let env = test_env("disabled").await;
    let sandbox = sandbox().await;
    credentials(&env).await;
    create_endpoint(&env, "orders").await;
    let operator = Operator::start(&env, &sandbox).await;
    let mut ids = Vec::new();
    for (name, mut spec) in specs().into_iter().skip(1) {
        spec["resyncInterval"] = json!("30s");
        apply_subscription(&env, name, spec).await;
        let url = hook_url(&wait_condition(&env, name, "Ready", "True", None).await);
        let upstream = upstream_for(&sandbox, name, &url).await;
        let id = upstream[0]
            .pointer("/webhook/id")
            .or_else(|| upstream[0].get("_id"))
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        ids.push((name, id));
    }
    for (name, id) in &ids {
        control(
            &sandbox,
            reqwest::Method::POST,
            &format!("{name}/disable"),
            Some(json!({"id": id})),
        )
        .await;
    }
    for (name, hint) in [("atomic", "Workbench"), ("smallest", "Atoms dashboard")] {
        let sub = wait_condition(&env, name, "Ready", "False", Some("DisabledUpstream")).await;
        let ready = sub
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .clone();
        assert!(
            ready.message.contains(hint),
            "{name}: says what to do: {}",
            ready.message
        );
        assert_eq!(
            sub.status.unwrap().upstream.unwrap().state.as_deref(),
            Some("disabled")
        );
    }
    // Reported, not replaced: still exactly one upstream object each, the same one.
    for (name, id) in &ids {
        let snapshot = control(
            &sandbox,
            reqwest::Method::GET,
            &format!("{name}/subscriptions"),
            None,
        )
        .await;
        assert_eq!(
            snapshot["webhooks"].as_array().unwrap().len(),
            1,
            "{name}: {snapshot}"
        );
        assert!(snapshot.to_string().contains(id.as_str()));
    }
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    let reasons = |list: Vec<Event>| {
        list.into_iter()
            .filter_map(|e| e.reason)
            .collect::<Vec<_>>()
    };
    let seen = reasons(events.list(&ListParams::default()).await.unwrap().items);
    assert_eq!(
        seen.iter().filter(|r| *r == "DisabledUpstream").count(),
        2,
        "{seen:?}"
    );

    for (name, id) in &ids {
        control(
            &sandbox,
            reqwest::Method::POST,
            &format!("{name}/enable"),
            Some(json!({"id": id})),
        )
        .await;
    }
    for (name, _) in &ids {
        wait_condition(&env, name, "Ready", "True", None).await;
    }
    let seen = reasons(events.list(&ListParams::default()).await.unwrap().items);
    assert_eq!(
        seen.iter().filter(|r| *r == "EnabledUpstream").count(),
        2,
        "{seen:?}"
    );
    operator.stop().await;
}
