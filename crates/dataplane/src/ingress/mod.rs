//! The ingress: the HTTP server providers POST to (`/hooks/{token}/{subscription}`).
//!
//! Per request: route lookup (404), body limit (413), verification and normalisation by the
//! provider's [`InboundParser`] (401/400/415/405), the endpoint's event-type filter,
//! durable enqueue, then 2xx; 503 when the queue cannot persist. Nothing unverified is
//! queued, and no answer is 2xx before the events are durable. Owns no provider format and
//! never calls the Kubernetes API.

pub mod dedupe;
pub mod kept_headers;
pub mod key_fetch;
mod limits;
mod rate;
mod routes;

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;

pub use dedupe::DedupeKey;
pub use limits::{ConcurrencyLimit, DiskSpace, Full, Limits};
pub use rate::{Bucket, RateLimit};
use routes::SubscriptionEntry;
pub use routes::{EndpointRoute, RouteTable, SubscriptionCounters};

use crate::health::HealthRegistry;
use crate::metrics::Metrics;
use crate::queue::{EnqueueOutcome, EventKind, NewEvent, Queue};
use webhook_providers::inbound::{InboundParser, InboundRequest, MalformedEvent, Rejection};

/// The event type of an unreadable batch element in the dead-letter store.
pub const MALFORMED_EVENT_TYPE: &str = "webhook-operator.malformed";

/// What the ingress handlers share.
pub struct Ingress {
    pub routes: Arc<RouteTable>,
    pub parser: Arc<dyn InboundParser>,
    pub queue: Arc<dyn Queue>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// Bounds on what waits (queue depth, free disk); see [`limits`].
    pub limits: Limits,
    /// Where an endpoint's `Backlogged` state is kept.
    pub health: Arc<HealthRegistry>,
    /// Requests handled at once; more are answered 503.
    pub concurrency: ConcurrencyLimit,
    /// A body not fully received within this is answered 408.
    pub body_read_timeout: std::time::Duration,
    /// Records the `receive` and `store` spans (disabled: records nothing).
    pub tracer: crate::spans::Tracer,
    /// Fetches a provider's current secret when a signature fails (see [`key_fetch`]).
    pub key_fetch: key_fetch::KeyFetcher,
}

impl Ingress {
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/hooks/{token}/{subscription}", any(hook))
            .with_state(self)
    }
}

fn reply(status: StatusCode, body: String) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

fn refuse(ing: &Ingress, status: StatusCode, reason: &'static str) -> Response {
    ing.metrics.rejected(reason);
    reply(status, format!("{{\"error\":\"{reason}\"}}"))
}

/// How long a client should wait before retrying while the routes load.
const LOADING_RETRY_AFTER_SECONDS: &str = "1";

/// 404 for a route that does not exist; while the routes of the objects that existed at
/// start-up are still loading, the route may just not be there yet: 503 with
/// `Retry-After`, so a provider retries rather than drops the event.
fn unknown(ing: &Ingress, reason: &'static str) -> Response {
    if ing.routes.is_loaded() {
        return refuse(ing, StatusCode::NOT_FOUND, reason);
    }
    let mut response = refuse(ing, StatusCode::SERVICE_UNAVAILABLE, "routes_loading");
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static(LOADING_RETRY_AFTER_SECONDS),
    );
    response
}

async fn hook(
    State(ing): State<Arc<Ingress>>,
    Path((token, subscription)): Path<(String, String)>,
    request: Request,
) -> Response {
    let started = ing.tracer.is_on().then(SystemTime::now);
    let Some(_slot) = ing.concurrency.take() else {
        return ing.concurrency.overloaded();
    };
    // The whole body gets `body_read_timeout` from the moment the headers are in: a
    // client that sends one byte a second is cut off, however steadily it sends.
    let body_deadline = tokio::time::Instant::now() + ing.body_read_timeout;
    // Which methods a provider may use is the provider parser's call (Atomic delivers by
    // PUT when configured, Atllas may send GET): the ingress accepts them all here.
    //
    // The same answer for an unknown token and an unknown subscription: a prober learns
    // nothing about which tokens exist.
    let Some(route) = ing.routes.lookup(&token) else {
        return unknown(&ing, "unknown_endpoint");
    };
    let Some(sub) = route.subscription(&subscription) else {
        return unknown(&ing, "unknown_subscription");
    };
    if let Some(refused) = rate::check(&ing, &route) {
        return refused;
    }
    if let Some(refused) = limits::admit(&ing, &route) {
        return refused;
    }
    let (parts, body) = request.into_parts();
    let body = match read_body(&ing, &parts.headers, body, body_deadline).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let inbound = InboundRequest {
        method: &parts.method,
        headers: &parts.headers,
        query: parts.uri.query(),
        body: &body,
    };
    let parsed = match parse_verified(&ing, &route, &sub, &subscription, &inbound).await {
        Ok(parsed) => parsed,
        Err(refused) => return refused,
    };
    let now = SystemTime::now();
    let (span, traceparent) = receive_span(&ing, started, &parts.headers);
    // Only an endpoint with a `spec.filter` reads them later: others store none. A
    // `spec.dedupe` key reads them now.
    let headers = if route.keep_headers || route.dedupe.is_some() {
        kept_headers::kept(&parts.headers, sub.keys.header_name.as_deref())
    } else {
        String::new()
    };
    let received = parsed.events.len() as u64;
    sub.counters.add(received, now);
    route.metrics.received.inc_by(received);
    let malformed = parsed.malformed.len() as u64;
    let batch = to_batch(&route, &subscription, parsed, now, traceparent, headers);
    let filtered = received + malformed - batch.len() as u64;
    route.metrics.filtered.inc_by(filtered);
    if malformed > 0 {
        tracing::warn!(endpoint = %route.key, subscription = %subscription, malformed, "kept unreadable batch elements as dead letters");
        route.metrics.malformed.inc_by(malformed);
    }
    store(
        &ing,
        &route,
        &subscription,
        batch,
        span,
        filtered,
        malformed,
    )
    .await
}

/// The provider's parser's reading of the request, verified with the route's keys; on a
/// signature failure of a provider that issues its own secret, verified again after one
/// bounded fetch of the current secret (the provider may sign with a secret the route
/// does not hold yet). `Err` is the answer to a request still refused.
async fn parse_verified(
    ing: &Ingress,
    route: &EndpointRoute,
    sub: &SubscriptionEntry,
    subscription: &str,
    inbound: &InboundRequest<'_>,
) -> Result<webhook_providers::inbound::Parsed, Response> {
    let rejection = match ing.parser.parse(sub.provider, &sub.keys, inbound) {
        Ok(parsed) => return Ok(parsed),
        Err(rejection) => rejection,
    };
    if !(rejection.is_signature_failure() && ing.key_fetch.applies(sub.provider)) {
        return Err(rejected(ing, route, sub, subscription, &rejection));
    }
    let again = ing
        .key_fetch
        .verify_again(
            &sub.fetch,
            &ing.metrics,
            key_fetch::Subject {
                provider: sub.provider,
                endpoint: &route.key,
                subscription,
            },
            &sub.keys,
            |keys| ing.parser.parse(sub.provider, keys, inbound),
        )
        .await;
    again
        .unwrap_or(Err(rejection))
        .map_err(|rejection| rejected(ing, route, sub, subscription, &rejection))
}

/// Answers a request the provider's parser refused, counting a signature failure.
fn rejected(
    ing: &Ingress,
    route: &EndpointRoute,
    sub: &SubscriptionEntry,
    subscription: &str,
    rejection: &Rejection,
) -> Response {
    ing.metrics.rejected(rejection.reason());
    if rejection.is_signature_failure() {
        sub.counters.signature_failure(SystemTime::now());
        ing.metrics.signature_mismatch(&route.key, subscription);
    }
    reply(
        rejection.status(),
        format!("{{\"error\":\"{}\"}}", rejection.reason()),
    )
}

/// The request's `receive` span (with tracing on, from `started`) and the traceparent its
/// events keep: the span's, else the incoming header, kept only when valid so that a
/// delivery never forwards a malformed header.
fn receive_span(
    ing: &Ingress,
    started: Option<SystemTime>,
    headers: &http::HeaderMap,
) -> (Option<crate::spans::Receive>, Option<String>) {
    let incoming = headers
        .get(crate::trace_context::HEADER)
        .and_then(|v| v.to_str().ok());
    let span = started.and_then(|start| ing.tracer.receive(incoming, start));
    let traceparent = match &span {
        Some(span) => Some(span.stored_traceparent()),
        None => incoming
            .filter(|v| crate::trace_context::parse(v).is_some())
            .map(crate::trace_context::normalize),
    };
    (span, traceparent)
}

/// Stores a request's events in one commit and answers the provider: 200 with what was
/// accepted, or 503 when the queue refuses.
async fn store(
    ing: &Ingress,
    route: &EndpointRoute,
    subscription: &str,
    batch: Vec<NewEvent>,
    span: Option<crate::spans::Receive>,
    filtered: u64,
    malformed: u64,
) -> Response {
    let offered = batch.len();
    let store_start = span.as_ref().map(|_| SystemTime::now());
    let stored = ing.queue.enqueue(batch).await;
    if let (Some(span), Some(start)) = (&span, store_start) {
        span.store(start, offered, stored.is_ok());
    }
    let outcomes = match stored {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(endpoint = %route.key, error = %e, "queue refused events");
            if let Some(span) = span {
                span.finish(&route.key, subscription, 503, 0);
            }
            return refuse(ing, StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable");
        }
    };
    let duplicates = outcomes
        .iter()
        .filter(|o| **o == EnqueueOutcome::Duplicate)
        .count() as u64;
    let accepted = outcomes.len() as u64 - duplicates - malformed;
    route.metrics.queued.inc_by(accepted);
    route.metrics.duplicates.inc_by(duplicates);
    if let Some(span) = span {
        span.finish(&route.key, subscription, 200, accepted);
    }
    reply(
        StatusCode::OK,
        format!(
            "{{\"accepted\":{accepted},\"duplicates\":{duplicates},\"filtered\":{filtered},\"malformed\":{malformed}}}"
        ),
    )
}

/// The request's body, refused when its length passes `max_body_bytes` or it is not in
/// by `deadline`.
async fn read_body(
    ing: &Ingress,
    headers: &http::HeaderMap,
    body: axum::body::Body,
    deadline: tokio::time::Instant,
) -> Result<bytes::Bytes, Response> {
    if headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > ing.max_body_bytes)
    {
        return Err(refuse(ing, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    }
    let read = tokio::time::timeout_at(deadline, read_limited(body, ing.max_body_bytes));
    read.await
        .unwrap_or(Err("body_timeout"))
        .map_err(|reason| refuse(ing, body_refusal_status(reason), reason))
}

/// What a request stores: the parsed events the endpoint's `eventTypes` keep, then the
/// unreadable elements, all in the request's trace and with its kept headers.
fn to_batch(
    route: &EndpointRoute,
    subscription: &str,
    parsed: webhook_providers::inbound::Parsed,
    now: SystemTime,
    traceparent: Option<String>,
    headers: String,
) -> Vec<NewEvent> {
    let mut batch = Vec::with_capacity(parsed.events.len() + parsed.malformed.len());
    for ev in parsed.events {
        if !route.event_types.is_empty() && !route.event_types.contains(&ev.event_type) {
            continue;
        }
        let (dedupe_key, dedupe_window) = if ev.test {
            (EventKind::test_key(&ev.dedupe_key), None)
        } else {
            own_dedupe_key(route, subscription, &ev, &headers)
        };
        batch.push(NewEvent {
            endpoint: route.key.clone(),
            subscription: subscription.to_string(),
            event_type: ev.event_type,
            dedupe_key,
            dedupe_window,
            payload: ev.payload,
            received: now,
            traceparent: traceparent.clone(),
            headers: if route.keep_headers {
                headers.clone()
            } else {
                String::new()
            },
        });
    }
    batch.extend(parsed.malformed.into_iter().map(|m| NewEvent {
        // In the request's trace, so its dead-letter span joins the others.
        traceparent: traceparent.clone(),
        ..malformed_event(&route.key, subscription, m, now)
    }));
    batch
}

/// The key and window the queue dedupes a provider's event on: the endpoint's
/// `spec.dedupe` when it has one and it gives a key for this event, else the provider's id
/// (and the failure is counted; the error is not logged, it may quote the payload).
fn own_dedupe_key(
    route: &EndpointRoute,
    subscription: &str,
    ev: &webhook_providers::inbound::InboundEvent,
    headers: &str,
) -> (String, Option<std::time::Duration>) {
    let Some(dedupe) = &route.dedupe else {
        return (ev.dedupe_key.clone(), None);
    };
    match dedupe.key(&ev.payload, &ev.event_type, subscription, headers) {
        Ok(key) => (key, dedupe.window),
        Err(_) => {
            route.metrics.dedupe_key_errors.inc();
            (ev.dedupe_key.clone(), None)
        }
    }
}

/// An unreadable batch element as a queue entry that delivery moves straight to the
/// dead-letter store (see [`EventKind::Malformed`]). Keyed by its content, so a provider's
/// retry of the same batch does not store it twice.
fn malformed_event(
    endpoint: &crate::queue::EndpointKey,
    subscription: &str,
    m: MalformedEvent,
    now: SystemTime,
) -> NewEvent {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&m.raw);
    NewEvent {
        endpoint: endpoint.clone(),
        subscription: subscription.to_string(),
        event_type: MALFORMED_EVENT_TYPE.to_string(),
        dedupe_key: EventKind::malformed_key(m.reason, &hex::encode(&digest[..16])),
        dedupe_window: None,
        payload: m.raw,
        received: now,
        traceparent: None,
        headers: String::new(),
    }
}

fn body_refusal_status(reason: &str) -> StatusCode {
    match reason {
        "body_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "body_timeout" => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// A body whose connection failed part-way (its deadline is the caller's `timeout_at`).
fn body_unreadable(_: axum::Error) -> &'static str {
    "body_unreadable"
}

/// Reads the body, stopping as soon as it passes `max` (a chunked body has no
/// Content-Length to refuse it by up front).
async fn read_limited(body: axum::body::Body, max: usize) -> Result<bytes::Bytes, &'static str> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let Some(first) = stream.next().await else {
        return Ok(bytes::Bytes::new());
    };
    let first = first.map_err(body_unreadable)?;
    if first.len() > max {
        return Err("body_too_large");
    }
    let mut rest = match stream.next().await {
        // The common case: one chunk, no copy.
        None => return Ok(first),
        Some(next) => next.map_err(body_unreadable)?,
    };
    let mut buf = bytes::BytesMut::with_capacity((first.len() + rest.len()).max(8192));
    buf.extend_from_slice(&first);
    loop {
        if buf.len() + rest.len() > max {
            return Err("body_too_large");
        }
        buf.extend_from_slice(&rest);
        rest = match stream.next().await {
            None => return Ok(buf.freeze()),
            Some(next) => next.map_err(body_unreadable)?,
        };
    }
}
