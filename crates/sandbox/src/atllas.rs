//! Atllas has no management API; the simulator only sends deliveries the way the portal's
//! outbound webhook would, so tests can exercise the header check end to end.

use serde_json::{Value, json};

use super::faults::Delivery;
use super::wire::atllas::EVENT_TYPES;
use super::{Shared, deliver, random_hex, required};

/// `{"url", "event"?: "call.finished"|"call.completed", "method"?: "POST"|"GET",
/// "headerName"?, "headerValue"?}`: sends one event; GET carries it in `?payload=`.
pub(crate) async fn fire(s: &Shared, req: &Value) -> Result<Vec<Delivery>, String> {
    let url = required(req, "url")?;
    let kind = req
        .get("event")
        .and_then(Value::as_str)
        .unwrap_or("call.finished");
    if !EVENT_TYPES.contains(&kind) {
        return Err("unknown event type".into());
    }
    let get = match req.get("method").and_then(Value::as_str).unwrap_or("POST") {
        "POST" => false,
        "GET" => true,
        _ => return Err("method must be POST or GET".into()),
    };
    let mut headers = Vec::new();
    if let (Some(n), Some(v)) = (
        req.get("headerName").and_then(Value::as_str),
        req.get("headerValue").and_then(Value::as_str),
    ) {
        headers.push((n.to_string(), v.to_string()));
    }
    let body = serde_json::to_vec(&json!({
        "type": kind,
        "timestamp": jiff::Timestamp::now().as_millisecond(),
        "webhook": {"id": format!("webhook_{}", random_hex(4)), "type": "outbound"},
        "call": {
            "id": format!("call_{}", random_hex(6)),
            "status": "finished",
            "recipient": {"phoneNumber": "+15551234567", "firstName": "Jane", "lastName": "Smith"},
            "summary": "Sandbox call.",
            "transcript": [{"who": "assistant", "what": "Hi, is this Jane?", "when": jiff::Timestamp::now().to_string()}],
            "duration": 42,
            "analysis": {"sentiment": "positive", "lead_warmth": "warm", "justification": "Sandbox."},
            "tokensConsumed": 1
        },
        "campaign": {"id": "campaign_sandbox", "name": "Sandbox"}
    }))
    .expect("json");
    let status = if get {
        let mut u = url::Url::parse(url).map_err(|_| "invalid url")?;
        u.query_pairs_mut().append_pair(
            "payload",
            std::str::from_utf8(&body).expect("json is utf-8"),
        );
        deliver(
            &s.http,
            reqwest::Method::GET,
            u.as_str(),
            &headers,
            Vec::new(),
        )
        .await
    } else {
        deliver(&s.http, reqwest::Method::POST, url, &headers, body).await
    };
    Ok(vec![Delivery {
        url: url.to_string(),
        status,
        method: None,
    }])
}
