//! The faults a simulator can be told to inject, the per-provider middleware that counts
//! management calls and applies them, and what firing an event returns. A leaf: the
//! simulators and `/_control/` both use it, and it uses neither.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::wire::Provider;

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
    /// Added before every answer, before the handler runs.
    pub latency_ms: u64,
    /// Added after the handler ran (a registration is stored, so the provider may already
    /// send to it) and before the answer leaves: a provider that answers slowly.
    pub answer_delay_ms: u64,
    /// Never answer (the caller's timeout must fire).
    pub hang: bool,
}

/// Management and token calls per provider, and the faults set for each.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) management: [AtomicU64; 3],
    /// The management calls that may change something (every method but GET and HEAD).
    pub(crate) writes: [AtomicU64; 3],
    pub(crate) token: AtomicU64,
    pub(crate) faults: Mutex<[Faults; 3]>,
}

pub(crate) fn slot(p: Provider) -> Option<usize> {
    match p {
        Provider::Atlas => Some(0),
        Provider::Atomic => Some(1),
        Provider::Smallest => Some(2),
        Provider::Atllas => None,
    }
}

/// A simulator's own error shape, for the failures it injects.
pub(crate) type ErrorShape = fn(StatusCode, &str) -> Response;

/// Counts the call, then applies the provider's faults, answering in `error`'s shape.
pub(crate) async fn faults_layer(
    State((counters, provider, error)): State<(Arc<Counters>, Provider, ErrorShape)>,
    req: Request,
    next: Next,
) -> Response {
    let Some(i) = slot(provider) else {
        return next.run(req).await;
    };
    if req.uri().path().ends_with("/auth/token") {
        counters.token.fetch_add(1, Ordering::SeqCst);
    } else {
        counters.management[i].fetch_add(1, Ordering::SeqCst);
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            counters.writes[i].fetch_add(1, Ordering::SeqCst);
        }
    }
    let f = counters
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
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
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
        return error(status, "Internal server error");
    }
    let answer = next.run(req).await;
    if f.answer_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.answer_delay_ms)).await;
    }
    answer
}

/// Where a fired event goes: the registered hook URL, or, when the fire request names a
/// `baseUrl` (`http://host:port`), the same path and query on that origin (a test aiming
/// at one replica of several behind one published URL).
pub(crate) fn target(hook_url: &str, req: &serde_json::Value) -> String {
    let Some(base) = req.get("baseUrl").and_then(serde_json::Value::as_str) else {
        return hook_url.to_string();
    };
    match reqwest::Url::parse(hook_url) {
        Ok(u) => {
            let query = u.query().map(|q| format!("?{q}")).unwrap_or_default();
            format!("{}{}{query}", base.trim_end_matches('/'), u.path())
        }
        Err(_) => hook_url.to_string(),
    }
}

/// Result of firing an event: one entry per hook URL it was delivered to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Delivery {
    pub url: String,
    /// The receiver's HTTP status; 0 when it could not be reached.
    pub status: u16,
    /// The HTTP method it was sent by, where the provider lets a webhook choose (Atomic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}
