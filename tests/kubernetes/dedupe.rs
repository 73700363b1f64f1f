//! `spec.dedupe` through the real binary: the endpoint's own key replaces the provider's
//! id at ingress (two provider events with the same key give one delivery), an event the
//! key fails on keeps the provider's id and is counted, and a key that does not compile
//! is reported on the endpoint.

use serde_json::{Value, json};

use crate::delivery_e2e::{
    atlas_ready_url, condition_of, consumer_destination, delivered, setup_with, wait_endpoint,
    wait_false, wait_ready,
};
use crate::fixtures::*;

/// Endpoint `orders` to the consumer, deduplicating on the payload's `orderRef`.
fn by_order_ref(key: &str) -> Value {
    json!({"destination": consumer_destination(), "dedupe": {"key": key, "window": "10m"}})
}

/// One Atlas event (its own provider id, `call:<call_id>:call_completed`) carrying
/// `order_ref` when given.
fn atlas_order(call_id: &str, order_ref: Option<&str>) -> Value {
    let mut ev = json!({"callId": call_id, "campaignId": "camp-1", "triggerName": "call_completed", "customerNumber": "+15550100"});
    if let Some(r) = order_ref {
        ev["orderRef"] = json!(r);
    }
    json!([ev])
}

/// Posts `body` and returns the ingress's answer as JSON (`accepted`, `duplicates`, ...).
async fn post(url: &str, body: &Value) -> Value {
    let r = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{body}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn two_provider_events_with_the_same_dedupe_key_are_delivered_once() {
    let ops = crate::ports::free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    let (env, _sandbox, consumer, _operator, _dir, _) = setup_with(
        "dedupe",
        by_order_ref("payload.orderRef"),
        &["--ops-addr", &ops_flag],
    )
    .await;
    let url = atlas_ready_url(&env).await;

    // Different provider ids, the same key: the second is a duplicate at ingress.
    let first = post(&url, &atlas_order("d-1", Some("order-7"))).await;
    let second = post(&url, &atlas_order("d-2", Some("order-7"))).await;
    // Another key: delivered.
    let other = post(&url, &atlas_order("d-3", Some("order-8"))).await;
    // No `orderRef`: the key fails, the event keeps its provider id (delivered once; its
    // provider's retry is still a duplicate).
    let fallback = post(&url, &atlas_order("d-4", None)).await;
    let fallback_retry = post(&url, &atlas_order("d-4", None)).await;
    println!(
        "answers: same key {first} then {second}; other key {other}; key failed {fallback} then {fallback_retry}"
    );
    assert_eq!(
        (first["accepted"].as_u64(), second["duplicates"].as_u64()),
        (Some(1), Some(1)),
        "the second event with key order-7 is a duplicate: {second}"
    );
    assert_eq!(other["accepted"], 1, "{other}");
    assert_eq!(fallback["accepted"], 1, "{fallback}");
    assert_eq!(fallback_retry["duplicates"], 1, "{fallback_retry}");

    wait_endpoint(&env, "orders", "delivered=3", |ep| delivered(ep) == 3).await;
    let mut calls: Vec<String> = consumer
        .received()
        .iter()
        .map(|r| r.body["callId"].as_str().unwrap().to_string())
        .collect();
    calls.sort();
    println!("delivered: {calls:?}");
    assert_eq!(calls, ["d-1", "d-3", "d-4"], "each key once");

    let metrics = reqwest::get(format!("http://127.0.0.1:{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("webhook_operator_dedupe_key_errors_total{")
                && l.contains("name=\"orders\"")
        })
        .collect();
    println!("{errors:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].ends_with(" 2"),
        "both receipts of d-4 counted: {errors:?}"
    );
}

#[tokio::test]
async fn a_dedupe_key_that_does_not_compile_makes_the_endpoint_not_ready() {
    let (env, _sandbox, _consumer, _operator, _dir, _) =
        setup_with("dedupebad", by_order_ref("payload.orderRef"), &[]).await;
    wait_ready(&env, "orders", "Ready with a valid dedupe key").await;

    apply_endpoint(&env, "orders", by_order_ref("payload.orderRef == ")).await;
    let ep = wait_false(
        &env,
        "orders",
        "Ready=False DedupeInvalid",
        "Ready",
        "DedupeInvalid",
    )
    .await;
    let ready = condition_of(ep, "Ready");
    println!("Ready=False {}: {}", ready.reason, ready.message);
    assert!(
        ready.message.starts_with("spec.dedupe: key: ") && ready.message.len() > 20,
        "the compiler's message: {}",
        ready.message
    );

    apply_endpoint(&env, "orders", by_order_ref("payload.orderRef")).await;
    wait_ready(&env, "orders", "Ready again").await;
}
