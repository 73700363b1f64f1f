//! Features proven in-process elsewhere, here through the real binary and the CRD: the
//! global event bound, the byte bounds (per endpoint and global) and the `429` of
//! `spec.ingressRateLimit`; a CEL `spec.filter`; `format: cloudevents` read by the
//! CloudEvents SDK; a provider's `traceparent` continued to the destination; the OTLP
//! export decoded by `opentelemetry-proto`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::delivery_e2e::{
    OperatorProcess, atlas_event, atlas_ready_url, consumer_destination, ingress_url,
    setup_to_consumer, setup_with,
};
use crate::fixtures::*;
use crate::ports::free_port;
use crate::support::wait_until;

async fn send(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Option<String>, String) {
    let mut req = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, r.text().await.unwrap_or_default())
}

fn padded(call_id: &str, pad: usize) -> Value {
    let mut ev = atlas_event(call_id);
    ev[0]["notes"] = json!("x".repeat(pad));
    ev
}

/// An Atlas subscription named `name` delivering to endpoint `endpoint`.
fn atlas_to(endpoint: &str) -> Value {
    let mut spec = specs()[0].1.clone();
    spec["endpointRef"] = json!({"name": endpoint});
    spec
}

async fn ready(ops: u16) {
    wait_until(
        Duration::from_secs(60),
        "the operator's /readyz",
        || async move {
            let r = reqwest::get(format!("http://127.0.0.1:{ops}/readyz"))
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
}

/// Events wait (the consumer refuses, retries are a minute apart) until a bound refuses the
/// next one: `--max-queued-events`, then, in a second run, `spec.maxQueuedBytes`,
/// `--max-queued-bytes`, and the `429` of `spec.ingressRateLimit`.
#[tokio::test]
async fn bounds_and_the_rate_limit_answer_through_the_binary() {
    let waiting = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"initialDelay": "60s", "maxDelay": "60s"}}});
    let ops = free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    let (env, sandbox, consumer, operator, _dir, _) = setup_with(
        "binbounds",
        waiting.clone(),
        &["--ops-addr", &ops_flag, "--max-queued-events", "2"],
    )
    .await;
    consumer.answer(503);
    let url = atlas_ready_url(&env).await;
    let path = url::Url::parse(&url).unwrap().path().to_string();
    for id in ["ev-1", "ev-2"] {
        assert_eq!(send(&url, &atlas_event(id), &[]).await.0, 200, "{id}");
    }
    let (status, retry_after, body) = send(&url, &atlas_event("ev-3"), &[]).await;
    println!("--max-queued-events 2, third event: {status} Retry-After {retry_after:?} {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("queue_backlogged"), "{body}");
    assert!(retry_after.is_some());
    drop(operator);

    // Second run, fresh queue: byte bounds and a rate limit.
    let mut orders = waiting.clone();
    orders["maxQueuedBytes"] = json!(2500);
    apply_endpoint(&env, "orders", orders).await;
    let mut other = waiting.clone();
    other["ingressRateLimit"] = json!({"requestsPerSecond": 1, "burst": 1});
    apply_endpoint(&env, "other", other).await;
    apply_subscription(&env, "atlas-other", atlas_to("other")).await;
    let (port, ops) = (free_port(), free_port());
    let ops_flag = format!("127.0.0.1:{ops}");
    let dir = tempfile::tempdir().unwrap();
    let _operator = OperatorProcess::start_with(
        &env,
        &sandbox,
        &consumer,
        port,
        dir.path(),
        &["--ops-addr", &ops_flag, "--max-queued-bytes", "3000"],
    );
    ready(ops).await;
    wait_condition(&env, "atlas-other", "Ready", "True", None).await;
    let base = format!("http://127.0.0.1:{port}");
    let url = format!("{base}{path}");
    let other_url = format!("{}/atlas-other", ingress_url(&env, "other").await);
    let other_url = format!("{base}{}", url::Url::parse(&other_url).unwrap().path());
    // Two events of about 2 KiB pass (each is checked before it is stored), the third
    // finds 4 KiB waiting for `orders`, over its 2500.
    for id in ["b-1", "b-2"] {
        assert_eq!(send(&url, &padded(id, 2000), &[]).await.0, 200, "{id}");
    }
    let (status, retry_after, body) = send(&url, &padded("b-3", 2000), &[]).await;
    println!("spec.maxQueuedBytes 2500: {status} Retry-After {retry_after:?} {body}");
    assert_eq!((status, retry_after.is_some()), (503, true), "{body}");
    assert!(body.contains("endpoint_bytes_backlogged"), "{body}");
    // `other` has nothing waiting, but all endpoints together are over 3000 bytes; its
    // rate limit (one a second, burst one) answers the next request at once with 429.
    let (status, _, body) = send(&other_url, &atlas_event("o-1"), &[]).await;
    println!("--max-queued-bytes 3000, another endpoint: {status} {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("queue_bytes_backlogged"), "{body}");
    let (status, retry_after, body) = send(&other_url, &atlas_event("o-2"), &[]).await;
    println!(
        "ingressRateLimit 1/s, burst 1, second request: {status} Retry-After {retry_after:?} {body}"
    );
    assert_eq!(status, 429, "{body}");
    assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)));
}

/// The CloudEvents SDK's consumer (`tests/conformance/cloudevents_consumer.py`) as the
/// destination of an endpoint with `format: cloudevents` and a CEL filter: the event the
/// filter drops never arrives, the other is parsed by the SDK, and the provider's
/// `traceparent` is continued (same trace id, a new span id).
#[tokio::test]
async fn a_cel_filter_cloudevents_and_traceparent_through_the_binary() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let python = crate::sdk::sdk_python_present("");
    let script = crate::sdk::conformance_script("cloudevents_consumer.py");
    let mut sdk_consumer = crate::process::spawn_piped(&python, &[script.as_str(), "2"]);
    let mut lines = tokio::io::BufReader::new(sdk_consumer.stdout.take().unwrap()).lines();
    let first = next_line(&mut lines, 30)
        .await
        .expect("the SDK consumer starts");
    let port: u16 = first.strip_prefix("listening ").unwrap().parse().unwrap();
    let spec = json!({
        "destination": {"url": format!("http://127.0.0.1:{port}/ce")},
        "format": "cloudevents",
        "filter": "payload.callId != 'dropped-by-filter'",
    });
    let (env, _sandbox, _consumer, _operator, _dir, _) = setup_with("bince", spec, &[]).await;
    let url = atlas_ready_url(&env).await;
    let incoming = format!("00-{TRACE}-00f067aa0ba902b7-01");
    assert_eq!(
        send(&url, &atlas_event("dropped-by-filter"), &[]).await.0,
        200
    );
    assert_eq!(
        send(&url, &atlas_event("kept"), &[("traceparent", &incoming)])
            .await
            .0,
        200
    );
    let line = next_line(&mut lines, 60)
        .await
        .expect("one delivery parsed by the SDK");
    println!("the CloudEvents SDK read: {line}");
    let got: Value = serde_json::from_str(&line).unwrap();
    assert!(got.get("error").is_none(), "the SDK refused: {line}");
    assert_eq!(got["specversion"], "1.0");
    assert_eq!(got["type"], "call_completed");
    assert_eq!(
        got["data"]["callId"], "kept",
        "the filter dropped the other: {line}"
    );
    assert_eq!(got["id"], got["webhook"]["webhook-id"], "{line}");
    let traceparent = got["traceparent"].as_str().unwrap_or_default();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent:?}");
    assert_eq!(
        parts[1], TRACE,
        "the provider's trace continues: {traceparent}"
    );
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "a span of the operator's own: {traceparent}"
    );
    // No second delivery: the filtered event (sent first) never reaches the destination.
    assert_eq!(
        next_line(&mut lines, 3).await,
        None,
        "a second delivery arrived"
    );
}

/// The next line the child printed, `None` at its end or after `secs`.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    secs: u64,
) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(secs), lines.next_line())
        .await
        .ok()
        .and_then(|l| l.ok().flatten())
}

/// `--otlp-endpoint` through the binary, the export decoded by the OpenTelemetry protocol's
/// own Python package (`tests/conformance/otlp_collector.py`): the event's `receive`,
/// `store`, `deliver` and `attempt` spans, in the provider's trace, parented as documented,
/// and the attempt is the span the destination's `traceparent` names.
#[tokio::test]
async fn otlp_export_through_the_binary_is_read_by_opentelemetry_proto() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let python = crate::sdk::sdk_python();
    let script = crate::sdk::conformance_script("otlp_collector.py");
    let mut collector = crate::process::spawn_piped(&python, &[script.as_str()]);
    let mut lines = tokio::io::BufReader::new(collector.stdout.take().unwrap()).lines();
    let first = next_line(&mut lines, 30)
        .await
        .expect("the collector starts (hack/setup.sh installs opentelemetry-proto)");
    let port: u16 = first.strip_prefix("listening ").unwrap().parse().unwrap();
    let otlp = format!("http://127.0.0.1:{port}");
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup_to_consumer("binotlp", &["--otlp-endpoint", &otlp]).await;
    let url = atlas_ready_url(&env).await;
    let incoming = format!("00-{TRACE}-{PARENT}-01");
    let sent = send(&url, &atlas_event("traced"), &[("traceparent", &incoming)]).await;
    assert_eq!(sent.0, 200);

    let mut spans: Vec<Value> = Vec::new();
    let named = |spans: &[Value], name: &str| -> Vec<Value> {
        spans
            .iter()
            .filter(|s| s["name"] == name && s["trace_id"] == TRACE)
            .cloned()
            .collect()
    };
    while named(&spans, "deliver").is_empty() || named(&spans, "attempt").is_empty() {
        let line = next_line(&mut lines, 30)
            .await
            .unwrap_or_else(|| panic!("no deliver/attempt span exported; got {spans:?}"));
        let span: Value = serde_json::from_str(&line).unwrap();
        assert!(
            span.get("error").is_none(),
            "opentelemetry-proto refused: {line}"
        );
        spans.push(span);
    }
    for s in &spans {
        println!("span decoded by opentelemetry-proto: {s}");
    }
    let one = |name: &str| {
        let found = named(&spans, name);
        assert_eq!(found.len(), 1, "{name}: {spans:?}");
        found[0].clone()
    };
    let (receive, store, deliver, attempt) =
        (one("receive"), one("store"), one("deliver"), one("attempt"));
    assert_eq!(receive["service"], "webhook-operator");
    assert_eq!(receive["kind"], "SPAN_KIND_SERVER");
    assert_eq!(attempt["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(
        receive["parent_span_id"], PARENT,
        "continues the provider's span"
    );
    assert_eq!(store["parent_span_id"], receive["span_id"]);
    assert_eq!(deliver["parent_span_id"], receive["span_id"]);
    assert_eq!(attempt["parent_span_id"], deliver["span_id"]);
    let at_destination = consumer.received()[0].headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        at_destination,
        format!("00-{TRACE}-{}-01", attempt["span_id"].as_str().unwrap()),
        "the destination's traceparent names the attempt span"
    );
}
