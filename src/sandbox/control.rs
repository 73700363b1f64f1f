//! `/_control/`: what tests and demos use to look inside the simulators and to make them
//! misbehave. Also the per-provider middleware that counts management calls and injects
//! the configured faults before a request reaches the simulated API.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{AppState, atlas, atllas, atomic, smallest};
use crate::api::Provider;

/// Faults injected into one provider's API (token endpoint included). Ratios are the
/// share of requests affected, drawn at random per request: 1.0 = every request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Share of requests answered with `errorStatus` (default 500).
    pub error_ratio: f64,
    pub error_status: Option<u16>,
    /// Share of requests answered 429, with `Retry-After: retryAfterSecs` when set.
    pub rate_limit_ratio: f64,
    pub retry_after_secs: Option<u64>,
    /// Added before every answer.
    pub latency_ms: u64,
    /// Never answer (the caller's timeout must fire).
    pub hang: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    management: [AtomicU64; 3],
    token: AtomicU64,
    faults: Mutex<[Faults; 3]>,
}

fn slot(p: Provider) -> Option<usize> {
    match p {
        Provider::Atlas => Some(0),
        Provider::Atomic => Some(1),
        Provider::Smallest => Some(2),
        Provider::Atllas => None,
    }
}

fn provider_from(s: &str) -> Option<Provider> {
    Provider::ALL.into_iter().find(|p| p.as_str() == s)
}

/// The provider's own error shape for an injected or auth failure.
pub(crate) fn provider_error(p: Provider, status: StatusCode, message: &str) -> Response {
    match p {
        Provider::Atlas => atlas::error(status, message),
        Provider::Atomic => atomic::error(status, message),
        _ => smallest::error(status, message),
    }
}

/// Counts the call, then applies the provider's faults.
pub(crate) async fn faults_layer(
    State((state, provider)): State<(AppState, Provider)>,
    req: Request,
    next: Next,
) -> Response {
    let Some(i) = slot(provider) else {
        return next.run(req).await;
    };
    if req.uri().path().ends_with("/auth/token") {
        state.control.token.fetch_add(1, Ordering::SeqCst);
    } else {
        state.control.management[i].fetch_add(1, Ordering::SeqCst);
    }
    let f = state
        .control
        .faults
        .lock()
        .expect("faults")
        .get(i)
        .cloned()
        .unwrap_or_default();
    if f.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.latency_ms)).await;
    }
    if f.hang {
        // Long enough for any client timeout; the server task is aborted on shutdown.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if f.rate_limit_ratio > 0.0 && rand::random::<f64>() < f.rate_limit_ratio {
        let mut r = provider_error(provider, StatusCode::TOO_MANY_REQUESTS, "Too many requests");
        if let Some(s) = f.retry_after_secs {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                s.to_string().parse().expect("digits"),
            );
        }
        return r;
    }
    if f.error_ratio > 0.0 && rand::random::<f64>() < f.error_ratio {
        let status = f
            .error_status
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return provider_error(provider, status, "Internal server error");
    }
    next.run(req).await
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
            Json(json!({"management": s.control.management[i].load(Ordering::SeqCst), "token": token}))
                .into_response()
        }
        Err(r) => r,
    }
}

async fn reset_calls(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match api_provider(&name) {
        Ok((p, i)) => {
            s.control.management[i].store(0, Ordering::SeqCst);
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

/// Result of firing an event: one entry per hook URL it was delivered to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub url: String,
    /// The receiver's HTTP status; 0 when it could not be reached.
    pub status: u16,
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
