//! The headers of one delivery: content type, Standard Webhooks signing, and in the
//! `cloudevents` format the CloudEvents 1.0 binary-mode attributes. Pure: the worker
//! sends what this builds.

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::SigningSecret;
use crate::queue::QueuedEvent;

/// How a delivery is shaped on the wire (`spec.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeliveryFormat {
    /// The provider payload plus Standard Webhooks headers.
    #[default]
    Default,
    /// CloudEvents 1.0, HTTP binary content mode; `ce-id` is the stable `webhook-id`.
    Cloudevents,
}

/// `ce-type` when the provider gave the event no type.
const FALLBACK_TYPE: &str = "dev.webhook-operator.event";

/// The delivery headers for `ev` sent at `ts` (Unix seconds) in the span `traceparent`
/// names: the endpoint's configured `base` headers, then those owned by the operator
/// (which win on a clash).
pub(crate) fn headers(
    format: DeliveryFormat,
    base: &HeaderMap,
    secrets: &[SigningSecret],
    ev: &QueuedEvent,
    ts: i64,
    traceparent: &str,
) -> HeaderMap {
    // Room for the operator's own headers (five, five more for CloudEvents, and the
    // client's `user-agent` and `host`), so the map is allocated once.
    let mut h = HeaderMap::with_capacity(base.len() + 12);
    for (name, value) in base {
        h.append(name.clone(), value.clone());
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set("content-type", "application/json");
    set(crate::trace_context::HEADER, traceparent);
    set("webhook-id", &ev.id);
    set("webhook-timestamp", &ts.to_string());
    set(
        "webhook-signature",
        &super::signature_header(secrets, &ev.id, ts, &ev.payload),
    );
    if format == DeliveryFormat::Cloudevents {
        set("ce-specversion", "1.0");
        set("ce-id", &ev.id);
        set("ce-source", &cloudevents_source(ev));
        let ty = if ev.event_type.is_empty() {
            FALLBACK_TYPE
        } else {
            &ev.event_type
        };
        set("ce-type", ty);
        set("ce-time", &rfc3339(ev.received));
    }
    h
}

/// `ce-source`: a URI reference naming the subscription the event came in through,
/// `/namespaces/<namespace>/webhooksubscriptions/<subscription>`, unique in a cluster.
pub(crate) fn cloudevents_source(ev: &QueuedEvent) -> String {
    format!(
        "/namespaces/{}/webhooksubscriptions/{}",
        ev.endpoint.namespace, ev.subscription
    )
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_string()
}
