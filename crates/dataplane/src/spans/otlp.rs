//! A small OTLP/HTTP exporter: spans as OTLP JSON (`ExportTraceServiceRequest`), POSTed
//! to `<endpoint>/v1/traces` in batches from one background task. Written here rather than
//! taken from the OpenTelemetry SDK: the operator records four span kinds at points it
//! already controls, and this keeps the dependency tree (one HTTP client, one TLS stack)
//! as it is. Failed exports are not retried: their spans are counted as dropped.

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{Span, Value};

/// Most spans in one request.
const MAX_BATCH: usize = 512;
/// How long a batch waits for more spans after its first.
const FLUSH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `<endpoint>/v1/traces`, as the OTLP specification builds a signal's URL from
/// `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn traces_url(endpoint: &url::Url) -> anyhow::Result<url::Url> {
    if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host().is_none() {
        anyhow::bail!("the OTLP endpoint must be an http(s) URL");
    }
    // The configuration is logged at start-up: no credentials in it.
    if !endpoint.username().is_empty()
        || endpoint.password().is_some()
        || endpoint.query().is_some()
    {
        anyhow::bail!("the OTLP endpoint takes no user info or query");
    }
    let mut url = endpoint.clone();
    let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

/// A request to export everything buffered now, answered when done.
pub(super) type FlushRequest = oneshot::Sender<()>;

/// The exporter's inputs: spans, and flush requests.
pub(super) struct Inputs {
    pub spans: mpsc::Receiver<Span>,
    pub flushes: mpsc::Receiver<FlushRequest>,
}

struct Exporter {
    client: reqwest::Client,
    url: url::Url,
    exported: Counter,
    dropped: Counter,
}

pub(super) fn spawn(
    endpoint: &url::Url,
    inputs: Inputs,
    exported: Counter,
    dropped: Counter,
) -> anyhow::Result<()> {
    let url = traces_url(endpoint)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .user_agent(concat!("webhook-operator/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let exporter = Exporter {
        client,
        url,
        exported,
        dropped,
    };
    tokio::spawn(exporter.run(inputs));
    Ok(())
}

impl Exporter {
    /// Sends a batch once it is full or [`FLUSH_DELAY`] after its first span, and
    /// everything buffered when asked to flush. Ends when the tracer is gone.
    async fn run(self, mut inputs: Inputs) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let mut flush = None;
            tokio::select! {
                first = inputs.spans.recv() => match first {
                    Some(s) => batch.push(s),
                    None => return,
                },
                Some(ack) = inputs.flushes.recv() => flush = Some(ack),
            }
            if flush.is_none() {
                let delay = tokio::time::sleep(FLUSH_DELAY);
                tokio::pin!(delay);
                while batch.len() < MAX_BATCH {
                    tokio::select! {
                        next = inputs.spans.recv() => match next {
                            Some(s) => batch.push(s),
                            None => break,
                        },
                        Some(ack) = inputs.flushes.recv() => {
                            flush = Some(ack);
                            break;
                        }
                        _ = &mut delay => break,
                    }
                }
            }
            if flush.is_some() {
                while let Ok(s) = inputs.spans.try_recv() {
                    batch.push(s);
                }
            }
            for chunk in batch.chunks(MAX_BATCH) {
                self.export(chunk).await;
            }
            batch.clear();
            if let Some(ack) = flush {
                let _ = ack.send(());
            }
        }
    }

    /// One POST; its spans are counted as exported or dropped (no retry).
    async fn export(&self, spans: &[Span]) {
        let n = spans.len() as u64;
        let sent = self
            .client
            .post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(encode(spans))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                self.exported.inc_by(n);
            }
            Ok(r) => {
                self.dropped.inc_by(n);
                tracing::warn!(
                    status = r.status().as_u16(),
                    spans = n,
                    "span export refused"
                );
            }
            Err(_) => {
                self.dropped.inc_by(n);
                tracing::warn!(spans = n, "span export failed");
            }
        }
    }
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

fn value(v: &Value) -> serde_json::Value {
    match v {
        Value::Str(s) => json!({ "stringValue": s }),
        // OTLP JSON carries 64-bit integers as strings.
        Value::Int(i) => json!({ "intValue": i.to_string() }),
    }
}

/// One `ExportTraceServiceRequest` in OTLP JSON: ids in hex, times as decimal strings.
pub fn encode(spans: &[Span]) -> Vec<u8> {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": hex::encode(s.trace_id),
                "spanId": hex::encode(s.span_id),
                "name": s.name,
                "kind": s.kind as i32,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end.max(s.start)),
                "attributes": s.attributes.iter().map(|(k, v)| json!({"key": k, "value": value(v)})).collect::<Vec<_>>(),
                "status": { "code": if s.error { 2 } else { 0 } },
            });
            if let Some(p) = s.parent {
                span["parentSpanId"] = json!(hex::encode(p));
            }
            span
        })
        .collect();
    let request = json!({
        "resourceSpans": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": { "stringValue": "webhook-operator" } },
                { "key": "service.version", "value": { "stringValue": env!("CARGO_PKG_VERSION") } },
            ]},
            "scopeSpans": [{
                "scope": { "name": "webhook-operator" },
                "spans": spans,
            }],
        }],
    });
    serde_json::to_vec(&request).expect("JSON values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::Kind;

    #[test]
    fn the_traces_url_is_under_the_endpoint() {
        for (base, want) in [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            (
                "https://c.example/otlp/",
                "https://c.example/otlp/v1/traces",
            ),
        ] {
            let got = traces_url(&url::Url::parse(base).unwrap()).unwrap();
            assert_eq!(got.as_str(), want);
        }
        for bad in [
            "grpc://collector:4317",
            "http://user:pass@collector:4318",
            "http://collector:4318/?token=x",
        ] {
            assert!(traces_url(&url::Url::parse(bad).unwrap()).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn flush_sends_what_is_buffered_before_it_returns() {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<bytes::Bytes>::new()));
        let store = got.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: bytes::Bytes| {
                let store = store.clone();
                async move {
                    store.lock().unwrap().push(body);
                    http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let metrics = crate::metrics::Metrics::new();
        let endpoint = url::Url::parse(&format!("http://{addr}")).unwrap();
        let tracer = crate::spans::Tracer::otlp(&endpoint, &metrics).unwrap();
        let key = crate::queue::EndpointKey::new("apps", "orders");
        for _ in 0..3 {
            let span = tracer.receive(None, SystemTime::now()).unwrap();
            span.finish(&key, "calls", 200, 1);
        }
        // Well within the batch delay: only the flush can have sent them.
        let started = std::time::Instant::now();
        tracer.flush().await;
        assert!(started.elapsed() < FLUSH_DELAY);
        let exported: usize = got
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let v: serde_json::Value = serde_json::from_slice(b).unwrap();
                v["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(exported, 3);
        assert_eq!(metrics.spans_exported().get(), 3);
        // Disabled: returns at once.
        crate::spans::Tracer::disabled().flush().await;
    }

    #[test]
    fn encodes_otlp_json() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
        let body = encode(&[Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            name: "attempt",
            kind: Kind::Client,
            start: t0,
            end: t0 + Duration::from_millis(5),
            attributes: vec![("webhook.attempt", Value::Int(2))],
            error: true,
        }]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "01".repeat(16));
        assert_eq!(span["spanId"], "02".repeat(8));
        assert_eq!(span["parentSpanId"], "03".repeat(8));
        assert_eq!(span["kind"], 3);
        assert_eq!(span["startTimeUnixNano"], "1000000000");
        assert_eq!(span["endTimeUnixNano"], "1005000000");
        assert_eq!(span["attributes"][0]["value"]["intValue"], "2");
        assert_eq!(span["status"]["code"], 2);
    }
}
