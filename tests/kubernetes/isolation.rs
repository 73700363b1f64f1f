//! Tenant isolation through the real binary and a real API server: each way a tenant could
//! use the operator to reach what its namespace may not is refused with a reason of its
//! own, and nothing is delivered.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use webhook_operator::api::WebhookEndpoint;

use crate::delivery_e2e::{Consumer, OperatorProcess, condition_of, wait_false, wait_ready};
use crate::fixtures::*;
use crate::ports::free_port;
use crate::support::{TestEnv, test_env, wait_until};

/// Waits for the endpoint's `Ready=False` with `reason`; returns the condition message.
async fn wait_refused(env: &TestEnv, endpoint: &str, reason: &str) -> String {
    let what = format!("Ready=False {reason}");
    let ep = wait_false(env, endpoint, &what, "Ready", reason).await;
    condition_of(ep, "Ready").message
}

/// Waits for a Kubernetes Event with `reason` about `endpoint`.
async fn wait_event(env: &TestEnv, endpoint: &str, reason: &str) {
    let what = format!("an Event {reason} for {endpoint}");
    wait_event_where(env, &what, |e| {
        e.reason.as_deref() == Some(reason) && e.involved_object.name.as_deref() == Some(endpoint)
    })
    .await;
}

#[tokio::test]
async fn url_syntax_in_a_service_name_is_refused_at_admission() {
    let env = test_env("iso-name").await;
    let api: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let cases = [
        (
            json!({"name": "x@127.0.0.1:9090/metrics#", "port": 8080}),
            "spec.destination.service.name",
        ),
        (
            json!({"name": "consumer", "namespace": "other.svc:1@evil", "port": 8080}),
            "spec.destination.service.namespace",
        ),
        (
            json!({"name": "Consumer", "port": 8080}),
            "spec.destination.service.name",
        ),
    ];
    for (service, field) in cases {
        let obj = json!({"apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
            "metadata": {"name": "trick"}, "spec": {"destination": {"service": service}}});
        let err = api
            .patch("trick", &PatchParams::apply("test"), &Patch::Apply(&obj))
            .await
            .expect_err("the API server refuses URL syntax in a name");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

#[tokio::test]
async fn a_service_in_another_namespace_is_refused_and_nothing_is_delivered() {
    let env = test_env("iso-xns").await;
    let other = test_env("iso-victim").await;
    let sandbox = sandbox().await;
    let consumer = Consumer::start().await;
    credentials(&env).await;
    apply_endpoint(
        &env,
        "orders",
        json!({"destination": {"service": {"name": "consumer", "namespace": other.namespace, "port": 8080, "path": "/events"}}}),
    )
    .await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    // The other namespace's consumer is reachable, as a Service would be in a cluster.
    let resolve = format!(
        "consumer.{}.svc:8080=127.0.0.1:{}",
        other.namespace, consumer.port
    );
    let dir = tempfile::tempdir().unwrap();
    let _operator = OperatorProcess::start_with(
        &env,
        &sandbox,
        &consumer,
        free_port(),
        dir.path(),
        &["--resolve", &resolve],
    );

    let msg = wait_refused(&env, "orders", "CrossNamespaceRefDenied").await;
    assert!(msg.contains(&other.namespace), "{msg}");
    wait_event(&env, "orders", "CrossNamespaceRefDenied").await;

    // The subscription waits for its endpoint, so the provider has nowhere to send: a fired
    // event goes nowhere and the other namespace's consumer sees nothing.
    wait_condition(&env, "atlas", "Ready", "False", Some("EndpointNotReady")).await;
    let fired = control(
        &sandbox,
        reqwest::Method::POST,
        "atlas/fire",
        Some(json!({"event": "call_completed", "campaignId": "camp-1"})),
    )
    .await;
    assert_eq!(fired["deliveries"], json!([]), "{fired}");
    assert!(consumer.received().is_empty());
}

/// `line` without terminal colour sequences.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

/// The ops port the operator logged (`--ops-addr 127.0.0.1:0`).
async fn ops_port(operator: &OperatorProcess) -> u16 {
    wait_until(Duration::from_secs(30), "the ops server's address", || {
        let port = operator.logs.lock().unwrap().iter().find_map(|l| {
            let l = plain(l);
            let rest = l.split("server=\"ops\"").nth(1)?;
            let addr = rest.split("addr=").nth(1)?.split_whitespace().next()?;
            addr.trim_matches('"').rsplit(':').next()?.parse().ok()
        });
        async move { port }
    })
    .await
}

#[tokio::test]
async fn the_operators_own_metrics_port_is_refused_unless_loopback_is_allowed() {
    let env = test_env("iso-loop").await;
    let sandbox = sandbox().await;
    let consumer = Consumer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let operator =
        OperatorProcess::start_strict(&env, &sandbox, &consumer, free_port(), dir.path());
    let ops = ops_port(&operator).await;
    // Both pass the schema (http to loopback, or to a "bare Service name"); the URL type
    // reads 2130706433 as 127.0.0.1.
    for (name, url) in [
        ("metrics", format!("http://127.0.0.1:{ops}/metrics")),
        (
            "metrics-decimal",
            format!("http://2130706433:{ops}/metrics"),
        ),
    ] {
        apply_endpoint(&env, name, json!({"destination": {"url": url}})).await;
        let msg = wait_refused(&env, name, "DestinationForbidden").await;
        assert!(msg.contains("loopback"), "{name}: {msg}");
        wait_event(&env, name, "DestinationForbidden").await;
    }
    drop(operator);

    // The explicit flag (the demo's and the tests') lifts exactly this.
    let dir = tempfile::tempdir().unwrap();
    let _operator =
        OperatorProcess::start_with(&env, &sandbox, &consumer, free_port(), dir.path(), &[]);
    wait_ready(&env, "metrics", "Ready=True with --allow-loopback").await;
}

#[tokio::test]
async fn a_secret_named_like_a_generated_one_is_neither_overwritten_nor_used() {
    let env = test_env("iso-own").await;
    let sandbox = sandbox().await;
    let consumer = Consumer::start().await;
    create_secret(&env, "orders-ingress", json!({"note": "the user's own"})).await;
    apply_endpoint(
        &env,
        "orders",
        json!({"destination": {"service": {"name": "consumer", "port": 8080}}}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _operator =
        OperatorProcess::start_with(&env, &sandbox, &consumer, free_port(), dir.path(), &[]);

    let msg = wait_refused(&env, "orders", "SecretNotOwned").await;
    assert!(msg.contains("orders-ingress"), "{msg}");
    wait_event(&env, "orders", "SecretNotOwned").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let s = secrets.get("orders-ingress").await.unwrap();
    let keys: Vec<&String> = s.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["note"], "the Secret's data is untouched");
    assert!(
        s.metadata.owner_references.unwrap_or_default().is_empty(),
        "no owner reference added (it would be garbage-collected with the endpoint)"
    );
}

#[tokio::test]
async fn require_secret_label_reads_only_labelled_secrets() {
    let env = test_env("iso-label").await;
    let sandbox = sandbox().await;
    let consumer = Consumer::start().await;
    create_secret(&env, "consumer-auth", json!({"token": "t0ken"})).await;
    apply_endpoint(
        &env,
        "orders",
        json!({"destination": {"service": {"name": "consumer", "port": 8080}},
               "headers": [{"name": "X-Api-Token", "secretKeyRef": {"name": "consumer-auth", "key": "token"}}]}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let _operator = OperatorProcess::start_with(
        &env,
        &sandbox,
        &consumer,
        free_port(),
        dir.path(),
        &["--require-secret-label"],
    );
    let msg = wait_refused(&env, "orders", "SecretNotReferable").await;
    assert!(
        msg.contains("consumer-auth") && !msg.contains("t0ken"),
        "{msg}"
    );

    // Opting the Secret in is enough.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    secrets
        .patch(
            "consumer-auth",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"hooks.webhook-operator.dev/referable": "true"}}}),
            ),
        )
        .await
        .unwrap();
    wait_ready(&env, "orders", "Ready=True once labelled").await;
}
