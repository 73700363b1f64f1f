//! W3C Trace Context (`traceparent`) for deliveries: each attempt is a new span of the
//! event's trace. The trace is the one the provider started when it sent a valid
//! `traceparent` (kept with the event in the queue), otherwise one derived from the
//! event's stable id, so every attempt and replay of an event lands in the same trace.
//! Owns only the header's format; it records and exports nothing (see [`crate::spans`]).

use sha2::Digest;

/// The header name, lower-case as HTTP/2 sends it.
pub const HEADER: &str = "traceparent";

/// The parts of a `traceparent` a delivery continues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The span the sender made the request in; all zero for a trace derived from an
    /// event id (no parent).
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Whether the sender asked for the trace to be recorded (flag `01`).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The parent span, if the sender named one.
    pub fn parent(&self) -> Option<[u8; 8]> {
        (self.parent_id != [0; 8]).then_some(self.parent_id)
    }

    /// The header value of a request made in span `span_id` of this trace.
    pub fn header(&self, span_id: [u8; 8]) -> String {
        // Made for every delivery attempt: written into place rather than formatted.
        let mut value = [b'-'; 55];
        value[..2].copy_from_slice(b"00");
        hex::encode_to_slice(self.trace_id, &mut value[3..35]).expect("32 hex digits");
        hex::encode_to_slice(span_id, &mut value[36..52]).expect("16 hex digits");
        hex::encode_to_slice([self.flags], &mut value[53..]).expect("2 hex digits");
        String::from_utf8(value.to_vec()).expect("ASCII")
    }
}

/// Reads a `traceparent` value (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`);
/// `None` for anything malformed, an all-zero id or the forbidden version `ff`. A higher
/// version is read by its first four fields, as the specification asks.
pub fn parse(value: &str) -> Option<TraceParent> {
    let value = value.trim();
    let mut parts = value.splitn(5, '-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2)
    {
        return None;
    }
    if version == "00" && rest.is_some() {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
        return None;
    }
    let mut trace_id = [0u8; 16];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    let mut parent_id = [0u8; 8];
    hex::decode_to_slice(parent, &mut parent_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent {
        trace_id,
        parent_id,
        flags,
    })
}

/// The four fields of a valid value (see [`parse`]), as kept with an event: later
/// versions' extra fields and surrounding spaces dropped.
pub fn normalize(value: &str) -> String {
    let value = value.trim();
    let end = value.char_indices().nth(55).map_or(value.len(), |(i, _)| i);
    value[..end].to_owned()
}

/// The trace the deliveries of the event `event_id` continue: the incoming one when there
/// is one (same trace id, flags and parent), otherwise the trace derived from the event id
/// (sampled, no parent).
pub fn event_trace(incoming: Option<&str>, event_id: &str) -> TraceParent {
    incoming.and_then(parse).unwrap_or_else(|| {
        let digest = sha2::Sha256::digest(event_id.as_bytes());
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&digest[..16]);
        TraceParent {
            trace_id,
            parent_id: [0; 8],
            flags: 1,
        }
    })
}

/// A random span id (never all zero, which the specification forbids).
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id.to_be_bytes();
        }
    }
}

/// The `traceparent` of one delivery attempt of the event `event_id`: [`event_trace`]
/// with a new span id.
pub fn for_delivery(incoming: Option<&str>, event_id: &str) -> String {
    event_trace(incoming, event_id).header(new_span_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_valid_and_refuses_malformed() {
        let tp = parse(INCOMING).unwrap();
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        // A future version with more fields is read by its first four.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later").is_some());
    }

    #[test]
    fn delivery_continues_the_incoming_trace_with_a_new_span() {
        let out = for_delivery(Some(INCOMING), "msg_1");
        let parts: Vec<&str> = out.split('-').collect();
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(parts[2], "00f067aa0ba902b7");
        assert_eq!(parts[3], "01");
        assert!(parse(&out).is_some());
    }

    #[test]
    fn header_and_normalized_value_are_exact() {
        let tp = parse(INCOMING).unwrap();
        assert_eq!(
            tp.header([0xab, 0, 0, 0, 0, 0, 0, 0x0f]),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-ab0000000000000f-01"
        );
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later";
        assert_eq!(
            normalize(&format!("  {later}  ")),
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
        assert_eq!(normalize(" 00-é "), "00-é");
    }

    #[test]
    fn without_an_incoming_trace_the_event_id_fixes_the_trace() {
        let a = parse(&for_delivery(None, "msg_1")).unwrap();
        let b = parse(&for_delivery(Some("garbage"), "msg_1")).unwrap();
        let c = parse(&for_delivery(None, "msg_2")).unwrap();
        assert_eq!(a.trace_id, b.trace_id);
        assert_ne!(a.trace_id, c.trace_id);
    }
}
