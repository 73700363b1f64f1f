//! `spec.filter`: an optional CEL expression over one event that decides whether it is
//! delivered. Compiled once per endpoint configuration; evaluated just before an event is
//! sent. [`Expression`] is the CEL machinery it shares with `spec.dedupe.key`
//! ([`crate::ingress::dedupe`]). Variables: `payload` (the provider's JSON payload; its text when it is not JSON),
//! `eventType`, `subscription` and `headers` (the provider's request headers, lower-case
//! names, credentials left out: see [`crate::ingress::kept_headers`]).

use std::fmt;
use std::sync::Arc;

/// A compiled CEL expression over one event, the machinery `spec.filter` and
/// `spec.dedupe.key` share: the same variables, compiled once per configuration.
#[derive(Clone)]
pub struct Expression {
    source: Arc<str>,
    program: Arc<cel::Program>,
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl Expression {
    /// Compiles `source`; `Err` carries the compiler's message.
    pub fn compile(source: &str) -> Result<Self, String> {
        let program = cel::Program::compile(source).map_err(|e| e.to_string())?;
        Ok(Self {
            source: source.into(),
            program: Arc::new(program),
        })
    }

    /// The expression's value for one event; `Err` when an input cannot be bound or the
    /// evaluation fails. `headers`: the event's kept headers as stored (see
    /// [`crate::queue::header_lines`]).
    pub fn value(
        &self,
        payload: &[u8],
        event_type: &str,
        subscription: &str,
        headers: &str,
    ) -> Result<cel::Value, String> {
        let payload = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(json) => json,
            Err(_) => serde_json::Value::String(String::from_utf8_lossy(payload).into_owned()),
        };
        let headers: serde_json::Map<String, serde_json::Value> =
            crate::queue::header_lines(headers)
                .map(|(n, v)| (n.to_owned(), serde_json::Value::String(v.to_owned())))
                .collect();
        let mut ctx = cel::Context::default();
        ctx.add_variable("payload", payload)
            .and_then(|()| ctx.add_variable("eventType", event_type))
            .and_then(|()| ctx.add_variable("subscription", subscription))
            .and_then(|()| ctx.add_variable("headers", serde_json::Value::Object(headers)))
            .map_err(|e| format!("input: {e}"))?;
        self.program
            .execute(&ctx)
            .map_err(|e| format!("failed: {e}"))
    }
}

/// A compiled `spec.filter`.
#[derive(Clone, Debug)]
pub struct Filter(Expression);

/// What a filter said about one event.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Deliver,
    Skip,
    /// Evaluation failed or did not give a bool: the event is kept as a dead letter.
    Error(String),
}

impl Filter {
    /// Compiles `source`; `Err` carries the compiler's message.
    pub fn compile(source: &str) -> Result<Self, String> {
        Expression::compile(source).map(Self)
    }

    /// `headers`: the event's kept headers as stored (see [`crate::queue::header_lines`]).
    pub fn evaluate(
        &self,
        payload: &[u8],
        event_type: &str,
        subscription: &str,
        headers: &str,
    ) -> Verdict {
        match self.0.value(payload, event_type, subscription, headers) {
            Ok(cel::Value::Bool(true)) => Verdict::Deliver,
            Ok(cel::Value::Bool(false)) => Verdict::Skip,
            Ok(other) => Verdict::Error(format!("filter gave {:?}, not a bool", other.type_of())),
            Err(e) => Verdict::Error(format!("filter {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALL: &[u8] = br#"{"call": {"analysis": {"lead_warmth": "hot"}, "minutes": 3}}"#;

    /// Each expression of `table` over [`CALL`] with (event type, subscription, headers).
    fn assert_verdicts(table: &[(&str, Verdict)], (event_type, sub, headers): (&str, &str, &str)) {
        for (expr, want) in table {
            let f = Filter::compile(expr).unwrap();
            assert_eq!(&f.evaluate(CALL, event_type, sub, headers), want, "{expr}");
        }
    }

    #[test]
    fn compile_errors_carry_the_compilers_message() {
        let err = Filter::compile("payload.call.analysis.lead_warmth == ").unwrap_err();
        assert!(!err.is_empty());
        assert!(
            Filter::compile("payload.call.minutes > 2 && eventType == 'call_completed'").is_ok()
        );
    }

    #[test]
    fn verdicts_over_payload_event_type_and_subscription() {
        let table = [
            (
                "payload.call.analysis.lead_warmth == 'hot'",
                Verdict::Deliver,
            ),
            ("payload.call.analysis.lead_warmth == 'cold'", Verdict::Skip),
            (
                "eventType == 'call_completed' && subscription == 'calls'",
                Verdict::Deliver,
            ),
            ("payload.call.minutes > 5", Verdict::Skip),
            (
                "has(payload.call.missing) && payload.call.missing == 1",
                Verdict::Skip,
            ),
            ("has(payload.call.analysis)", Verdict::Deliver),
        ];
        assert_verdicts(&table, ("call_completed", "calls", ""));
    }

    #[test]
    fn verdicts_over_provider_headers() {
        const HEADERS: &str = "user-agent: Atlas-Webhooks/1.0\nx-atlas-event: call_completed\n";
        let table = [
            (
                "headers['x-atlas-event'] == 'call_completed'",
                Verdict::Deliver,
            ),
            (
                "headers['user-agent'].startsWith('Atlas')",
                Verdict::Deliver,
            ),
            ("'x-atlas-event' in headers", Verdict::Deliver),
            ("'authorization' in headers", Verdict::Skip),
            (
                "has(headers.x_missing) || headers['x-atlas-event'] == 'call_started'",
                Verdict::Skip,
            ),
            ("size(headers) == 2", Verdict::Deliver),
        ];
        assert_verdicts(&table, ("t", "s", HEADERS));
        // No headers kept (an event stored before its endpoint had a filter): an empty map.
        let f = Filter::compile("headers['x-atlas-event'] == 'call_completed'").unwrap();
        assert!(matches!(f.evaluate(CALL, "t", "s", ""), Verdict::Error(_)));
        let f = Filter::compile("size(headers) == 0").unwrap();
        assert_eq!(f.evaluate(CALL, "t", "s", ""), Verdict::Deliver);
    }

    #[test]
    fn runtime_errors_and_non_bools_are_errors() {
        for expr in [
            "payload.call.missing.field == 1",
            "payload.call.minutes",
            "1 / 0 == 1",
        ] {
            let f = Filter::compile(expr).unwrap();
            assert!(
                matches!(f.evaluate(CALL, "t", "s", ""), Verdict::Error(_)),
                "{expr}"
            );
        }
    }
}
