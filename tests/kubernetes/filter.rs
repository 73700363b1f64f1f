//! `spec.filter` against the real API server with the operator running: an expression
//! that does not compile is reported on the endpoint, with the compiler's message.

use serde_json::json;

use crate::delivery_e2e::{condition, consumer_destination, setup_with, wait_endpoint};
use crate::fixtures::*;

#[tokio::test]
async fn a_filter_that_does_not_compile_makes_the_endpoint_not_ready() {
    let (env, _sandbox, _consumer, _operator, _dir, _) = setup_with(
        "filter",
        json!({"destination": consumer_destination(), "filter": "payload.call.lead_warmth == 'hot'"}),
        &[],
    )
    .await;
    // A valid filter: Ready.
    wait_endpoint(&env, "orders", "Ready with a valid filter", |ep| {
        condition(ep, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await;

    apply_endpoint(
        &env,
        "orders",
        json!({"destination": consumer_destination(), "filter": "payload.call.lead_warmth == "}),
    )
    .await;
    let ep = wait_endpoint(&env, "orders", "Ready=False FilterInvalid", |ep| {
        condition(ep, "Ready").is_some_and(|(s, r)| s == "False" && r == "FilterInvalid")
    })
    .await;
    let ready = ep
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
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
    wait_endpoint(&env, "orders", "Ready again", |ep| {
        condition(ep, "Ready").is_some_and(|(s, _)| s == "True")
    })
    .await;
}
