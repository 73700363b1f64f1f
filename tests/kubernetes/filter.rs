//! `spec.filter` against the real API server with the operator running: an expression
//! that does not compile is reported on the endpoint, with the compiler's message.

use serde_json::{Value, json};

use crate::delivery_e2e::{
    condition_of, consumer_destination, send_json, setup_with, wait_endpoint, wait_false,
    wait_ready,
};
use crate::fixtures::*;

/// Endpoint `orders` to the consumer, passing only events whose `call.lead_warmth` is `hot`.
fn hot_calls_only() -> Value {
    json!({"destination": consumer_destination(), "filter": "payload.call.lead_warmth == 'hot'"})
}

#[tokio::test]
async fn a_filter_that_does_not_compile_makes_the_endpoint_not_ready() {
    let (env, _sandbox, _consumer, _operator, _dir, _) =
        setup_with("filter", hot_calls_only(), &[]).await;
    // A valid filter: Ready.
    wait_ready(&env, "orders", "Ready with a valid filter").await;

    apply_endpoint(
        &env,
        "orders",
        json!({"destination": consumer_destination(), "filter": "payload.call.lead_warmth == "}),
    )
    .await;
    let ep = wait_false(
        &env,
        "orders",
        "Ready=False FilterInvalid",
        "Ready",
        "FilterInvalid",
    )
    .await;
    let ready = condition_of(ep, "Ready");
    assert!(
        ready.message.starts_with("spec.filter: "),
        "{}",
        ready.message
    );
    assert!(
        ready.message.len() > "spec.filter: ".len(),
        "the compiler's message: {}",
        ready.message
    );

    // Fixed: Ready again.
    apply_endpoint(
        &env,
        "orders",
        json!({"destination": consumer_destination(), "filter": "eventType != 'ping'"}),
    )
    .await;
    wait_ready(&env, "orders", "Ready again").await;
}

/// A filter that fails on an event (here a missing field) keeps the event as a dead letter
/// and says so where a user looks: `status.delivery.deadLettered`, `lastError` with the
/// reason, and a Warning Event.
#[tokio::test]
async fn a_filter_error_is_counted_reported_and_announced() {
    use crate::delivery_e2e::atlas_event;

    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup_with("filtererr", hot_calls_only(), &[]).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    let url = format!(
        "{}/atlas",
        crate::delivery_e2e::ingress_url(&env, "orders").await
    );
    // An Atlas event has no `call` field: the filter fails on it.
    let r = send_json(&url, &atlas_event("filter-fails")).await.unwrap();
    assert_eq!(r.status(), 200);
    let ep = wait_endpoint(
        &env,
        "orders",
        "deadLettered=1 with the filter's error",
        |ep| {
            let d = ep.status.as_ref().and_then(|s| s.delivery.as_ref());
            d.is_some_and(|d| {
                d.dead_lettered == 1
                    && d.filter_errors == 1
                    && d.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("filter"))
            })
        },
    )
    .await;
    let delivery = ep.status.unwrap().delivery.unwrap();
    println!(
        "after a filter error: deadLettered={} filterErrors={} lastError={:?}",
        delivery.dead_lettered, delivery.filter_errors, delivery.last_error
    );
    let event = wait_event_where(&env, "a FilterFailed Event", |e| {
        e.reason.as_deref() == Some("FilterFailed")
    })
    .await;
    println!("Event: {:?} {:?}", event.type_, event.message);
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        event
            .message
            .as_deref()
            .is_some_and(|m| m.contains("filter")),
        "{:?}",
        event.message
    );
    assert!(consumer.received().is_empty(), "nothing was delivered");
}
