//! `webhook-operator run` against the real API server: it sees both kinds and stops
//! cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use serde_json::json;
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};

use crate::support::test_env;

#[tokio::test]
async fn run_sees_both_kinds_and_exits_on_sigterm() {
    let env = test_env("run").await;
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let ep: WebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
        "metadata": {"name": "seen-endpoint"},
        "spec": {"destination": {"url": "https://consumer.example.com/hook"}}
    }))
    .unwrap();
    endpoints.create(&PostParams::default(), &ep).await.unwrap();
    let sub: WebhookSubscription = serde_json::from_value(json!({
        "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
        "metadata": {"name": "seen-subscription"},
        "spec": {"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "seen-endpoint"}}
    }))
    .unwrap();
    subs.create(&PostParams::default(), &sub).await.unwrap();

    let data_dir = tempfile::tempdir().unwrap();
    let mut child = operator_on_loopback()
        .arg("--namespace")
        .arg(&env.namespace)
        .arg("--data-dir")
        .arg(data_dir.path())
        .env("KUBECONFIG", &env.cp.kubeconfig)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start operator");

    // Read the operator's log on a thread; lines arrive on a channel.
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen_endpoint = false;
    let mut seen_subscription = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(seen_endpoint && seen_subscription) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("operator did not log both objects in time");
        seen_endpoint |= line.contains("seen-endpoint") && line.contains("WebhookEndpoint");
        seen_subscription |=
            line.contains("seen-subscription") && line.contains("WebhookSubscription");
    }

    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = wait_exit(
        &mut child,
        Duration::from_millis(100),
        "operator did not exit within 20 s of SIGTERM",
    );
    assert!(status.success(), "operator exited with {status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped")),
        "no clean-stop log line: {rest:?}"
    );
}

/// `--resolve` passes the address policy: mapping a Service to loopback without
/// `--allow-loopback` is refused at start, naming the flag, before anything listens.
#[test]
fn a_resolve_to_loopback_needs_allow_loopback() {
    let data_dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut child = operator_on_loopback()
            .args(["--resolve", "consumer.apps.svc:8080=127.0.0.1:18080"])
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir.path())
            // No cluster: a start that passes the check fails at the client instead.
            .env("KUBECONFIG", data_dir.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start operator");
        let status = wait_exit(
            &mut child,
            Duration::from_millis(50),
            "operator still running after 20 s without a cluster",
        );
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    };
    let (status, stderr) = run(&[]);
    println!("--resolve to loopback without --allow-loopback: {status}: {stderr}");
    assert!(!status.success());
    assert!(
        stderr.contains("--allow-loopback") && stderr.contains("consumer.apps.svc:8080"),
        "{stderr}"
    );
    // With the flag the check passes (the run then fails for want of a cluster).
    let (_, stderr) = run(&["--allow-loopback"]);
    assert!(
        !stderr.contains("refused by the address policy"),
        "{stderr}"
    );
}

/// Waits up to 20 s for `child` to exit, looking every `poll`; kills it and panics with
/// `late` when it has not.
fn wait_exit(child: &mut Child, poll: Duration, late: &str) -> ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{late}");
        }
        std::thread::sleep(poll);
    }
}

/// `webhook-operator run` with its ingress and ops servers on loopback port 0.
fn operator_on_loopback() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_webhook-operator"));
    cmd.args([
        "run",
        "--ingress-addr",
        "127.0.0.1:0",
        "--ops-addr",
        "127.0.0.1:0",
    ]);
    cmd
}
