//! The consumer's pace through the real binary: a destination's `Retry-After` on `429`
//! (delta-seconds) and on `503` (an HTTP date) sets the next attempt, even past the
//! endpoint's `maxDelay`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::delivery_e2e::{atlas_event, ingress_url, send_json, setup_with};
use crate::fixtures::*;
use crate::support::wait_until;

/// Answers each event's first attempt with `status` and the `Retry-After` that
/// `retry_after()` gives, the next one with 200; records when each attempt arrived.
#[derive(Clone, Default)]
struct Pacing {
    arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
}

async fn start(p: Pacing, status: StatusCode, retry_after: fn() -> String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let p = p.clone();
        async move {
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let mut arrivals = p.arrivals.lock().unwrap();
            let first = !arrivals.iter().any(|(i, _)| *i == id);
            arrivals.push((id, Instant::now()));
            if first {
                (status, [("retry-after", retry_after())]).into_response()
            } else {
                StatusCode::OK.into_response()
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// Sends one event to an endpoint whose backoff alone would retry within about a second
/// (`initialDelay` 100ms, `maxDelay` 1s) and returns the time between its two attempts.
async fn gap_after(prefix: &str, status: StatusCode, retry_after: fn() -> String) -> Duration {
    let pacing = Pacing::default();
    let port = start(pacing.clone(), status, retry_after).await;
    let spec = json!({
        "destination": {"url": format!("http://127.0.0.1:{port}/events")},
        "delivery": {"retry": {"initialDelay": "100ms", "maxDelay": "1s", "maxAttempts": 3}},
    });
    let (env, _sandbox, _consumer, _operator, _dir, _) = setup_with(prefix, spec, &[]).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    let url = format!("{}/atlas", ingress_url(&env, "orders").await);
    let r = send_json(&url, &atlas_event(&format!("{prefix}-1")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let arrivals = wait_until(Duration::from_secs(60), "two attempts", || {
        let a = pacing.arrivals.lock().unwrap().clone();
        async move { (a.len() >= 2).then_some(a) }
    })
    .await;
    assert_eq!(arrivals[0].0, arrivals[1].0, "the same event again");
    arrivals[1].1 - arrivals[0].1
}

#[tokio::test]
async fn retry_after_seconds_on_429_sets_the_next_attempt() {
    let gap = gap_after("pace429", StatusCode::TOO_MANY_REQUESTS, || "4".into()).await;
    println!("429 with Retry-After: 4 -> next attempt after {gap:?} (maxDelay 1s)");
    // The backoff alone: 100 ms ± 20 %, and never past maxDelay (1 s).
    assert!(gap >= Duration::from_millis(3900), "{gap:?}");
    assert!(gap < Duration::from_secs(15), "{gap:?}");
}

#[tokio::test]
async fn retry_after_http_date_on_503_sets_the_next_attempt() {
    // Five seconds from now, at one-second resolution: at least four seconds away.
    let gap = gap_after("pace503", StatusCode::SERVICE_UNAVAILABLE, || {
        let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(5);
        jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&at)
            .unwrap()
    })
    .await;
    println!("503 with an HTTP-date Retry-After 5 s ahead -> next attempt after {gap:?}");
    assert!(gap >= Duration::from_millis(3900), "{gap:?}");
    assert!(gap < Duration::from_secs(15), "{gap:?}");
}
