//! `/_control/`: what tests and demos use to look inside the simulators and to make them
//! misbehave (the faults themselves are applied by [`super::faults`]).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::faults::{Faults, slot};
use super::wire::Provider;
use super::{AppState, atlas, atllas, atomic, smallest};

fn provider_from(s: &str) -> Option<Provider> {
    Provider::ALL.into_iter().find(|p| p.as_str() == s)
}

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/_control/{provider}/subscriptions", get(subscriptions))
        .route("/_control/{provider}/calls", get(calls).delete(reset_calls))
        .route(
            "/_control/{provider}/faults",
            get(get_faults).put(set_faults).delete(clear_faults),
        )
        .route("/_control/{provider}/fire", post(fire))
        .route("/_control/{provider}/drop", post(drop_one))
        .route("/_control/{provider}/disable", post(disable_one))
        .route("/_control/{provider}/enable", post(enable_one))
        .route("/_control/smallest/rotate", post(rotate_smallest))
        .route("/_control/atomic/revoke-tokens", post(revoke_tokens))
}

fn bad(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg}))).into_response()
}

fn api_provider(name: &str) -> Result<(Provider, usize), Response> {
    let p = provider_from(name).ok_or_else(|| bad("unknown provider"))?;
    let i = slot(p).ok_or_else(|| bad("atllas has no management API"))?;
    Ok((p, i))
}

async fn subscriptions(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match provider_from(name.as_str()) {
        Some(Provider::Atlas) => Json(atlas::snapshot(&s)).into_response(),
        Some(Provider::Atomic) => Json(atomic::snapshot(&s)).into_response(),
        Some(Provider::Smallest) => Json(smallest::snapshot(&s)).into_response(),
        _ => bad("unknown provider or no state"),
    }
}

async fn calls(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match api_provider(&name) {
        Ok((p, i)) => {
            let token = if p == Provider::Atomic {
                s.control.token.load(Ordering::SeqCst)
            } else {
                0
            };
            Json(json!({
                "management": s.control.management[i].load(Ordering::SeqCst),
                "writes": s.control.writes[i].load(Ordering::SeqCst),
                "token": token,
            }))
            .into_response()
        }
        Err(r) => r,
    }
}

async fn reset_calls(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match api_provider(&name) {
        Ok((p, i)) => {
            s.control.management[i].store(0, Ordering::SeqCst);
            s.control.writes[i].store(0, Ordering::SeqCst);
            if p == Provider::Atomic {
                s.control.token.store(0, Ordering::SeqCst);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}

async fn get_faults(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match api_provider(&name) {
        Ok((_, i)) => Json(s.control.faults.lock().expect("faults")[i].clone()).into_response(),
        Err(r) => r,
    }
}

async fn set_faults(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(f): Json<Faults>,
) -> Response {
    match api_provider(&name) {
        Ok((_, i)) => {
            s.control.faults.lock().expect("faults")[i] = f;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}

async fn clear_faults(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match api_provider(&name) {
        Ok((_, i)) => {
            s.control.faults.lock().expect("faults")[i] = Faults::default();
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r,
    }
}

async fn fire(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(req): Json<serde_json::Value>,
) -> Response {
    let result = match provider_from(name.as_str()) {
        Some(Provider::Atlas) => atlas::fire(&s, &req).await,
        Some(Provider::Atomic) => atomic::fire(&s, &req).await,
        Some(Provider::Smallest) => smallest::fire(&s, &req).await,
        Some(Provider::Atllas) => atllas::fire(&s, &req).await,
        None => Err("unknown provider".into()),
    };
    match result {
        Ok(deliveries) => Json(json!({"deliveries": deliveries})).into_response(),
        Err(e) => bad(&e),
    }
}

#[derive(Deserialize)]
struct ById {
    id: String,
}

async fn revoke_tokens(State(s): State<AppState>) -> StatusCode {
    atomic::revoke_tokens(&s);
    StatusCode::NO_CONTENT
}

async fn drop_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(b): Json<ById>,
) -> Response {
    let found = match provider_from(name.as_str()) {
        Some(Provider::Atlas) => atlas::drop_sub(&s, &b.id),
        Some(Provider::Atomic) => atomic::drop_webhook(&s, &b.id),
        Some(Provider::Smallest) => smallest::drop_webhook(&s, &b.id),
        _ => return bad("unknown provider or no state"),
    };
    if found {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

/// A new signing secret for a Smallest webhook (Smallest's dashboard can regenerate it).
async fn rotate_smallest(State(s): State<AppState>, Json(b): Json<ById>) -> Response {
    if smallest::rotate_secret(&s, &b.id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

async fn disable_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(b): Json<ById>,
) -> Response {
    set_enabled(&s, &name, &b.id, false)
}

async fn enable_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(b): Json<ById>,
) -> Response {
    set_enabled(&s, &name, &b.id, true)
}

fn set_enabled(s: &AppState, name: &str, id: &str, enabled: bool) -> Response {
    let found = match provider_from(name) {
        Some(Provider::Atomic) => atomic::set_enabled(s, id, enabled),
        Some(Provider::Smallest) => smallest::set_enabled(s, id, enabled),
        _ => return bad("only atomic and smallest webhooks can be disabled or enabled"),
    };
    if found {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}
