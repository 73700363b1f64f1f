//! Atllas (atll.as): receive-only. Outbound webhooks are set up by hand in the Atllas
//! portal, so there is nothing to sync; deliveries are checked by a custom header whose
//! value only the operator and the portal know.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::inbound_util::{require_json, verify_header_secret};
use super::json_fields::JsonObject;
use crate::inbound::{InboundEvent, InboundRequest, Rejection, VerificationKeys};
use crate::model::{
    Credentials, DesiredSubscription, Observed, Provider, ProviderApi, ProviderError, Scope,
    SyncAction, UpstreamState,
};

/// Event types Atllas sends: real deliveries and the response webhook / Test button.
pub const EVENT_TYPES: [&str; 2] = ["call.finished", "call.completed"];
/// The Test button's webhook ids start with this.
const TEST_WEBHOOK_PREFIX: &str = "webhook_test_";

/// No API: `ensure` reports manual setup and makes no network call.
pub struct AtllasClient;

fn manual(d: &DesiredSubscription) -> Result<Observed, ProviderError> {
    let Scope::Atllas { header_name } = &d.scope else {
        return Err(crate::model::scope_mismatch(Provider::Atllas));
    };
    Ok(Observed {
        id: "manual".into(),
        echo: BTreeMap::from([("headerName".to_string(), header_name.clone())]),
        state: UpstreamState::Manual,
        signing_secret: None,
        action: SyncAction::Unchanged,
    })
}

#[async_trait]
impl ProviderApi for AtllasClient {
    async fn ensure(
        &self,
        _creds: &Credentials,
        desired: &DesiredSubscription,
        _previous: Option<&DesiredSubscription>,
    ) -> Result<Observed, ProviderError> {
        manual(desired)
    }

    async fn observe(
        &self,
        _creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Option<Observed>, ProviderError> {
        manual(desired).map(Some)
    }

    async fn delete(
        &self,
        _creds: &Credentials,
        _applied: &DesiredSubscription,
    ) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// Verifies an Atllas delivery: POST with a JSON body, or GET (see [`get_event`]); the
/// configured header must carry an accepted value.
pub fn parse_inbound(
    keys: &VerificationKeys,
    req: &InboundRequest<'_>,
) -> Result<Vec<InboundEvent>, Rejection> {
    let ev = if req.method == http::Method::POST {
        require_json(req)?;
        None
    } else if req.method == http::Method::GET {
        Some(get_event(req)?)
    } else {
        return Err(Rejection::MethodNotAllowed);
    };
    verify_header_secret(req, keys.header_name.as_deref(), &keys.secrets)?;
    let payload = ev.unwrap_or_else(|| bytes::Bytes::copy_from_slice(req.body));
    let (event_type, dedupe_key, test) = read_event(&payload)?;
    Ok(vec![InboundEvent {
        event_type,
        dedupe_key,
        payload,
        test,
    }])
}

/// An Atllas event's type, dedupe key (`<call id>:<type>`) and whether it is a test.
fn read_event(payload: &[u8]) -> Result<(String, String, bool), Rejection> {
    // Not an object: it has no type.
    let ev = JsonObject::parse(payload)?.ok_or(Rejection::BadRequest("missing type"))?;
    let kind = ev
        .str("type")
        .ok_or(Rejection::BadRequest("missing type"))?;
    if !EVENT_TYPES.contains(&kind.as_ref()) {
        return Err(Rejection::BadRequest("unknown event type"));
    }
    let call = JsonObject::of(
        ev.get("call")
            .ok_or(Rejection::BadRequest("missing call"))?,
    );
    let call_field = |key| call.as_ref().and_then(|c| c.str(key));
    let call_id = call_field("id").ok_or(Rejection::BadRequest("missing call.id"))?;
    call_field("status").ok_or(Rejection::BadRequest("missing call.status"))?;
    let test = ev
        .object("webhook")
        .and_then(|w| w.str("id"))
        .is_some_and(|id| id.starts_with(TEST_WEBHOOK_PREFIX));
    Ok((kind.to_string(), format!("{call_id}:{kind}"), test))
}

/// The event of a GET delivery. How it travels is not documented, so every form is a
/// guess (PROVIDERS.md): a JSON body; the JSON in the `payload` query parameter; or the
/// fields as query parameters, nested by dotted or bracketed names
/// (`type=call.finished&call.id=c1&call[status]=finished`), values as strings.
fn get_event(req: &InboundRequest<'_>) -> Result<bytes::Bytes, Rejection> {
    if !req.body.is_empty() {
        return Ok(bytes::Bytes::copy_from_slice(req.body));
    }
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if let Some((_, p)) = pairs.iter().find(|(k, _)| k == "payload") {
        return Ok(bytes::Bytes::from(p.clone()));
    }
    if pairs.is_empty() {
        return Err(Rejection::BadRequest("missing payload parameter"));
    }
    let mut root = serde_json::Map::new();
    for (key, value) in pairs {
        let path: Vec<&str> = key
            .split(['.', '[', ']'])
            .filter(|p| !p.is_empty())
            .collect();
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        let mut node = &mut root;
        for p in parents {
            node = node
                .entry(p.to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()))
                .as_object_mut()
                .ok_or(Rejection::BadRequest("conflicting query fields"))?;
        }
        if node.contains_key(*last) {
            return Err(Rejection::BadRequest("conflicting query fields"));
        }
        node.insert(last.to_string(), serde_json::Value::String(value));
    }
    let event = serde_json::Value::Object(root);
    Ok(bytes::Bytes::from(
        serde_json::to_vec(&event).expect("a JSON value serialises"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound_util::testing::{POST, json_headers, request};
    use proptest::prelude::*;

    const HEADER: &str = "x-atllas-token";
    const VALUE: &str = "s3cr3t-value-0123456789";

    fn keys() -> VerificationKeys {
        VerificationKeys {
            secrets: vec![b"rotated-new".to_vec(), VALUE.as_bytes().to_vec()],
            header_name: Some(HEADER.into()),
            ..Default::default()
        }
    }

    fn body(kind: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "type": kind, "timestamp": 1730179200000u64,
            "webhook": {"id": "webhook_abc123", "type": "outbound"},
            "call": {"id": "call_xyz789", "status": "finished"},
            "campaign": {"id": "campaign_123", "name": "Q4"}
        }))
        .unwrap()
    }

    fn post(body: &[u8], value: &str) -> Result<Vec<InboundEvent>, Rejection> {
        let h = json_headers(&[(HEADER, value)]);
        parse_inbound(&keys(), &request(&POST, &h, None, body))
    }

    #[test]
    fn accepts_both_types_and_get() {
        for kind in EVENT_TYPES {
            let evs = post(&body(kind), VALUE).unwrap();
            assert_eq!(evs[0].event_type, kind);
            assert_eq!(evs[0].dedupe_key, format!("call_xyz789:{kind}"));
            assert!(!evs[0].test);
        }
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "payload",
                std::str::from_utf8(&body("call.finished")).unwrap(),
            )
            .finish();
        let h = json_headers(&[(HEADER, VALUE)]);
        let get = http::Method::GET;
        let evs = parse_inbound(&keys(), &request(&get, &h, Some(&q), b"")).unwrap();
        assert_eq!(evs[0].event_type, "call.finished");
    }

    fn get(query: Option<&str>, body: &[u8]) -> Result<Vec<InboundEvent>, Rejection> {
        let h = json_headers(&[(HEADER, VALUE)]);
        let get = http::Method::GET;
        parse_inbound(&keys(), &request(&get, &h, query, body))
    }

    #[test]
    fn get_accepts_json_body_and_query_fields() {
        // A JSON body on GET.
        let evs = get(None, &body("call.completed")).unwrap();
        assert_eq!(evs[0].dedupe_key, "call_xyz789:call.completed");
        // Form-encoded fields, dotted or bracketed.
        let evs = get(
            Some("type=call.finished&call.id=c42&call%5Bstatus%5D=finished&campaign.id=k"),
            b"",
        )
        .unwrap();
        assert_eq!(evs[0].event_type, "call.finished");
        assert_eq!(evs[0].dedupe_key, "c42:call.finished");
        let p: serde_json::Value = serde_json::from_slice(&evs[0].payload).unwrap();
        assert_eq!(p["call"]["status"], "finished");
        assert_eq!(p["campaign"]["id"], "k");
        // Still checked: the header, the fields, conflicts.
        assert_eq!(
            get(Some("type=call.finished&call.id=c42"), b""),
            Err(Rejection::BadRequest("missing call.status"))
        );
        assert_eq!(
            get(Some("call=x&call.id=c"), b""),
            Err(Rejection::BadRequest("conflicting query fields"))
        );
        assert_eq!(
            get(None, b""),
            Err(Rejection::BadRequest("missing payload parameter"))
        );
    }

    #[test]
    fn test_button_is_flagged() {
        let b = br#"{"type":"call.completed","timestamp":1,"webhook":{"id":"webhook_test_outbound_456","type":"outbound"},"call":{"id":"call_test_abc","status":"finished"}}"#;
        assert!(post(b, VALUE).unwrap()[0].test);
    }

    #[test]
    fn rejects() {
        assert_eq!(
            post(&body("call.finished"), "wrong"),
            Err(Rejection::Unauthorized("wrong header value"))
        );
        assert_eq!(
            post(&body("calls.execute"), VALUE),
            Err(Rejection::BadRequest("unknown event type"))
        );
        assert_eq!(
            post(br#"{"type":"call.finished","call":{}}"#, VALUE),
            Err(Rejection::BadRequest("missing call.id"))
        );
        let h = json_headers(&[]);
        assert_eq!(
            parse_inbound(&keys(), &request(&POST, &h, None, &body("call.finished"))),
            Err(Rejection::Unauthorized("missing header"))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..512), q in ".{0,64}", v in "[ -~]{0,40}") {
            let _ = post(&b, &v);
            let _ = post(&b, VALUE);
            let h = json_headers(&[(HEADER, VALUE)]);
            let get = http::Method::GET;
            let _ = parse_inbound(&keys(), &request(&get, &h, Some(&q), &b));
        }

        #[test]
        fn valid_body_parses(kind in prop::sample::select(EVENT_TYPES.to_vec())) {
            prop_assert!(post(&body(kind), VALUE).is_ok());
        }

        #[test]
        fn flipped_header_byte_is_rejected(idx in any::<prop::sample::Index>(), bit in 0u8..7) {
            let mut v = VALUE.as_bytes().to_vec();
            let i = idx.index(v.len());
            v[i] ^= 1 << bit;
            // Only visible ASCII can travel in a header; skip flips that leave it.
            if let Ok(s) = std::str::from_utf8(&v)
                && s.bytes().all(|c| (0x21..0x7f).contains(&c))
            {
                prop_assert!(post(&body("call.finished"), s).is_err());
            }
        }
    }
}
