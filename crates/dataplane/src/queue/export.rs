//! Export and import of an endpoint's waiting events and dead letters, one JSON object a
//! line (JSON Lines): a backup and restore, or a move from the embedded queue to
//! JetStream. Each line keeps what delivery and `spec.filter` need (payload, kept headers,
//! trace context), the attempts so far, the event's id (the `webhook-id` consumers
//! deduplicate on) and its dedupe key, so an import is idempotent: a waiting event is
//! deduplicated on its key like any enqueue, a dead letter is skipped when one with its id
//! is there.

use std::time::SystemTime;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{EndpointKey, from_millis};

/// One exported event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExportedEvent {
    /// Stable across export and import: the `webhook-id` of its deliveries.
    pub id: String,
    pub namespace: String,
    /// The WebhookEndpoint's name.
    pub endpoint: String,
    pub subscription: String,
    pub event_type: String,
    pub dedupe_key: String,
    /// The payload's bytes, base64 (standard alphabet, padded).
    pub payload: String,
    /// Received at the ingress, ms since the Unix epoch.
    pub received_ms: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Set for a dead letter: when it was dead-lettered, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered_ms: Option<u64>,
    /// A dead letter's reason, or a waiting event's last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The provider's headers kept for `spec.filter` (see [`super::header_lines`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub headers: String,
}

impl ExportedEvent {
    pub fn endpoint_key(&self) -> EndpointKey {
        EndpointKey::new(&self.namespace, &self.endpoint)
    }

    pub fn is_dead(&self) -> bool {
        self.dead_lettered_ms.is_some()
    }

    pub fn received(&self) -> SystemTime {
        from_millis(self.received_ms)
    }

    pub fn encode_payload(payload: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(payload)
    }

    /// The payload's bytes; `Err` when the line's `payload` is not base64.
    pub fn payload_bytes(&self) -> Result<Bytes, String> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload)
            .map(Bytes::from)
            .map_err(|e| format!("event {}: payload: {e}", self.id))
    }
}

/// Writes `events` as JSON Lines.
pub fn write_lines(events: &[ExportedEvent], out: &mut impl std::io::Write) -> std::io::Result<()> {
    for ev in events {
        serde_json::to_writer(&mut *out, ev)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Reads JSON Lines (blank lines skipped); `Err` names the first line that is not an event.
pub fn read_lines(input: impl std::io::BufRead) -> Result<Vec<ExportedEvent>, String> {
    let mut out = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| format!("line {}: {e}", n + 1))?);
    }
    Ok(out)
}
