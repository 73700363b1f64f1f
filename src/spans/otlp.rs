//! A small OTLP/HTTP exporter: spans as OTLP JSON (`ExportTraceServiceRequest`), POSTed
//! to `<endpoint>/v1/traces` in batches from one background task. Written here rather than
//! taken from the OpenTelemetry SDK: the operator records four span kinds at points it
//! already controls, and this keeps the dependency tree (one HTTP client, one TLS stack)
//! as it is. Failed exports are not retried: their spans are counted as dropped.

use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use tokio::sync::mpsc;

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

pub(super) fn spawn(
    endpoint: &url::Url,
    mut rx: mpsc::Receiver<Span>,
    exported: Counter,
    dropped: Counter,
) -> anyhow::Result<()> {
    let url = traces_url(endpoint)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .user_agent(concat!("webhook-operator/", env!("CARGO_PKG_VERSION")))
        .build()?;
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let flush = tokio::time::sleep(FLUSH_DELAY);
            tokio::pin!(flush);
            while batch.len() < MAX_BATCH {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(s) => batch.push(s),
                        None => break,
                    },
                    _ = &mut flush => break,
                }
            }
            let n = batch.len() as u64;
            let body = encode(&batch);
            batch.clear();
            let sent = client
                .post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    exported.inc_by(n);
                }
                Ok(r) => {
                    dropped.inc_by(n);
                    tracing::warn!(
                        status = r.status().as_u16(),
                        spans = n,
                        "span export refused"
                    );
                }
                Err(_) => {
                    dropped.inc_by(n);
                    tracing::warn!(spans = n, "span export failed");
                }
            }
        }
    });
    Ok(())
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
