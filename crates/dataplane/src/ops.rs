//! The operations server: `/metrics` (Prometheus text), `/healthz` (the process answers
//! and its own queue can write, see [`crate::queue::Queue::check_live`]),
//! `/readyz` (the ingress routes are loaded, and the queue is open and commits a write).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::ingress::RouteTable;
use crate::metrics::Metrics;
use crate::queue::Queue;

#[derive(Clone)]
struct Ops {
    queue: Arc<dyn Queue>,
    routes: Arc<RouteTable>,
    metrics: Arc<Metrics>,
}

pub(super) fn router(
    queue: Arc<dyn Queue>,
    routes: Arc<RouteTable>,
    metrics: Arc<Metrics>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(Ops {
            queue,
            routes,
            metrics,
        })
}

async fn metrics_handler(State(ops): State<Ops>) -> impl IntoResponse {
    ops.metrics.set_queue_depth(ops.queue.depth());
    if let Some((keys, evicted)) = ops.queue.dedupe_stats() {
        ops.metrics.set_dedupe(keys, evicted);
    }
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.encode(),
    )
}

/// Fails when the queue cannot write in a way only a restart mends (closed, an I/O error,
/// a write that fails). A write that is merely slow (a busy disk) is not a failure here:
/// readiness reports it.
async fn live(State(ops): State<Ops>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), ops.queue.check_live()).await {
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "liveness: the queue cannot write");
            (StatusCode::SERVICE_UNAVAILABLE, "queue cannot write")
        }
        _ => (StatusCode::OK, "ok"),
    }
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    if !ops.routes.is_loaded() {
        return (StatusCode::SERVICE_UNAVAILABLE, "ingress routes loading");
    }
    match tokio::time::timeout(Duration::from_secs(2), ops.queue.check_writable()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "queue not writable"),
    }
}
