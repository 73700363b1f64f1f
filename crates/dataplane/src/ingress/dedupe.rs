//! `spec.dedupe`: the endpoint's own dedupe key, a CEL expression over the event (the
//! variables of `spec.filter`, [`Expression`]), and its window. Evaluated at ingress for
//! each provider event; its value replaces the provider's id as the key the queue dedupes
//! on. When it fails on an event (a missing field, a list, an empty string) that event
//! keeps the provider's id and the failure is counted.

use std::time::Duration;

use sha2::Digest;

use crate::delivery::filter::Expression;

/// The prefix of every key [`DedupeKey`] makes: such keys never equal a provider's id.
const KEY_PREFIX: &str = "key:";

/// A compiled `spec.dedupe`.
#[derive(Clone, Debug)]
pub struct DedupeKey {
    expression: Expression,
    /// Events with the same key closer together than this are duplicates; `None`: the
    /// queue's window.
    pub window: Option<Duration>,
}

impl DedupeKey {
    /// Compiles `source`; `Err` carries the compiler's message.
    pub fn compile(source: &str, window: Option<Duration>) -> Result<Self, String> {
        Ok(Self {
            expression: Expression::compile(source)?,
            window,
        })
    }

    /// The dedupe key of one event: a digest of the expression's value (so a key's length
    /// does not depend on the payload, and no value is stored in clear), or why there is
    /// none. `headers` as [`Expression::value`] takes them.
    pub fn key(
        &self,
        payload: &[u8],
        event_type: &str,
        subscription: &str,
        headers: &str,
    ) -> Result<String, String> {
        let value = self
            .expression
            .value(payload, event_type, subscription, headers)?;
        let text = match value {
            cel::Value::String(s) => s.to_string(),
            cel::Value::Int(n) => n.to_string(),
            cel::Value::UInt(n) => n.to_string(),
            cel::Value::Float(n) => n.to_string(),
            cel::Value::Bool(b) => b.to_string(),
            other => return Err(format!("gave {:?}, not a scalar", other.type_of())),
        };
        if text.is_empty() {
            return Err("gave an empty string".into());
        }
        let digest = sha2::Sha256::digest(text.as_bytes());
        Ok(format!("{KEY_PREFIX}{}", hex::encode(&digest[..16])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALL: &[u8] = br#"{"call": {"id": "c1", "n": 7, "tags": ["a"], "empty": ""}}"#;

    fn key(expr: &str, payload: &[u8], headers: &str) -> Result<String, String> {
        DedupeKey::compile(expr, None)
            .unwrap()
            .key(payload, "call_completed", "calls", headers)
    }

    #[test]
    fn equal_values_give_equal_keys_and_others_differ() {
        let a = key("payload.call.id", CALL, "").unwrap();
        let b = key(
            "payload.call.id",
            br#"{"call": {"id": "c1", "other": 1}}"#,
            "",
        )
        .unwrap();
        let c = key("payload.call.id", br#"{"call": {"id": "c2"}}"#, "").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with(KEY_PREFIX), "{a}");
        assert!(!a.contains("c1"), "the value is not stored in clear: {a}");
        // Numbers, headers and the other variables.
        assert!(key("payload.call.n", CALL, "").is_ok());
        assert_eq!(
            key("headers['x-id']", CALL, "x-id: c1\n").unwrap(),
            key("payload.call.id", CALL, "").unwrap()
        );
        assert!(key("eventType + ':' + payload.call.id", CALL, "").is_ok());
    }

    #[test]
    fn failures_and_non_scalars_are_errors() {
        for expr in [
            "payload.call.missing",
            "payload.call.tags",
            "payload.call",
            "payload.call.empty",
            "headers['x-id']",
        ] {
            assert!(key(expr, CALL, "").is_err(), "{expr}");
        }
        assert!(DedupeKey::compile("payload.call.id ==", None).is_err());
    }
}
