//! Atomic simulator: token endpoint `/atomic/{orgId}/auth/token` and the Webhooks API
//! `/atomic/{orgId}/v1/{environmentId}/webhook[/{id}[/test]]`.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::Request;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use bytes::Bytes;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::faults::{Delivery, ErrorShape, faults_layer};
use super::wire::atomic::{Method as AtomicMethod, TEST_EVENT, Webhook};
use super::wire::{Provider, sign as encode_signature};
use super::{
    AppState, Shared, deliver, now, parse_body, random_hex, required, signed_headers,
    valid_hook_url,
};

/// Documented limit of subscriptions per environment.
const MAX_PER_ENV: usize = 100;

pub(crate) struct Entry {
    org: String,
    env: String,
    hook: Webhook,
}

#[derive(Default)]
pub(crate) struct Store {
    webhooks: Vec<Entry>,
    /// access token → (organization, expiry)
    tokens: HashMap<String, (String, Instant)>,
}

/// Assumed error shape: `{"error": "<code>", "message": "..."}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        _ => "internal_error",
    };
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

/// OAuth2 (RFC 6749 §5.2) error of the token endpoint.
fn oauth_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"error": code, "error_description": code.replace('_', " ")})),
    )
        .into_response()
}

pub(crate) fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/atomic/{org}/v1/{env}/webhook", get(list).post(create))
        .route("/atomic/{org}/v1/{env}/webhook/{id}", delete(disable))
        .route("/atomic/{org}/v1/{env}/webhook/{id}/test", post(test))
        .route_layer(from_fn_with_state(state.clone(), require_token))
        .route("/atomic/{org}/auth/token", post(token))
        .route_layer(axum::middleware::from_fn_with_state(
            (state.control.clone(), Provider::Atomic, error as ErrorShape),
            faults_layer,
        ))
}

async fn token(
    State(s): State<AppState>,
    Path(org): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Response {
    let expected = format!(
        "{}:{}",
        s.config.atomic_client_id, s.config.atomic_client_secret
    );
    let given = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .unwrap_or_default();
    if !bool::from(given.ct_eq(expected.as_bytes())) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let grant = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.into_owned());
    if grant.as_deref() != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let ttl = s.config.atomic_token_ttl;
    let access = random_hex(24);
    let mut st = s.atomic.lock().expect("atomic state");
    let now = Instant::now();
    st.tokens.retain(|_, (_, exp)| *exp > now);
    st.tokens.insert(access.clone(), (org, now + ttl));
    Json(json!({"access_token": access, "token_type": "Bearer", "expires_in": ttl.as_secs()}))
        .into_response()
}

/// Every API call needs a User-Agent and an unexpired token issued for this org.
/// Every call but the token request needs a token of the path's organisation (the
/// faults layer around it counts it).
async fn require_token(
    State(s): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let org = params.get("org").map(String::as_str).unwrap_or_default();
    match authorized(&s, org, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

fn authorized(s: &Shared, org: &str, h: &HeaderMap) -> Result<(), Response> {
    if h.get(axum::http::header::USER_AGENT)
        .is_none_or(|v| v.is_empty())
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "User-Agent header is required",
        ));
    }
    let token = h
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let st = s.atomic.lock().expect("atomic state");
    match st.tokens.get(token) {
        Some((o, exp)) if o == org && *exp > Instant::now() => Ok(()),
        _ => Err(error(
            StatusCode::UNAUTHORIZED,
            "Invalid or expired access token",
        )),
    }
}

async fn list(State(s): State<AppState>, Path((org, env)): Path<(String, String)>) -> Response {
    let st = s.atomic.lock().expect("atomic state");
    let hooks: Vec<Webhook> = st
        .webhooks
        .iter()
        .filter(|e| e.org == org && e.env == env)
        .map(|e| shown(&s, &e.hook))
        .collect();
    Json(json!({"data": hooks})).into_response()
}

fn opt_str(v: &Value, k: &str) -> Result<Option<String>, Response> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("{k} must be a string"),
        )),
    }
}

async fn create(
    State(s): State<AppState>,
    Path((org, env)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let hook = match validate(&s, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mut st = s.atomic.lock().expect("atomic state");
    let count = st
        .webhooks
        .iter()
        .filter(|e| e.org == org && e.env == env && e.hook.enabled == Some(true))
        .count();
    if count >= MAX_PER_ENV {
        return error(
            StatusCode::BAD_REQUEST,
            "Webhook subscription limit reached for this environment",
        );
    }
    st.webhooks.push(Entry {
        org,
        env,
        hook: hook.clone(),
    });
    (StatusCode::CREATED, Json(json!({"data": shown(&s, &hook)}))).into_response()
}

/// A webhook as the API answers it: without the assumed fields (`cardTemplateId`,
/// `actionFlowConfigId`, `method`, `enabled`) when the simulator is told the real API
/// might not echo them.
fn shown(s: &Shared, w: &Webhook) -> Webhook {
    let mut w = w.clone();
    if !s.config.atomic_echo_assumed_fields {
        w.card_template_id = None;
        w.action_flow_config_id = None;
        w.method = None;
        w.enabled = None;
    }
    w
}

fn validate(s: &Shared, body: &[u8]) -> Result<Webhook, Response> {
    let v = parse_body(body)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "Body must be a JSON object"))?;
    let types: Vec<String> = v
        .get("types")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .filter(|t: &Vec<String>| !t.is_empty())
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "types must be a non-empty array of event names",
            )
        })?;
    if let Some(bad) = types
        .iter()
        .find(|t| !Provider::Atomic.event_names().contains(&t.as_str()))
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!("unknown event type {bad}"),
        ));
    }
    let url = v.get("url").and_then(Value::as_str).unwrap_or("");
    if !valid_hook_url(url, s.config.require_https) {
        return Err(error(StatusCode::BAD_REQUEST, "url must be a valid URL"));
    }
    let headers: BTreeMap<String, String> = match v.get("headers") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(h) => serde_json::from_value(h.clone())
            .map_err(|_| error(StatusCode::BAD_REQUEST, "headers must map names to strings"))?,
    };
    let method = match opt_str(&v, "method")?.as_deref() {
        None | Some("POST") => AtomicMethod::Post,
        Some("PUT") => AtomicMethod::Put,
        Some(_) => return Err(error(StatusCode::BAD_REQUEST, "method must be POST or PUT")),
    };
    let ts = now();
    Ok(Webhook {
        id: random_hex(4),
        types,
        url: url.to_string(),
        headers,
        secret: Some(uuid_like()),
        created: ts.clone(),
        updated: ts,
        card_template_id: opt_str(&v, "cardTemplateId")?,
        action_flow_config_id: opt_str(&v, "actionFlowConfigId")?,
        method: Some(method),
        enabled: Some(true),
    })
}

fn uuid_like() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

async fn disable(
    State(s): State<AppState>,
    Path((org, env, id)): Path<(String, String, String)>,
) -> Response {
    let mut st = s.atomic.lock().expect("atomic state");
    match st
        .webhooks
        .iter_mut()
        .find(|e| e.org == org && e.env == env && e.hook.id == id)
    {
        Some(e) => {
            e.hook.enabled = Some(false);
            e.hook.updated = now();
            Json(json!({"data": e.hook})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "Webhook not found"),
    }
}

async fn test(
    State(s): State<AppState>,
    Path((org, env, id)): Path<(String, String, String)>,
) -> Response {
    let hook = {
        let st = s.atomic.lock().expect("atomic state");
        st.webhooks
            .iter()
            .find(|e| e.org == org && e.env == env && e.hook.id == id)
            .map(|e| e.hook.clone())
    };
    let Some(hook) = hook else {
        return error(StatusCode::NOT_FOUND, "Webhook not found");
    };
    let status = send(&s, &env, &hook, false, vec![event(TEST_EVENT, None)]).await;
    Json(json!({"data": {"sent": (200..300).contains(&status)}})).into_response()
}

fn event(kind: &str, card_template: Option<&str>) -> Value {
    json!({
        "id": uuid_like(),
        "analyticsEvent": kind,
        "endUserId": "end-user-1",
        "timestamp": now(),
        "cardContext": {
            "cardInstanceStatus": "active",
            "cardTemplateId": card_template.unwrap_or("1"),
            "cardTemplateName": "Sandbox card",
            "cardTemplateVersion": 1,
            "cardInstanceId": random_hex(4),
        },
        "eventContext": {"actionSource": "sandbox"},
    })
}

/// Delivers one envelope to `hook`, signed with its secret, by its method, with its headers.
async fn send(s: &Shared, env: &str, hook: &Webhook, batched: bool, events: Vec<Value>) -> u16 {
    let data = if batched {
        Value::Array(events)
    } else {
        events.into_iter().next().unwrap_or(Value::Null)
    };
    let body = serde_json::to_vec(&json!({
        "requestId": uuid_like(),
        "environmentId": env,
        "webhookId": hook.id,
        "isBatched": batched,
        "data": data,
    }))
    .expect("json");
    let secret = hook.secret.clone().unwrap_or_default();
    let (header, encoding) = &s.config.atomic_signature;
    let signature = encode_signature(secret.as_bytes(), &body, *encoding);
    let headers = signed_headers(&hook.headers, (header.clone(), signature));
    deliver(&s.http, method_of(hook), &hook.url, &headers, body).await
}

/// The method a webhook's deliveries are sent by (POST unless it chose PUT).
fn method_of(hook: &Webhook) -> reqwest::Method {
    match hook.method.unwrap_or_default() {
        AtomicMethod::Post => reqwest::Method::POST,
        AtomicMethod::Put => reqwest::Method::PUT,
    }
}

pub(crate) fn snapshot(s: &Shared) -> Value {
    let st = s.atomic.lock().expect("atomic state");
    let hooks: Vec<Value> = st
        .webhooks
        .iter()
        .map(|e| json!({"organizationId": e.org, "environmentId": e.env, "webhook": e.hook}))
        .collect();
    json!({"webhooks": hooks})
}

/// Forgets every issued token, as if they had been revoked.
pub(crate) fn revoke_tokens(s: &Shared) {
    s.atomic.lock().expect("atomic state").tokens.clear();
}

pub(crate) fn drop_webhook(s: &Shared, id: &str) -> bool {
    let mut st = s.atomic.lock().expect("atomic state");
    let before = st.webhooks.len();
    st.webhooks.retain(|e| e.hook.id != id);
    st.webhooks.len() != before
}

/// Disables (pauses) or re-enables a webhook, as Atomic or a Workbench user would.
pub(crate) fn set_enabled(s: &Shared, id: &str, enabled: bool) -> bool {
    let mut st = s.atomic.lock().expect("atomic state");
    match st.webhooks.iter_mut().find(|e| e.hook.id == id) {
        Some(e) => {
            e.hook.enabled = Some(enabled);
            true
        }
        None => false,
    }
}

/// `{"event", "organizationId", "environmentId", "cardTemplateId"?, "batched"?}`: delivers
/// to every enabled webhook of that environment subscribed to the event (and, when it
/// names a card template, to that template or to none).
pub(crate) async fn fire(s: &Shared, req: &Value) -> Result<Vec<Delivery>, String> {
    let kind = required(req, "event")?;
    let org = required(req, "organizationId")?;
    let env = required(req, "environmentId")?;
    let card = req.get("cardTemplateId").and_then(Value::as_str);
    let batched = req.get("batched").and_then(Value::as_bool).unwrap_or(false);
    let targets: Vec<Webhook> = {
        let st = s.atomic.lock().expect("atomic state");
        st.webhooks
            .iter()
            .filter(|e| e.org == org && e.env == env && e.hook.enabled == Some(true))
            .filter(|e| e.hook.types.iter().any(|t| t == kind))
            .filter(|e| {
                e.hook.card_template_id.is_none() || e.hook.card_template_id.as_deref() == card
            })
            .map(|e| e.hook.clone())
            .collect()
    };
    let mut out = Vec::new();
    for mut hook in targets {
        hook.url = super::faults::target(&hook.url, req);
        let events = if batched {
            vec![event(kind, card), event(kind, card)]
        } else {
            vec![event(kind, card)]
        };
        let status = send(s, env, &hook, batched, events).await;
        out.push(Delivery {
            url: hook.url.clone(),
            status,
            method: Some(method_of(&hook).to_string()),
        });
    }
    Ok(out)
}
