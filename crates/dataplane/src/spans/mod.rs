//! Span export: with an OTLP endpoint configured, each event's path is recorded as spans
//! (`receive` → `store`, then `deliver` with one `attempt` child per HTTP request) and
//! exported by [`otlp`]. Off by default: a disabled [`Tracer`] is a `None`, checked once
//! per request and once per attempt, and nothing is allocated or recorded behind it.
//!
//! The spans of one event share the trace id the destination sees in `traceparent`
//! ([`crate::trace_context::event_trace`]), and are linked through the trace context kept
//! with the event in the queue: with tracing on, the ingress stores the `receive` span as
//! the parent, so a delivery in a later process lifetime still hangs under it. The
//! `deliver` span id is derived from the trace and event ids, so attempts made before and
//! after a restart share one parent. Attributes carry names, counts and status codes
//! only: never a URL (the ingress path holds the endpoint's token), a header value or a
//! payload.

pub mod otlp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use sha2::Digest;
use tokio::sync::mpsc;

use crate::queue::{EndpointKey, QueuedEvent};
use crate::trace_context::{self, TraceParent};

/// A span's role, as OTLP numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: &'static str,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
}

/// Spans waiting for export; when full, new spans are dropped and counted, so recording
/// never waits.
const BUFFER: usize = 4096;
/// Events whose `deliver` span start is remembered at once; past it a span starts at the
/// attempt that ends it.
const MAX_OPEN_DELIVERIES: usize = 65_536;

/// Where spans go, if anywhere. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<Recorder>>);

/// The enabled side of a [`Tracer`].
pub struct Recorder {
    tx: mpsc::Sender<Span>,
    flushes: mpsc::Sender<otlp::FlushRequest>,
    dropped: Counter,
    /// When each event under delivery was first leased in this process.
    open: Mutex<HashMap<String, SystemTime>>,
}

impl Tracer {
    /// Records nothing.
    pub fn disabled() -> Self {
        Self(None)
    }

    /// Exports to the OTLP/HTTP endpoint `endpoint` (its `/v1/traces`) from a background
    /// task. Must be called inside a Tokio runtime.
    pub fn otlp(endpoint: &url::Url, metrics: &crate::metrics::Metrics) -> anyhow::Result<Self> {
        let (tracer, inputs) = Self::with_inputs(BUFFER, metrics.spans_dropped());
        otlp::spawn(
            endpoint,
            inputs,
            metrics.spans_exported(),
            metrics.spans_dropped(),
        )?;
        Ok(tracer)
    }

    /// An enabled tracer and the exporter's end of its channels.
    fn with_inputs(capacity: usize, dropped: Counter) -> (Self, otlp::Inputs) {
        let (tx, spans) = mpsc::channel(capacity);
        let (flush_tx, flushes) = mpsc::channel(1);
        let rec = Recorder {
            tx,
            flushes: flush_tx,
            dropped,
            open: Mutex::default(),
        };
        (Self(Some(Arc::new(rec))), otlp::Inputs { spans, flushes })
    }

    /// An enabled tracer whose spans go to the returned receiver.
    #[cfg(test)]
    fn buffered(capacity: usize, dropped: Counter) -> (Self, mpsc::Receiver<Span>) {
        let (tracer, inputs) = Self::with_inputs(capacity, dropped);
        (tracer, inputs.spans)
    }

    /// Exports what is buffered and returns once the exporter has sent it (at shutdown,
    /// so the last spans are not lost). Returns at once when disabled.
    pub async fn flush(&self) {
        let Some(rec) = &self.0 else { return };
        let (ack, done) = tokio::sync::oneshot::channel();
        if rec.flushes.send(ack).await.is_ok() {
            let _ = done.await;
        }
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The `receive` span of a verified ingress request that began at `start`, continuing
    /// the provider's `traceparent` when it sent a valid one. `None` when disabled.
    pub fn receive(&self, incoming: Option<&str>, start: SystemTime) -> Option<Receive> {
        let rec = self.0.as_ref()?;
        let parent = incoming.and_then(trace_context::parse);
        let trace = match parent {
            Some(p) => p,
            None => TraceParent {
                trace_id: rand::random(),
                parent_id: [0; 8],
                flags: 1,
            },
        };
        Some(Receive {
            rec: rec.clone(),
            trace,
            span_id: trace_context::new_span_id(),
            start,
        })
    }

    /// The `deliver` span of `ev`, begun at this lease or continued from an earlier one
    /// in this process. `None` when disabled or when the event's trace is not sampled.
    pub fn deliver(&self, ev: &QueuedEvent) -> Option<Deliver> {
        let rec = self.0.as_ref()?;
        let now = SystemTime::now();
        let trace = trace_context::event_trace(ev.traceparent.as_deref(), &ev.id);
        if !trace.sampled() {
            return None;
        }
        let start = {
            let mut open = rec.open.lock().expect("open deliveries lock");
            match open.get(&ev.id) {
                Some(t) => *t,
                None => {
                    if open.len() < MAX_OPEN_DELIVERIES {
                        open.insert(ev.id.clone(), now);
                    }
                    now
                }
            }
        };
        Some(Deliver {
            rec: rec.clone(),
            trace,
            span_id: deliver_span_id(&trace.trace_id, &ev.id),
            event_id: ev.id.clone(),
            start,
        })
    }
}

impl Recorder {
    fn record(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// Stable across attempts and restarts, distinct per event.
fn deliver_span_id(trace_id: &[u8; 16], event_id: &str) -> [u8; 8] {
    let mut h = sha2::Sha256::new();
    h.update(trace_id);
    h.update(event_id.as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

fn endpoint_attr(key: &EndpointKey) -> Value {
    Value::Str(format!("{}/{}", key.namespace, key.name))
}

/// The `receive` span of one ingress request (see [`Tracer::receive`]).
pub struct Receive {
    rec: Arc<Recorder>,
    trace: TraceParent,
    span_id: [u8; 8],
    start: SystemTime,
}

impl Receive {
    /// The trace context the request's events are stored with: this span as their
    /// parent, or the provider's own value when it asked not to be sampled.
    pub fn stored_traceparent(&self) -> String {
        if self.trace.sampled() {
            self.trace.header(self.span_id)
        } else {
            self.trace.header(self.trace.parent_id)
        }
    }

    /// Records the `store` child span: `events` offered to the queue from `start` to now.
    pub fn store(&self, start: SystemTime, events: usize, stored: bool) {
        if !self.trace.sampled() {
            return;
        }
        self.rec.record(Span {
            trace_id: self.trace.trace_id,
            span_id: trace_context::new_span_id(),
            parent: Some(self.span_id),
            name: "store",
            kind: Kind::Internal,
            start,
            end: SystemTime::now(),
            attributes: vec![("webhook.events", Value::Int(events as i64))],
            error: !stored,
        });
    }

    /// Ends the span with the answer given to the provider.
    pub fn finish(self, endpoint: &EndpointKey, subscription: &str, status: u16, events: u64) {
        if !self.trace.sampled() {
            return;
        }
        self.rec.record(Span {
            trace_id: self.trace.trace_id,
            span_id: self.span_id,
            parent: self.trace.parent(),
            name: "receive",
            kind: Kind::Server,
            start: self.start,
            end: SystemTime::now(),
            attributes: vec![
                ("webhook.endpoint", endpoint_attr(endpoint)),
                ("webhook.subscription", Value::Str(subscription.to_owned())),
                ("webhook.events", Value::Int(events as i64)),
                ("http.response.status_code", Value::Int(i64::from(status))),
            ],
            error: status >= 500,
        });
    }
}

/// How one delivery attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    DeadLetter,
}

impl AttemptOutcome {
    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::DeadLetter => "dead_letter",
        }
    }
}

/// The `deliver` span of one event (see [`Tracer::deliver`]).
pub struct Deliver {
    rec: Arc<Recorder>,
    trace: TraceParent,
    span_id: [u8; 8],
    event_id: String,
    start: SystemTime,
}

impl Deliver {
    /// The trace the attempts' `traceparent` headers carry.
    pub fn trace(&self) -> &TraceParent {
        &self.trace
    }

    /// Records one HTTP attempt, made in span `span_id` (the one its `traceparent`
    /// named) from `start` to now. `status`: the destination's answer, if any; `error`: a
    /// fixed failure class (`HTTP 500`, `timeout`), never a message from the peer.
    pub fn attempt(
        &self,
        span_id: [u8; 8],
        start: SystemTime,
        number: u32,
        status: Option<u16>,
        outcome: AttemptOutcome,
        error: Option<&str>,
    ) {
        let mut attributes = vec![
            ("http.request.method", Value::Str("POST".into())),
            ("webhook.attempt", Value::Int(i64::from(number))),
            ("webhook.outcome", Value::Str(outcome.as_str().into())),
        ];
        if let Some(s) = status {
            attributes.push(("http.response.status_code", Value::Int(i64::from(s))));
        }
        if let Some(e) = error {
            attributes.push(("error.type", Value::Str(e.to_owned())));
        }
        self.rec.record(Span {
            trace_id: self.trace.trace_id,
            span_id,
            parent: Some(self.span_id),
            name: "attempt",
            kind: Kind::Client,
            start,
            end: SystemTime::now(),
            attributes,
            error: outcome != AttemptOutcome::Delivered,
        });
    }

    /// Ends the span: the event was acknowledged (`delivered`, `filtered`) or moved to the
    /// dead-letter store (`dead_lettered`) after `attempts` attempts.
    pub fn finish(self, ev: &QueuedEvent, outcome: &'static str, attempts: u32) {
        self.rec
            .open
            .lock()
            .expect("open deliveries lock")
            .remove(&self.event_id);
        self.rec.record(Span {
            trace_id: self.trace.trace_id,
            span_id: self.span_id,
            parent: self.trace.parent(),
            name: "deliver",
            kind: Kind::Internal,
            start: self.start,
            end: SystemTime::now(),
            attributes: vec![
                ("webhook.endpoint", endpoint_attr(&ev.endpoint)),
                ("webhook.subscription", Value::Str(ev.subscription.clone())),
                ("webhook.event_type", Value::Str(ev.event_type.clone())),
                ("webhook.attempts", Value::Int(i64::from(attempts))),
                ("webhook.outcome", Value::Str(outcome.into())),
            ],
            error: outcome == "dead_lettered",
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn event(traceparent: Option<&str>) -> QueuedEvent {
        QueuedEvent {
            receipt: crate::queue::Receipt(0),
            id: "msg_1".into(),
            endpoint: EndpointKey::new("apps", "orders"),
            subscription: "calls".into(),
            event_type: "call_completed".into(),
            dedupe_key: "k".into(),
            kind: crate::queue::EventKind::Provider,
            payload: bytes::Bytes::from_static(b"{}"),
            received: SystemTime::now(),
            attempts: 0,
            next_attempt: SystemTime::now(),
            last_error: None,
            traceparent: traceparent.map(str::to_owned),
            headers: String::new(),
        }
    }

    #[test]
    fn a_disabled_tracer_records_nothing() {
        let t = Tracer::disabled();
        assert!(!t.is_on());
        assert!(t.receive(Some(INCOMING), SystemTime::now()).is_none());
        assert!(t.deliver(&event(None)).is_none());
        // The default is the disabled one.
        assert!(!Tracer::default().is_on());
    }

    #[tokio::test]
    async fn receive_continues_the_provider_and_parents_what_is_stored() {
        let dropped = Counter::default();
        let (t, mut rx) = Tracer::buffered(16, dropped.clone());
        let r = t.receive(Some(INCOMING), SystemTime::now()).unwrap();
        let stored = trace_context::parse(&r.stored_traceparent()).unwrap();
        assert_eq!(
            hex::encode(stored.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        r.store(SystemTime::now(), 1, true);
        let receive_id = r.span_id;
        r.finish(&EndpointKey::new("apps", "orders"), "calls", 200, 1);
        let store = rx.recv().await.unwrap();
        let receive = rx.recv().await.unwrap();
        assert_eq!((store.name, store.parent), ("store", Some(receive_id)));
        assert_eq!(receive.parent.map(hex::encode).unwrap(), "00f067aa0ba902b7");
        assert_eq!(
            stored.parent_id, receive_id,
            "stored events hang under receive"
        );

        // The deliver span of the stored event: same trace, child of receive.
        let stored_ev = event(Some(&r_header(&stored)));
        let d = t.deliver(&stored_ev).unwrap();
        d.finish(&stored_ev, "delivered", 1);
        let deliver = rx.recv().await.unwrap();
        assert_eq!(deliver.trace_id, stored.trace_id);
        assert_eq!(deliver.parent, Some(receive_id));
        assert_eq!(dropped.get(), 0);
    }

    fn r_header(tp: &TraceParent) -> String {
        tp.header(tp.parent_id)
    }

    #[tokio::test]
    async fn unsampled_traces_record_nothing_and_keep_the_providers_parent() {
        let (t, mut rx) = Tracer::buffered(16, Counter::default());
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let r = t.receive(Some(unsampled), SystemTime::now()).unwrap();
        assert_eq!(r.stored_traceparent(), unsampled);
        r.store(SystemTime::now(), 1, true);
        r.finish(&EndpointKey::new("a", "b"), "s", 200, 1);
        assert!(t.deliver(&event(Some(unsampled))).is_none());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_full_buffer_drops_and_counts_without_waiting() {
        let dropped = Counter::default();
        let (t, _rx) = Tracer::buffered(1, dropped.clone());
        for _ in 0..3 {
            let r = t.receive(None, SystemTime::now()).unwrap();
            r.finish(&EndpointKey::new("a", "b"), "s", 200, 1);
        }
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn the_deliver_span_keeps_its_id_and_start_across_attempts() {
        let (t, _rx) = Tracer::buffered(16, Counter::default());
        let ev = event(None);
        let a = t.deliver(&ev).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = t.deliver(&ev).unwrap();
        assert_eq!(a.span_id, b.span_id);
        assert_eq!(
            b.start, a.start,
            "the second lease continues the first's span"
        );
        // The trace the destination sees for an event stored without one.
        assert_eq!(
            a.trace().trace_id,
            trace_context::event_trace(None, &ev.id).trace_id
        );
        a.finish(&ev, "delivered", 2);
        assert!(t.0.as_ref().unwrap().open.lock().unwrap().is_empty());
    }
}
