//! The chart's health checks, executed: the Argo CD Lua script under a Lua 5.1 interpreter
//! (Argo CD's gopher-lua is 5.1) and the Flux CEL health expressions under a CEL evaluator,
//! both fed the objects a real run left in the API server (dumped to files first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};

use crate::behaviours::{Run, sigterm};
use crate::delivery_e2e::{
    condition, consumer_destination, ingress_url, post_accepted, wait_endpoint,
};
use crate::fixtures::*;
use crate::support::{TestEnv, test_env, wait_until};

fn health_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/webhook-operator/health")
}

/// The object exactly as the API server serves it, written to `dir/<label>.json`.
async fn dump<K>(env: &TestEnv, name: &str, dir: &Path, label: &str) -> PathBuf
where
    K: kube::Resource<DynamicType = ()>,
{
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
    let obj = api.get(name).await.unwrap();
    let path = dir.join(format!("{label}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&obj).unwrap()).unwrap();
    path
}

/// A JSON value as a Lua table constructor (null fields are absent, as in gopher-lua).
fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    0x20..=0x7e => out.push(b as char),
                    _ => out.push_str(&format!("\\{b}")),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_literal(&json!(k)), lua_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs the Argo CD health script on the dumped object: (status, message).
fn argocd_health(object: &Path) -> (String, String) {
    let obj: Value = serde_json::from_slice(&std::fs::read(object).unwrap()).unwrap();
    let script = std::fs::read_to_string(health_dir().join("argocd-health.lua")).unwrap();
    let program = format!(
        "obj = {}\nlocal function health()\n{script}\nend\nlocal hs = health()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua_literal(&obj)
    );
    let out = Command::new("lua5.1")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(program.as_bytes())?;
            child.wait_with_output()
        })
        .expect("lua5.1 (hack/setup.sh installs it)");
    assert!(
        out.status.success(),
        "lua5.1 on {}: {}",
        object.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

/// The Flux healthCheckExprs for `kind`, from the chart's example Kustomization.
fn flux_exprs(kind: &str) -> Value {
    let file = std::fs::read_to_string(health_dir().join("flux-kustomization.yaml")).unwrap();
    let doc: Value = serde_yaml::from_str(&file).unwrap();
    let entry = doc["spec"]["healthCheckExprs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == kind)
        .unwrap_or_else(|| panic!("no healthCheckExprs for {kind}"))
        .clone();
    json!({"inProgress": entry["inProgress"], "failed": entry["failed"], "current": entry["current"]})
}

/// Evaluates the Flux expressions on the dumped object: (inProgress, failed, current),
/// each on its own; Flux takes the first true one in that order.
fn flux_health(kind: &str, object: &Path) -> (bool, bool, bool) {
    let obj: Value = serde_json::from_slice(&std::fs::read(object).unwrap()).unwrap();
    let request = json!({"exprs": flux_exprs(kind), "object": obj});
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/health/flux_cel.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "CEL on {} (hack/setup.sh installs cel-python): {}",
        object.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let flag = |k: &str| r[k].as_bool().unwrap();
    (flag("inProgress"), flag("failed"), flag("current"))
}

#[tokio::test]
async fn argocd_lua_and_flux_cel_judge_statuses_from_a_real_run() {
    let env = test_env("health").await;
    credentials(&env).await;
    create_secret(&env, "atlas-wrong", json!({"apiKey": "wrong-key"})).await;
    let endpoint = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"initialDelay": "100ms", "maxDelay": "200ms"}}});
    let mut run = Run::start(env, Some(endpoint), "webhook_operator=info").await;
    let env = &run.env;
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("health-statuses-{}", env.namespace));
    std::fs::create_dir_all(&dir).unwrap();

    // Subscriptions in three states: ready, stalled on wrong credentials, retrying an outage.
    apply_subscription(env, "ready", specs()[0].1.clone()).await;
    let mut wrong = specs()[0].1.clone();
    wrong["credentialsRef"]["name"] = json!("atlas-wrong");
    wrong["atlas"]["campaignId"] = json!("camp-2");
    apply_subscription(env, "stalled", wrong).await;
    control(
        &run.sandbox,
        reqwest::Method::PUT,
        "smallest/faults",
        Some(json!({"errorRatio": 1.0, "errorStatus": 503})),
    )
    .await;
    apply_subscription(env, "retrying", specs()[2].1.clone()).await;
    wait_condition(env, "ready", "Ready", "True", None).await;
    wait_condition(env, "stalled", "Stalled", "True", None).await;
    wait_condition(env, "retrying", "Reconciling", "True", None).await;
    let mut cases = vec![
        (
            "WebhookSubscription",
            dump::<WebhookSubscription>(env, "ready", &dir, "subscription-ready").await,
            "Healthy",
            (false, false, true),
        ),
        (
            "WebhookSubscription",
            dump::<WebhookSubscription>(env, "stalled", &dir, "subscription-stalled").await,
            "Degraded",
            (false, true, false),
        ),
        (
            "WebhookSubscription",
            dump::<WebhookSubscription>(env, "retrying", &dir, "subscription-retrying").await,
            "Progressing",
            (true, false, false),
        ),
    ];

    // The endpoint delivering, then failing.
    let url = format!("{}/ready", ingress_url(env, "orders").await);
    let http = reqwest::Client::new();
    let post = |id: String| {
        let (http, url) = (http.clone(), url.clone());
        async move { post_accepted(&http, &url, &id).await }
    };
    post("fine".into()).await;
    wait_endpoint(env, "orders", "Healthy=True Delivering", |ep| {
        condition(ep, "Healthy").is_some_and(|(s, r)| s == "True" && r == "Delivering")
    })
    .await;
    cases.push((
        "WebhookEndpoint",
        dump::<WebhookEndpoint>(env, "orders", &dir, "endpoint-delivering").await,
        "Healthy",
        (false, false, true),
    ));
    run.consumer.answer(503);
    for n in 0..3 {
        post(format!("failing-{n}")).await;
    }
    wait_endpoint(env, "orders", "Healthy=False", |ep| {
        condition(ep, "Healthy").is_some_and(|(s, _)| s == "False")
    })
    .await;
    cases.push((
        "WebhookEndpoint",
        dump::<WebhookEndpoint>(env, "orders", &dir, "endpoint-failing").await,
        "Degraded",
        // Still Ready (the destination resolves): Flux checks `failed` before `current`.
        (false, true, true),
    ));

    // A new generation the operator has not observed yet: it is stopped first, so the
    // status stays from the older generation.
    let status = sigterm(&mut run.operator, Duration::from_secs(30)).await;
    assert!(status.success());
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    let patch = json!({"spec": {"events": ["call_completed", "call_started"]}});
    subs.patch("ready", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "generation 2", || {
        let subs = subs.clone();
        async move {
            let s = subs.get("ready").await.ok()?;
            (s.metadata.generation == Some(2)).then_some(())
        }
    })
    .await;
    cases.push((
        "WebhookSubscription",
        dump::<WebhookSubscription>(env, "ready", &dir, "subscription-new-generation").await,
        "Progressing",
        (true, false, true),
    ));

    for (kind, file, argo, flux) in &cases {
        let (status, message) = argocd_health(file);
        assert_eq!(status, *argo, "Argo CD on {}: {message}", file.display());
        assert!(!message.is_empty(), "{}: a message", file.display());
        assert_eq!(
            flux_health(kind, file),
            *flux,
            "Flux (inProgress, failed, current) on {}",
            file.display()
        );
    }
    println!("health statuses dumped to {}", dir.display());
}
