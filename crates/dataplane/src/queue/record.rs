//! The on-disk form of one event: a small, versioned, length-prefixed binary record.
//! Hand-rolled rather than serde so that a payload is copied once and never re-encoded.

use bytes::Bytes;

pub(super) const STATE_PENDING: u8 = 0;
pub(super) const STATE_DEAD: u8 = 1;
/// 2 added `traceparent`, 3 the provider's `headers`; older records (without them) are
/// still read.
const VERSION: u8 = 3;

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Record {
    pub state: u8,
    pub attempts: u32,
    pub received_ms: u64,
    pub due_ms: u64,
    pub dead_ms: u64,
    pub namespace: String,
    pub name: String,
    pub subscription: String,
    pub event_type: String,
    pub dedupe_key: String,
    /// Last attempt's error, or the dead-letter reason once dead.
    pub last_error: String,
    pub payload: Bytes,
    /// The provider's `traceparent`; empty when none came.
    pub traceparent: String,
    /// The provider's headers kept for `spec.filter` (see [`crate::queue::header_lines`]).
    pub headers: String,
}

impl Record {
    /// Roughly the memory a record takes, for the in-memory cache's budget.
    pub fn weight(&self) -> u64 {
        const FIXED: usize = 128;
        (FIXED
            + self.namespace.len()
            + self.name.len()
            + self.subscription.len()
            + self.event_type.len()
            + self.dedupe_key.len()
            + self.last_error.len()
            + self.payload.len()
            + self.traceparent.len()
            + self.headers.len()) as u64
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(VERSION);
        out.push(self.state);
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.extend_from_slice(&self.received_ms.to_le_bytes());
        out.extend_from_slice(&self.due_ms.to_le_bytes());
        out.extend_from_slice(&self.dead_ms.to_le_bytes());
        for field in [
            self.namespace.as_bytes(),
            self.name.as_bytes(),
            self.subscription.as_bytes(),
            self.event_type.as_bytes(),
            self.dedupe_key.as_bytes(),
            self.last_error.as_bytes(),
            &self.payload,
            self.traceparent.as_bytes(),
            self.headers.as_bytes(),
        ] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field);
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if !(1..=VERSION).contains(&version) {
            return None;
        }
        Some(Record {
            state: r.u8()?,
            attempts: u32::from_le_bytes(r.take(4)?.try_into().ok()?),
            received_ms: r.u64()?,
            due_ms: r.u64()?,
            dead_ms: r.u64()?,
            namespace: r.string()?,
            name: r.string()?,
            subscription: r.string()?,
            event_type: r.string()?,
            dedupe_key: r.string()?,
            last_error: r.string()?,
            payload: Bytes::copy_from_slice(r.field()?),
            traceparent: if version >= 2 {
                r.string()?
            } else {
                String::new()
            },
            headers: if version >= 3 {
                r.string()?
            } else {
                String::new()
            },
        })
    }
}

/// The fixed fields at the front of an encoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub state: u8,
    pub due_ms: u64,
}

impl Head {
    /// Reads the head of an encoded record without copying the rest.
    pub fn decode(bytes: &[u8]) -> Option<Head> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if !(1..=VERSION).contains(&version) {
            return None;
        }
        let state = r.u8()?;
        r.take(4 + 8)?;
        Some(Head {
            state,
            due_ms: r.u64()?,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn field(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.field()?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_truncation() {
        let rec = Record {
            state: STATE_DEAD,
            attempts: 7,
            received_ms: 1,
            due_ms: 2,
            dead_ms: 3,
            namespace: "ns".into(),
            name: "ep".into(),
            subscription: "sub".into(),
            event_type: "call_completed".into(),
            dedupe_key: "k1".into(),
            last_error: "HTTP 500".into(),
            payload: Bytes::from_static(b"{\"a\":1}"),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            headers: "user-agent: atlas\nx-atlas-event: call_completed\n".into(),
        };
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        assert_eq!(Record::decode(&buf), Some(rec.clone()));
        let head = Head {
            state: rec.state,
            due_ms: rec.due_ms,
        };
        assert_eq!(Head::decode(&buf), Some(head));
        for cut in 0..buf.len() {
            assert_eq!(Record::decode(&buf[..cut]), None, "cut at {cut}");
        }
    }

    fn pending() -> Record {
        Record {
            state: STATE_PENDING,
            attempts: 0,
            received_ms: 1,
            due_ms: 1,
            dead_ms: 0,
            namespace: "ns".into(),
            name: "ep".into(),
            subscription: "sub".into(),
            event_type: "t".into(),
            dedupe_key: "k".into(),
            last_error: String::new(),
            payload: Bytes::from_static(b"{}"),
            traceparent: String::new(),
            headers: String::new(),
        }
    }

    #[test]
    fn reads_older_versions_without_the_fields_they_lack() {
        let v2 = Record {
            attempts: 2,
            last_error: "HTTP 500".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ..pending()
        };
        // Version 2 lacks the trailing headers field, version 1 traceparent and headers.
        for (rec, version, missing_fields) in [(v2, 2, 1), (pending(), 1, 2)] {
            let mut buf = Vec::new();
            rec.encode(&mut buf);
            buf.truncate(buf.len() - 4 * missing_fields);
            buf[0] = version;
            assert_eq!(Record::decode(&buf), Some(rec), "version {version}");
        }
    }
}
