//! Atlas simulator: `/atlas/v1/api/events-gateway/trigger/{subscribe,unsubscribe,list,sample}`.

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use serde_json::{Value, json};

use super::faults::Delivery;
use super::wire::Provider;
use super::wire::atlas::{PROVIDER_CUSTOM, TriggerSubscription};
use super::{
    AppState, Shared, deliver, guarded, now, parse_body, presents, random_hex, required,
    valid_hook_url,
};

const PREFIX: &str = "/atlas/v1/api/events-gateway/trigger";

#[derive(Default)]
pub(crate) struct Store {
    subs: Vec<TriggerSubscription>,
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "statusCode": status.as_u16(),
        "error": status.canonical_reason().unwrap_or("Error"),
        "message": message,
    });
    (status, Json(body)).into_response()
}

pub(crate) fn router(state: AppState) -> Router<AppState> {
    let routes = Router::new()
        .route(&format!("{PREFIX}/subscribe"), post(subscribe))
        .route(&format!("{PREFIX}/unsubscribe"), delete(unsubscribe))
        .route(&format!("{PREFIX}/list"), get(list))
        .route(&format!("{PREFIX}/sample"), get(sample));
    guarded(routes, state, Provider::Atlas, error, authorized)
}

fn authorized(s: &Shared, h: &HeaderMap) -> Result<(), Response> {
    presents(h, "api-key", b"", &s.config.atlas_api_key)
        .then_some(())
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "Invalid API key"))
}

/// Validates the four required fields shared by subscribe and unsubscribe.
fn tuple(s: &Shared, body: &[u8]) -> Result<TriggerSubscription, Response> {
    let v = parse_body(body)
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "Body must be a JSON object"))?;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let hook_url =
        field("hookUrl").ok_or_else(|| error(StatusCode::BAD_REQUEST, "hookUrl is required"))?;
    if !valid_hook_url(&hook_url, s.config.require_https) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "hookUrl must be a valid URL",
        ));
    }
    let campaign_id = field("campaignId")
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "campaignId is required"))?;
    let trigger_name = field("triggerName")
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "triggerName is required"))?;
    if !Provider::Atlas
        .event_names()
        .contains(&trigger_name.as_str())
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "triggerName must be one of the documented triggers",
        ));
    }
    let provider =
        field("provider").ok_or_else(|| error(StatusCode::BAD_REQUEST, "provider is required"))?;
    if provider != PROVIDER_CUSTOM {
        return Err(error(StatusCode::BAD_REQUEST, "provider must be custom"));
    }
    Ok(TriggerSubscription {
        id: String::new(),
        hook_url,
        campaign_id,
        trigger_name,
        provider,
    })
}

fn same(a: &TriggerSubscription, b: &TriggerSubscription) -> bool {
    a.hook_url == b.hook_url && a.campaign_id == b.campaign_id && a.trigger_name == b.trigger_name
}

async fn subscribe(State(s): State<AppState>, body: Bytes) -> Response {
    let mut t = match tuple(&s, &body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut st = s.atlas.lock().expect("atlas state");
    // Subscribing an existing tuple again returns it unchanged (assumption).
    let sub = match st.subs.iter().find(|x| same(x, &t)) {
        Some(existing) => existing.clone(),
        None => {
            // The subscribe document calls the id "the registered hookUrl": a switch
            // lets tests check that such an id never leaks.
            t.id = if s.config.atlas_ids_are_hook_urls {
                t.hook_url.clone()
            } else {
                format!("sub_{}", random_hex(8))
            };
            st.subs.push(t.clone());
            t
        }
    };
    let body =
        json!({"id": sub.id, "campaignId": sub.campaign_id, "triggerName": sub.trigger_name});
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn unsubscribe(State(s): State<AppState>, body: Bytes) -> Response {
    let t = match tuple(&s, &body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut st = s.atlas.lock().expect("atlas state");
    let before = st.subs.len();
    st.subs.retain(|x| !same(x, &t));
    if st.subs.len() == before {
        return error(StatusCode::NOT_FOUND, "Subscription not found");
    }
    Json(json!({})).into_response()
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CampaignQuery {
    campaign_id: Option<String>,
    trigger_name: Option<String>,
}

async fn list(State(s): State<AppState>, Query(q): Query<CampaignQuery>) -> Response {
    let Some(campaign) = q.campaign_id.filter(|c| !c.is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "campaignId is required");
    };
    let st = s.atlas.lock().expect("atlas state");
    let subs: Vec<&TriggerSubscription> = st
        .subs
        .iter()
        .filter(|x| x.campaign_id == campaign)
        .collect();
    Json(subs).into_response()
}

async fn sample(Query(q): Query<CampaignQuery>) -> Response {
    match (q.campaign_id, q.trigger_name) {
        (Some(c), Some(t)) if Provider::Atlas.event_names().contains(&t.as_str()) => {
            Json(event(&c, &t)).into_response()
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            "campaignId and a valid triggerName are required",
        ),
    }
}

/// One event as Atlas would send it (assumed field names, see PROVIDERS.md).
fn event(campaign: &str, trigger: &str) -> Value {
    let ts = now();
    match trigger {
        "call_started" | "call_completed" => {
            let mut e = json!({
                "callId": format!("call_{}", random_hex(8)),
                "campaignId": campaign,
                "triggerName": trigger,
                "customerNumber": "+15551234567",
                "startedAt": ts,
            });
            if trigger == "call_completed" {
                e["endedAt"] = json!(now());
                e["duration"] = json!(142);
                e["status"] = json!("completed");
                e["summary"] = json!("The customer asked for a call back next week.");
            }
            e
        }
        _ => {
            let mut e = json!({
                "messageId": format!("msg_{}", random_hex(8)),
                "campaignId": campaign,
                "triggerName": trigger,
                "customerNumber": "+15551234567",
                "text": "Hello!",
            });
            let at = if trigger == "message_sent" {
                "sentAt"
            } else {
                "receivedAt"
            };
            e[at] = json!(ts);
            e
        }
    }
}

pub(crate) fn snapshot(s: &Shared) -> Value {
    json!({"subscriptions": s.atlas.lock().expect("atlas state").subs})
}

pub(crate) fn drop_sub(s: &Shared, id: &str) -> bool {
    let mut st = s.atlas.lock().expect("atlas state");
    let before = st.subs.len();
    st.subs.retain(|x| x.id != id);
    st.subs.len() != before
}

/// `{"event": "<triggerName>", "campaignId": "<id>"}`: POSTs a one-element JSON array to
/// every subscription of that trigger for that campaign or for `*`.
pub(crate) async fn fire(s: &Shared, req: &Value) -> Result<Vec<Delivery>, String> {
    let trigger = required(req, "event")?;
    let campaign = required(req, "campaignId")?;
    if !Provider::Atlas.event_names().contains(&trigger) {
        return Err("unknown trigger".into());
    }
    let targets: Vec<String> = {
        let st = s.atlas.lock().expect("atlas state");
        st.subs
            .iter()
            .filter(|x| {
                x.trigger_name == trigger && (x.campaign_id == campaign || x.campaign_id == "*")
            })
            .map(|x| x.hook_url.clone())
            .collect()
    };
    let mut ev = event(campaign, trigger);
    if !s.config.atlas_events_name_trigger
        && let Some(o) = ev.as_object_mut()
    {
        o.remove("triggerName");
        o.remove("messageId");
        o.insert("callId".into(), json!(format!("call_{}", random_hex(8))));
    }
    let body = serde_json::to_vec(&json!([ev])).expect("json");
    let mut out = Vec::new();
    for url in targets {
        let status = deliver(&s.http, reqwest::Method::POST, &url, &[], body.clone()).await;
        out.push(Delivery {
            url,
            status,
            method: None,
        });
    }
    Ok(out)
}
