//! `kubectl webhooks` (the operator's binary under the plugin name, found by the real
//! kubectl on PATH) against the real API server with the operator running: each request
//! command sets its annotation and returns once the operator has echoed it.

use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};

use crate::delivery_e2e::{
    atlas_event, ingress_url, send_json, setup_to_consumer, wait_dead_lettered,
};
use crate::fixtures::*;
use crate::ports::free_port;
use crate::support::{TestEnv, wait_until};

/// Runs `kubectl webhooks ARGS -n <namespace>` with the plugin on PATH; async, so the
/// simulators and the consumer this test serves keep answering meanwhile.
async fn kubectl_webhooks(env: &TestEnv, plugin_dir: &std::path::Path, args: &[&str]) -> Output {
    let path = std::env::join_paths(std::iter::once(plugin_dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    tokio::process::Command::new(env.cp.bin_dir.join("kubectl"))
        .arg("webhooks")
        .args(args)
        .args(["--namespace", &env.namespace])
        .env("PATH", path)
        .env("KUBECONFIG", &env.cp.kubeconfig)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run kubectl")
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn signing_secret(env: &TestEnv) -> Vec<u8> {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let s = secrets.get("orders-signing").await.unwrap();
    s.data.unwrap()["secret"].0.clone()
}

#[tokio::test]
async fn kubectl_webhooks_plugin_tests_replays_rotates_and_shows_status() {
    let ops = format!("127.0.0.1:{}", free_port());
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup_to_consumer("plugin", &["--ops-addr", &ops]).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    // The reconciler exports the Synced condition for the chart's alert.
    let synced = format!(
        "webhook_operator_subscription_synced{{namespace=\"{}\",subscription=\"atlas\"}} 1",
        env.namespace
    );
    wait_until(Duration::from_secs(30), "subscription_synced 1", || {
        let (url, synced) = (format!("http://{ops}/metrics"), synced.clone());
        async move {
            let text = reqwest::get(url).await.ok()?.text().await.ok()?;
            text.contains(&synced).then_some(())
        }
    })
    .await;
    let plugin_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_webhook-operator"),
        plugin_dir.path().join("kubectl-webhooks"),
    )
    .unwrap();
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);

    // test: one test event through the whole path, the result read back from status.
    let test_run = kubectl_webhooks(&env, plugin_dir.path(), &["test", "atlas"]).await;
    let out = ok(&test_run, "test");
    assert!(out.contains("Delivered"), "{out}");
    let sub = subs.get("atlas").await.unwrap();
    let asked = sub.annotations()["hooks.webhook-operator.dev/test-requested-at"].clone();
    let last = sub.status.unwrap().last_test.unwrap();
    assert_eq!(
        (last.requested_at, last.result.as_str()),
        (asked, "Delivered")
    );
    assert_eq!(consumer.received().len(), 1, "one test event delivered");

    // replay: a refused event is dead-lettered, then re-queued by the plugin.
    consumer.answer(400);
    let url = format!("{}/atlas", ingress_url(&env, "orders").await);
    let sent = send_json(&url, &atlas_event("plugin-1")).await.unwrap();
    assert!(sent.status().is_success());
    wait_dead_lettered(&env, "orders", 1, "one dead letter").await;
    consumer.answer(200);
    let attempts = |c: &crate::delivery_e2e::Consumer| {
        c.received()
            .iter()
            .filter(|r| r.body.to_string().contains("plugin-1"))
            .count()
    };
    assert_eq!(
        attempts(&consumer),
        0,
        "refused, so not recorded as received"
    );
    ok(
        &kubectl_webhooks(&env, plugin_dir.path(), &["replay", "orders"]).await,
        "replay",
    );
    let ep = endpoints.get("orders").await.unwrap();
    assert_eq!(
        ep.status
            .as_ref()
            .unwrap()
            .last_handled_replay_at
            .as_deref(),
        Some(ep.annotations()["hooks.webhook-operator.dev/replay-requested-at"].as_str())
    );
    wait_until(
        Duration::from_secs(30),
        "the replayed event delivered",
        || {
            let n = attempts(&consumer);
            async move { (n == 1).then_some(()) }
        },
    )
    .await;

    // rotate: a new generated signing secret, the request echoed.
    let before = signing_secret(&env).await;
    ok(
        &kubectl_webhooks(&env, plugin_dir.path(), &["rotate", "orders"]).await,
        "rotate",
    );
    let ep = endpoints.get("orders").await.unwrap();
    assert_eq!(
        ep.status.as_ref().unwrap().last_handled_rotation.as_deref(),
        Some(ep.annotations()["hooks.webhook-operator.dev/rotate-signing-secret"].as_str())
    );
    assert_ne!(signing_secret(&env).await, before, "the secret changed");

    // status: one table with both objects.
    let out = ok(
        &kubectl_webhooks(&env, plugin_dir.path(), &["status"]).await,
        "status",
    );
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0][..8],
        [
            "NAMESPACE",
            "KIND",
            "NAME",
            "READY",
            "HEALTH",
            "DELIVERED",
            "RETRYING",
            "DEAD"
        ],
        "{out}"
    );
    let endpoint_row = lines
        .iter()
        .find(|l| l[1] == "endpoint" && l[2] == "orders")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(endpoint_row[3], "True", "{out}");
    assert!(endpoint_row[5].parse::<u64>().is_ok(), "{out}");
    let sub_row = lines
        .iter()
        .find(|l| l[1] == "subscription" && l[2] == "atlas")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(sub_row[3], "True", "{out}");
    assert_eq!(
        sub_row.len(),
        9,
        "no error for a synced subscription: {out}"
    );
}

/// A destination that refuses the test event (400): the event is dead-lettered at once, so
/// `kubectl webhooks test` ends at once too, with `Failed` and the destination's answer
/// (not after its 60 s wait with a timeout).
#[tokio::test]
async fn kubectl_webhooks_test_fails_as_soon_as_the_destination_refuses() {
    let (env, _sandbox, consumer, _operator, _dir, _) = setup_to_consumer("plugintest", &[]).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    let plugin_dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_webhook-operator"),
        plugin_dir.path().join("kubectl-webhooks"),
    )
    .unwrap();
    consumer.answer(400);
    let started = std::time::Instant::now();
    let run = tokio::time::timeout(
        Duration::from_secs(20),
        kubectl_webhooks(&env, plugin_dir.path(), &["test", "atlas"]),
    )
    .await;
    let took = started.elapsed();
    let run =
        run.unwrap_or_else(|_| panic!("`kubectl webhooks test` still waiting after {took:?}"));
    let out = String::from_utf8_lossy(&run.stdout).to_string();
    println!("kubectl webhooks test against a 400: {out:?} after {took:?}");
    assert!(!run.status.success(), "{out}");
    assert!(out.contains("Failed") && out.contains("HTTP 400"), "{out}");
    let last = subscription_status(&env, "atlas").await.last_test.unwrap();
    assert_eq!(last.result, "Failed");
    assert!(
        last.message
            .as_deref()
            .is_some_and(|m| m.contains("HTTP 400")),
        "{:?}",
        last.message
    );
}
