//! Smallest.ai Atoms simulator: `/smallest/atoms/v1/webhook[/{id}]` and
//! `/smallest/atoms/v1/agent/{agentId}/webhook-subscriptions`.

use std::collections::BTreeMap;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use bytes::Bytes;
use serde_json::{Value, json};

use super::faults::Delivery;
use super::wire::smallest::{IdRef, Populated, SIGNATURE_HEADER, Subscription, Webhook};
use super::wire::{Provider, SignatureEncoding, sign};
use super::{
    AppState, Shared, deliver, guarded, now, parse_body, presents, random_hex, required,
    signed_headers, valid_hook_url,
};

const BASE: &str = "/smallest/atoms/v1";
const RESERVED_HEADERS: [&str; 6] = [
    "x-signature",
    "host",
    "content-length",
    "content-type",
    "connection",
    "transfer-encoding",
];

#[derive(Clone)]
pub(crate) struct Hook {
    id: String,
    url: String,
    description: String,
    status: String,
    headers: BTreeMap<String, String>,
    secret: String,
    created_at: String,
    updated_at: String,
}

#[derive(Clone)]
pub(crate) struct Sub {
    id: String,
    webhook_id: String,
    agent_id: String,
    event_type: String,
    created_at: String,
}

#[derive(Default)]
pub(crate) struct Store {
    hooks: Vec<Hook>,
    subs: Vec<Sub>,
}

impl Store {
    /// `Err` (404) unless a webhook `id` exists.
    fn known(&self, id: &str) -> Result<(), Response> {
        if self.hooks.iter().any(|x| x.id == id) {
            Ok(())
        } else {
            Err(error(StatusCode::NOT_FOUND, "Webhook not found"))
        }
    }
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"status": false, "errors": [message]}))).into_response()
}

fn ok(status: StatusCode, data: impl serde::Serialize) -> Response {
    (status, Json(json!({"status": true, "data": data}))).into_response()
}

pub(crate) fn router(state: AppState) -> Router<AppState> {
    let routes = Router::new()
        .route(&format!("{BASE}/webhook"), get(get_webhooks).post(create))
        .route(
            &format!("{BASE}/webhook/{{id}}"),
            patch(update).delete(delete_webhook),
        )
        .route(
            &format!("{BASE}/agent/{{agent}}/webhook-subscriptions"),
            get(agent_get).post(agent_replace).delete(agent_delete),
        );
    guarded(routes, state, Provider::Smallest, error, authorized)
}

fn authorized(s: &Shared, h: &HeaderMap) -> Result<(), Response> {
    let key = &s.config.smallest_api_key;
    presents(h, "authorization", b"Bearer ", key)
        .then_some(())
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "Unauthorized"))
}

/// Ids are MongoDB ObjectIds: 24 hex characters.
fn object_id(s: &str) -> bool {
    s.len() == 24 && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn agent_ref(agent: &str) -> IdRef {
    IdRef::Populated(Populated {
        id: agent.to_string(),
        name: Some(format!("Agent {}", &agent[agent.len().saturating_sub(4)..])),
        description: Some("Sandbox agent".into()),
    })
}

/// A subscription inside a webhook: the agent is populated (SDK `WebhookSubscriptionPopulated`).
fn render_sub(x: &Sub) -> Subscription {
    Subscription {
        agent_id: agent_ref(&x.agent_id),
        ..render_agent_sub(x)
    }
}

/// A subscription from the agent endpoint: plain ids (SDK `WebhookSubscription`).
fn render_agent_sub(x: &Sub) -> Subscription {
    Subscription {
        id: x.id.clone(),
        webhook_id: IdRef::Id(x.webhook_id.clone()),
        agent_id: IdRef::Id(x.agent_id.clone()),
        event_type: x.event_type.clone(),
        created_at: Some(x.created_at.clone()),
        updated_at: Some(x.created_at.clone()),
    }
}

fn render(st: &Store, h: &Hook, with_secret: bool) -> Webhook {
    Webhook {
        id: h.id.clone(),
        url: h.url.clone(),
        description: h.description.clone(),
        status: h.status.clone(),
        organization_id: Some("5f0000000000000000000001".into()),
        created_by: Some("5f0000000000000000000002".into()),
        subscriptions: st
            .subs
            .iter()
            .filter(|x| x.webhook_id == h.id)
            .map(render_sub)
            .collect(),
        // The SDK documents the secret on the list and on get-by-id; a switch serves
        // it on get-by-id only (the older reading of the docs).
        decrypted_secret_key: with_secret.then(|| h.secret.clone()),
        created_at: Some(h.created_at.clone()),
        updated_at: Some(h.updated_at.clone()),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WebhookQuery {
    webhook_id: Option<String>,
}

async fn get_webhooks(State(s): State<AppState>, Query(q): Query<WebhookQuery>) -> Response {
    let st = s.smallest.lock().expect("smallest state");
    match q.webhook_id {
        Some(id) if !object_id(&id) => error(
            StatusCode::BAD_REQUEST,
            "The provided Webhook ID is invalid.",
        ),
        Some(id) => match st.hooks.iter().find(|x| x.id == id) {
            Some(hk) => ok(StatusCode::OK, render(&st, hk, true)),
            None => error(StatusCode::NOT_FOUND, "Webhook not found"),
        },
        None => ok(
            StatusCode::OK,
            st.hooks
                .iter()
                .map(|hk| render(&st, hk, s.config.smallest_secret_in_list))
                .collect::<Vec<_>>(),
        ),
    }
}

fn event_type_ok(t: &str) -> bool {
    Provider::Smallest.event_names().contains(&t)
}

async fn create(State(s): State<AppState>, body: Bytes) -> Response {
    let Some(v) = parse_body(&body) else {
        return error(StatusCode::BAD_REQUEST, "Body must be a JSON object");
    };
    let (Some(endpoint), Some(description), Some(events)) = (
        v.get("endpoint").and_then(Value::as_str),
        v.get("description").and_then(Value::as_str),
        v.get("events").and_then(Value::as_array),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "endpoint, description and events are required",
        );
    };
    if !valid_hook_url(endpoint, s.config.require_https) {
        return error(StatusCode::BAD_REQUEST, "endpoint must be a valid URL");
    }
    let mut pairs = Vec::new();
    for e in events {
        match (
            e.get("agentId").and_then(Value::as_str),
            e.get("eventType").and_then(Value::as_str),
        ) {
            (Some(a), Some(t)) if object_id(a) && event_type_ok(t) => {
                pairs.push((a.to_string(), t.to_string()))
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "each event needs a valid agentId and eventType",
                );
            }
        }
    }
    pairs.sort();
    pairs.dedup();
    let mut st = s.smallest.lock().expect("smallest state");
    if st.hooks.iter().any(|x| x.url == endpoint) {
        return error(
            StatusCode::BAD_REQUEST,
            "A webhook with this URL has already been registered",
        );
    }
    let ts = now();
    let id = random_hex(12);
    st.hooks.push(Hook {
        id: id.clone(),
        url: endpoint.to_string(),
        description: description.to_string(),
        status: "enabled".into(),
        headers: BTreeMap::new(),
        secret: random_hex(32),
        created_at: ts.clone(),
        updated_at: ts.clone(),
    });
    for (agent, t) in pairs {
        st.subs.push(Sub {
            id: random_hex(12),
            webhook_id: id.clone(),
            agent_id: agent,
            event_type: t,
            created_at: ts.clone(),
        });
    }
    ok(StatusCode::CREATED, id)
}

fn valid_headers(v: &Value) -> Result<BTreeMap<String, String>, &'static str> {
    let m: BTreeMap<String, String> =
        serde_json::from_value(v.clone()).map_err(|_| "headers must map names to strings")?;
    if m.len() > 10 {
        return Err("at most 10 custom headers");
    }
    for (k, val) in &m {
        let token = !k.is_empty()
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
        if !token || RESERVED_HEADERS.contains(&k.to_ascii_lowercase().as_str()) {
            return Err("invalid or reserved header name");
        }
        if val.len() > 1024 {
            return Err("header values are limited to 1024 characters");
        }
    }
    Ok(m)
}

async fn update(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let Some(v) = parse_body(&body) else {
        return error(StatusCode::BAD_REQUEST, "Body must be a JSON object");
    };
    let endpoint = v.get("endpoint").and_then(Value::as_str);
    let description = v.get("description").and_then(Value::as_str);
    let headers = match v.get("headers").map(valid_headers).transpose() {
        Ok(x) => x,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if endpoint.is_none() && description.is_none() && headers.is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "At least one of endpoint, description or headers is required",
        );
    }
    if endpoint.is_some_and(|e| !valid_hook_url(e, s.config.require_https)) {
        return error(StatusCode::BAD_REQUEST, "endpoint must be a valid URL");
    }
    let mut st = s.smallest.lock().expect("smallest state");
    if endpoint.is_some_and(|e| st.hooks.iter().any(|x| x.url == e && x.id != id)) {
        return error(
            StatusCode::BAD_REQUEST,
            "A webhook with this URL has already been registered",
        );
    }
    let Some(hk) = st.hooks.iter_mut().find(|x| x.id == id) else {
        return error(StatusCode::NOT_FOUND, "Webhook not found");
    };
    if let Some(e) = endpoint {
        hk.url = e.to_string();
    }
    if let Some(d) = description {
        hk.description = d.to_string();
    }
    if let Some(m) = headers {
        hk.headers = m;
    }
    hk.updated_at = now();
    ok(StatusCode::OK, id)
}

async fn delete_webhook(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if !object_id(&id) {
        return error(
            StatusCode::BAD_REQUEST,
            "The provided Webhook ID is invalid.",
        );
    }
    let mut st = s.smallest.lock().expect("smallest state");
    if let Err(r) = st.known(&id) {
        return r;
    }
    if st.subs.iter().any(|x| x.webhook_id == id) {
        return error(
            StatusCode::BAD_REQUEST,
            "Cannot delete webhook: It is currently assigned to one or more agents. Please remove all agent assignments first.",
        );
    }
    st.hooks.retain(|x| x.id != id);
    ok(StatusCode::OK, "Webhook deleted successfully")
}

/// Any well-formed ObjectId names an existing agent (assumption: the sandbox has no agents API).
fn agent_ok(agent: &str) -> Result<(), Response> {
    if object_id(agent) {
        Ok(())
    } else {
        Err(error(StatusCode::NOT_FOUND, "Agent not found"))
    }
}

async fn agent_get(State(s): State<AppState>, Path(agent): Path<String>) -> Response {
    if let Err(r) = agent_ok(&agent) {
        return r;
    }
    let st = s.smallest.lock().expect("smallest state");
    ok(
        StatusCode::OK,
        st.subs
            .iter()
            .filter(|x| x.agent_id == agent)
            .map(render_agent_sub)
            .collect::<Vec<_>>(),
    )
}

/// Replaces the agent's subscriptions *to the named webhook* (the assumption in
/// PROVIDERS.md); the agent's subscriptions to other webhooks stay.
async fn agent_replace(
    State(s): State<AppState>,
    Path(agent): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = agent_ok(&agent) {
        return r;
    }
    let Some(v) = parse_body(&body) else {
        return error(StatusCode::BAD_REQUEST, "Body must be a JSON object");
    };
    let (Some(webhook_id), Some(types)) = (
        v.get("webhookId").and_then(Value::as_str),
        v.get("eventTypes").and_then(Value::as_array),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "webhookId and eventTypes are required",
        );
    };
    let mut types: Vec<String> = types
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    types.sort();
    types.dedup();
    if types.is_empty() || !types.iter().all(|t| event_type_ok(t)) {
        return error(
            StatusCode::BAD_REQUEST,
            "eventTypes must be a non-empty list of known event types",
        );
    }
    let mut st = s.smallest.lock().expect("smallest state");
    if let Err(r) = st.known(webhook_id) {
        return r;
    }
    st.subs
        .retain(|x| !(x.agent_id == agent && x.webhook_id == webhook_id));
    let ts = now();
    for t in types {
        st.subs.push(Sub {
            id: random_hex(12),
            webhook_id: webhook_id.to_string(),
            agent_id: agent.clone(),
            event_type: t,
            created_at: ts.clone(),
        });
    }
    ok(StatusCode::CREATED, "Subscriptions created successfully")
}

/// Removes all of the agent's subscriptions, across every webhook (documented).
async fn agent_delete(State(s): State<AppState>, Path(agent): Path<String>) -> Response {
    if let Err(r) = agent_ok(&agent) {
        return r;
    }
    let mut st = s.smallest.lock().expect("smallest state");
    st.subs.retain(|x| x.agent_id != agent);
    ok(StatusCode::OK, "Subscriptions deleted successfully")
}

pub(crate) fn snapshot(s: &Shared) -> Value {
    let st = s.smallest.lock().expect("smallest state");
    let hooks: Vec<Webhook> = st.hooks.iter().map(|hk| render(&st, hk, false)).collect();
    json!({"webhooks": hooks})
}

pub(crate) fn drop_webhook(s: &Shared, id: &str) -> bool {
    let mut st = s.smallest.lock().expect("smallest state");
    let before = st.hooks.len();
    st.hooks.retain(|x| x.id != id);
    st.subs.retain(|x| x.webhook_id != id);
    st.hooks.len() != before
}

/// Gives a webhook a new signing secret, as a dashboard user regenerating it would: from
/// now on deliveries are signed with it, and the list and get-by-id serve it.
pub(crate) fn rotate_secret(s: &Shared, id: &str) -> bool {
    let mut st = s.smallest.lock().expect("smallest state");
    match st.hooks.iter_mut().find(|x| x.id == id) {
        Some(hk) => {
            hk.secret = random_hex(32);
            hk.updated_at = now();
            true
        }
        None => false,
    }
}

/// Disables or re-enables a webhook, as a dashboard user would.
pub(crate) fn set_enabled(s: &Shared, id: &str, enabled: bool) -> bool {
    let mut st = s.smallest.lock().expect("smallest state");
    match st.hooks.iter_mut().find(|x| x.id == id) {
        Some(hk) => {
            hk.status = if enabled { "enabled" } else { "disabled" }.into();
            true
        }
        None => false,
    }
}

fn metadata(agent: &str, kind: &str) -> Value {
    let call_id = format!("CALL-{}", random_hex(6));
    let mut m = json!({"agentId": agent, "eventType": kind, "conversationType": "outbound", "callId": call_id});
    match kind {
        "pre-conversation" => {
            m["toPhone"] = json!("+15551234567");
            m["fromPhone"] = json!("+15557654321");
        }
        "post-conversation" => {
            m["recordingUrl"] = json!("https://example.invalid/recording.mp3");
            m["callData"] = json!({"fromNumber": "+15557654321", "toNumber": "+15551234567", "callDuration": 61,
                "callStatus": "completed", "callDirection": "outbound", "answerTime": now(), "endTime": now()});
            m["transcript"] = json!([{"role": "agent", "content": "Hello!", "timestamp": now()}]);
            m["variables"] = json!({});
        }
        _ => {
            m["callData"] = json!({"fromNumber": "+15557654321", "toNumber": "+15551234567", "callDuration": 61,
                "callStatus": "completed", "callDirection": "outbound", "answerTime": now(), "endTime": now()});
            m["analytics"] =
                json!({"summary": "Short call.", "dispositionMetrics": [], "successMetrics": []});
        }
    }
    m
}

/// `{"event": "<eventType>", "agentId": "<id>"}`: delivers to every enabled webhook with
/// that agent subscribed to that event, signed with `X-Signature`.
pub(crate) async fn fire(s: &Shared, req: &Value) -> Result<Vec<Delivery>, String> {
    let kind = required(req, "event")?;
    let agent = required(req, "agentId")?;
    if !event_type_ok(kind) {
        return Err("unknown event type".into());
    }
    let targets: Vec<Hook> = {
        let st = s.smallest.lock().expect("smallest state");
        st.hooks
            .iter()
            .filter(|hk| hk.status == "enabled")
            .filter(|hk| {
                st.subs
                    .iter()
                    .any(|x| x.webhook_id == hk.id && x.agent_id == agent && x.event_type == kind)
            })
            .cloned()
            .collect()
    };
    let mut out = Vec::new();
    for hk in targets {
        let body = serde_json::to_vec(&json!({
            "url": hk.url,
            "description": hk.description,
            "event": format!("{agent}.{kind}"),
            "metadata": metadata(agent, kind),
            "id": random_hex(12),
        }))
        .expect("json");
        let signature = sign(hk.secret.as_bytes(), &body, SignatureEncoding::Hex);
        let headers = signed_headers(&hk.headers, (SIGNATURE_HEADER.to_string(), signature));
        let to = super::faults::target(&hk.url, req);
        let status = deliver(&s.http, reqwest::Method::POST, &to, &headers, body).await;
        out.push(Delivery {
            url: hk.url,
            status,
            method: None,
        });
    }
    Ok(out)
}
