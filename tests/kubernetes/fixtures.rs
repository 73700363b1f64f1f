//! Objects, simulators and waits that several Kubernetes tests share.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription, WebhookSubscriptionStatus};
use webhook_sandbox::{self as sandbox, SandboxConfig, SandboxHandle};

use crate::support::{TestEnv, wait_until};

pub async fn sandbox() -> SandboxHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sandbox::serve(listener, SandboxConfig::default())
        .await
        .unwrap()
}

pub async fn control(
    sandbox: &SandboxHandle,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let client = reqwest::Client::new();
    let mut req = client.request(method, format!("{}/_control/{path}", sandbox.base_url()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    assert!(
        resp.status().is_success(),
        "control {path}: {}",
        resp.status()
    );
    resp.json().await.unwrap_or(Value::Null)
}

/// The upstream objects whose hook URL points at `hook_url`.
pub async fn upstream_for(sandbox: &SandboxHandle, provider: &str, hook_url: &str) -> Vec<Value> {
    let snapshot = control(
        sandbox,
        reqwest::Method::GET,
        &format!("{provider}/subscriptions"),
        None,
    )
    .await;
    let items = snapshot
        .get("subscriptions")
        .or_else(|| snapshot.get("webhooks"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    items
        .into_iter()
        .filter(|i| {
            let url = i
                .get("hookUrl")
                .or_else(|| i.pointer("/webhook/url"))
                .or_else(|| i.get("url"))
                .and_then(Value::as_str);
            // Atlas registers one URL per trigger: the hook URL plus `?trigger=<name>`.
            url.map(|u| u.split('?').next().unwrap_or(u)) == Some(hook_url)
        })
        .collect()
}

/// One value of a Secret's data, as text.
pub async fn secret_value(env: &TestEnv, name: &str, key: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let s = secrets.get(name).await.unwrap();
    String::from_utf8(s.data.unwrap()[key].0.clone()).unwrap()
}

/// Fires one event from each provider's simulator at the subscriptions set up by `specs()`
/// plus the Atllas one (`atllas`, manual set-up); returns each provider's answer from the
/// simulator's `fire` control, in order, for the caller to judge.
pub async fn fire_each_provider(
    env: &TestEnv,
    sandbox: &SandboxHandle,
) -> Vec<(&'static str, Value)> {
    let manual = subscription_status(env, "atllas")
        .await
        .manual_setup
        .unwrap();
    let header_value = secret_value(env, &manual.secret_name.unwrap(), "value").await;
    let fired = [
        (
            "atlas",
            json!({"event": "call_completed", "campaignId": "camp-1"}),
        ),
        (
            "atomic",
            json!({"event": "card-published", "organizationId": "org1", "environmentId": "env1"}),
        ),
        (
            "smallest",
            json!({"event": "post-conversation", "agentId": "65f0c0ffee00000000000001"}),
        ),
        (
            "atllas",
            json!({"url": manual.hook_url.unwrap(), "event": "call.finished", "headerName": manual.header_name.unwrap(), "headerValue": header_value}),
        ),
    ];
    let mut answers = Vec::new();
    for (provider, body) in fired {
        let result = control(
            sandbox,
            reqwest::Method::POST,
            &format!("{provider}/fire"),
            Some(body),
        )
        .await;
        answers.push((provider, result));
    }
    answers
}

pub async fn create_secret(env: &TestEnv, name: &str, data: Value) {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data
    }))
    .unwrap();
    secrets
        .patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

pub async fn create_endpoint(env: &TestEnv, name: &str) {
    let api: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let ep: WebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
        "metadata": {"name": name},
        "spec": {"destination": {"service": {"name": "consumer", "port": 8080}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &ep).await.unwrap();
}

/// Server-side applies an object of one of our kinds with `spec`.
async fn apply_kind<K>(env: &TestEnv, name: &str, spec: Value)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(env.client.clone(), &env.namespace);
    let obj = json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "metadata": {"name": name}, "spec": spec
    });
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
}

pub async fn apply_subscription(env: &TestEnv, name: &str, spec: Value) {
    apply_kind::<WebhookSubscription>(env, name, spec).await;
}

pub async fn apply_endpoint(env: &TestEnv, name: &str, spec: Value) {
    apply_kind::<WebhookEndpoint>(env, name, spec).await;
}

/// Waits until the subscription's condition `type_` has `status` and returns the object.
pub async fn wait_condition(
    env: &TestEnv,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> WebhookSubscription {
    let api: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_subscription(
        &api,
        name,
        Duration::from_secs(75),
        &format!("{name} {type_}={status} {reason:?}"),
        |sub| {
            let st = sub.status.as_ref()?;
            let ok = st.conditions.iter().any(|c| {
                c.type_ == type_ && c.status == status && reason.is_none_or(|r| c.reason == r)
            }) && st.observed_generation == sub.metadata.generation;
            ok.then_some(sub)
        },
    )
    .await
}

/// The subscription's status as it is now.
pub async fn subscription_status(env: &TestEnv, name: &str) -> WebhookSubscriptionStatus {
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);
    subs.get(name).await.unwrap().status.unwrap()
}

/// Waits up to 30 s for a Kubernetes Event in the test namespace that `matches`; returns it.
pub async fn wait_event_where(
    env: &TestEnv,
    what: &str,
    matches: impl Fn(&Event) -> bool,
) -> Event {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.namespace);
    wait_until(Duration::from_secs(30), what, || {
        let events = events.clone();
        let matches = &matches;
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| matches(e))
        }
    })
    .await
}

/// Waits until `check` returns something for the subscription `name` (read afresh each
/// time); returns that.
pub async fn wait_subscription<T>(
    api: &Api<WebhookSubscription>,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(WebhookSubscription) -> Option<T>,
) -> T {
    wait_until(timeout, what, || {
        let api = api.clone();
        let check = &check;
        async move { check(api.get(name).await.ok()?) }
    })
    .await
}

pub fn hook_url(sub: &WebhookSubscription) -> String {
    let applied = sub
        .status
        .as_ref()
        .unwrap()
        .upstream
        .as_ref()
        .unwrap()
        .applied
        .clone()
        .unwrap();
    serde_json::from_str::<Value>(&applied).unwrap()["hookUrl"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn specs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "atlas",
            json!({"provider": "atlas", "credentialsRef": {"name": "atlas-creds"}, "events": ["call_completed"],
            "atlas": {"campaignId": "camp-1"}, "endpointRef": {"name": "orders"}}),
        ),
        (
            "atomic",
            json!({"provider": "atomic", "credentialsRef": {"name": "atomic-creds"}, "events": ["card-published", "card-completed"],
            "atomic": {"organizationId": "org1", "environmentId": "env1"}, "endpointRef": {"name": "orders"}}),
        ),
        (
            "smallest",
            json!({"provider": "smallest", "credentialsRef": {"name": "smallest-creds"}, "events": ["post-conversation"],
            "smallest": {"agentIds": ["65f0c0ffee00000000000001"]}, "endpointRef": {"name": "orders"}}),
        ),
    ]
}

pub async fn credentials(env: &TestEnv) {
    create_secret(env, "atlas-creds", json!({"apiKey": "atlas-test-key"})).await;
    create_secret(
        env,
        "atomic-creds",
        json!({"clientId": "atomic-client", "clientSecret": "atomic-secret"}),
    )
    .await;
    create_secret(
        env,
        "smallest-creds",
        json!({"apiKey": "smallest-test-key"}),
    )
    .await;
}
