//! Atlas (api.youratlas.com): one upstream subscription per (campaignId, triggerName,
//! hookUrl), `api-key` header, unsigned deliveries holding a JSON array of events.

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::http as phttp;
use super::inbound_util::require_json;
use super::json_fields::{self, JsonObject};
use crate::inbound::{InboundEvent, InboundRequest, MalformedEvent, Parsed, Rejection};
use crate::model::{
    Credentials, DesiredSubscription, Observed, Provider, ProviderApi, ProviderEndpoints,
    ProviderError, Scope, SyncAction, UpstreamState, classify,
};

/// Where the list call is assumed to be (no Atlas document names it).
pub const DEFAULT_LIST_PATH: &str = "/events-gateway/trigger/list";

/// The `provider` value for direct API use.
pub const PROVIDER_CUSTOM: &str = "custom";

/// Body of subscribe, and of unsubscribe (identity is the tuple, not the id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerRequest {
    pub hook_url: String,
    pub campaign_id: String,
    pub trigger_name: String,
    pub provider: String,
}

/// 201 answer of subscribe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeResponse {
    pub id: String,
    pub campaign_id: String,
    pub trigger_name: String,
}

/// One element of the list answer: the subscribed tuple, with its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerSubscription {
    pub id: String,
    #[serde(flatten)]
    pub trigger: TriggerRequest,
}

/// Atlas' error shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub status_code: u16,
    pub error: String,
    pub message: String,
}

fn extract_error(v: &serde_json::Value) -> Option<String> {
    match v.get("message")? {
        serde_json::Value::String(s) => Some(s.clone()),
        // Some Atlas validation errors list one message per field.
        serde_json::Value::Array(a) => Some(
            a.iter()
                .filter_map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => None,
    }
}

pub struct AtlasClient {
    api: phttp::KeyedApi,
    list_path: String,
}

impl AtlasClient {
    pub fn new(endpoints: &ProviderEndpoints) -> Self {
        AtlasClient {
            api: phttp::KeyedApi::new(
                endpoints,
                &endpoints.atlas_base,
                |r, key| r.header("api-key", key),
                extract_error,
            ),
            list_path: endpoints.atlas_list_path.clone(),
        }
    }

    /// The campaign's subscriptions. The list call is an assumption: a 404, another
    /// refusal or an unreadable answer means we cannot see upstream, never "nothing
    /// there" (that would re-subscribe every trigger on every resync).
    async fn list(
        &self,
        creds: &Credentials,
        campaign_id: &str,
    ) -> Result<Vec<TriggerSubscription>, ProviderError> {
        let req = self
            .api
            .request(Method::GET, &self.list_path, creds)?
            .query(&[("campaignId", campaign_id)]);
        let cannot = |e: ProviderError| {
            ProviderError::CannotObserve(format!(
                "the Atlas list call GET {} failed ({e}); the recorded subscription is kept and drift is not checked; set --atlas-list-path if Atlas lists subscriptions elsewhere",
                self.list_path
            ))
        };
        match self.api.send(req, "atlas list", creds).await {
            Ok(resp) => phttp::decode(resp, "atlas list").await.map_err(cannot),
            Err(e @ (ProviderError::NotFound(_) | ProviderError::Invalid(_))) => Err(cannot(e)),
            Err(e) => Err(e),
        }
    }

    async fn subscribe(
        &self,
        creds: &Credentials,
        body: &TriggerRequest,
    ) -> Result<SubscribeResponse, ProviderError> {
        let resp = self
            .api
            .send_json(
                Method::POST,
                "/events-gateway/trigger/subscribe",
                body,
                "atlas subscribe",
                creds,
            )
            .await?;
        phttp::decode(resp, "atlas subscribe").await
    }

    /// Unsubscribes one tuple; an unknown tuple is already gone.
    async fn unsubscribe(
        &self,
        creds: &Credentials,
        body: &TriggerRequest,
    ) -> Result<(), ProviderError> {
        phttp::removed(
            self.api
                .send_json(
                    Method::DELETE,
                    "/events-gateway/trigger/unsubscribe",
                    body,
                    "atlas unsubscribe",
                    creds,
                )
                .await,
        )
    }
}

fn campaign_of(d: &DesiredSubscription) -> Result<&str, ProviderError> {
    match &d.scope {
        Scope::Atlas { campaign_id } if !campaign_id.is_empty() => Ok(campaign_id),
        _ => Err(crate::model::scope_mismatch(Provider::Atlas)),
    }
}

/// The hook URL registered for one trigger: the subscription's hook URL with
/// `trigger=<name>`, so a delivery that names no trigger is known by where it arrived.
fn registered_url(hook_url: &str, trigger: &str) -> String {
    match url::Url::parse(hook_url) {
        Ok(mut u) => {
            u.query_pairs_mut().append_pair("trigger", trigger);
            u.to_string()
        }
        Err(_) => format!("{hook_url}?trigger={trigger}"),
    }
}

fn tuple(d: &DesiredSubscription, campaign: &str, trigger: &str) -> TriggerRequest {
    TriggerRequest {
        hook_url: registered_url(&d.hook_url, trigger),
        campaign_id: campaign.to_string(),
        trigger_name: trigger.to_string(),
        provider: PROVIDER_CUSTOM.to_string(),
    }
}

/// `t` under either URL form: per trigger, or the bare hook URL `bare` (registered by
/// earlier versions, or by hand) which is adopted as it is.
fn matches(s: &TriggerSubscription, t: &TriggerRequest, bare: &str) -> bool {
    let s = &s.trigger;
    (s.hook_url == t.hook_url || s.hook_url == bare)
        && s.campaign_id == t.campaign_id
        && s.trigger_name == t.trigger_name
}

/// `t` as it is listed upstream (either URL form), or as we would register it.
fn registered_forms(
    existing: &[TriggerSubscription],
    t: &TriggerRequest,
    bare: &str,
) -> Vec<TriggerRequest> {
    let listed: Vec<TriggerRequest> = existing
        .iter()
        .filter(|s| matches(s, t, bare))
        .map(|s| TriggerRequest {
            hook_url: s.trigger.hook_url.clone(),
            ..t.clone()
        })
        .collect();
    if listed.is_empty() {
        vec![t.clone()]
    } else {
        listed
    }
}

/// A subscription id fit for status, Events and logs. The subscribe document calls the
/// id "the registered hookUrl"; the hook URL is Atlas' only secret, so an id holding it
/// (or any URL) is replaced by a digest that still tells ids apart.
fn safe_id(id: &str, hook_url: &str) -> String {
    // The ingress token is a long path segment of the hook URL.
    let path = url::Url::parse(hook_url)
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    let holds_token = path
        .split('/')
        .filter(|seg| seg.len() >= 16)
        .any(|seg| id.contains(seg));
    if id.contains("://") || id.contains(hook_url) || holds_token {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(id.as_bytes());
        format!("redacted-{}", &hex::encode(digest)[..16])
    } else {
        id.to_string()
    }
}

/// The hook URL is Atlas' only protection (deliveries are unsigned), so it is never echoed.
fn echo(campaign: &str, triggers: &[String]) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("campaignId".to_string(), campaign.to_string()),
        ("triggerNames".to_string(), triggers.join(",")),
    ])
}

#[async_trait]
impl ProviderApi for AtlasClient {
    async fn ensure(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
        previous: Option<&DesiredSubscription>,
    ) -> Result<Observed, ProviderError> {
        let campaign = campaign_of(desired)?;
        let wanted = desired.event_set();
        if wanted.is_empty() {
            return Err(ProviderError::Invalid("no events".into()));
        }
        let existing = match self.list(creds, campaign).await {
            Ok(list) => list,
            // Unobservable: nothing is written on a guess once this spec was applied;
            // a new or changed spec is applied with the (idempotent) subscribe calls.
            Err(ProviderError::CannotObserve(_)) if previous != Some(desired) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut wrote = false;
        let mut ids = Vec::with_capacity(wanted.len());
        for trigger in &wanted {
            let t = tuple(desired, campaign, trigger);
            match existing.iter().find(|s| matches(s, &t, &desired.hook_url)) {
                Some(s) => ids.push(safe_id(&s.id, &desired.hook_url)),
                None => {
                    ids.push(safe_id(
                        &self.subscribe(creds, &t).await?.id,
                        &desired.hook_url,
                    ));
                    wrote = true;
                }
            }
        }
        // What the previous spec registered and this one does not want.
        let mut stale: Vec<TriggerRequest> = Vec::new();
        if let Some(prev) = previous.filter(|p| p.provider == Provider::Atlas)
            && let Ok(prev_campaign) = campaign_of(prev)
        {
            let same_place = prev.hook_url == desired.hook_url && prev_campaign == campaign;
            let prev_existing = if prev_campaign == campaign {
                existing.clone()
            } else {
                // Unlistable: the per-trigger form is removed; a bare one cannot be seen.
                self.list(creds, prev_campaign).await.unwrap_or_default()
            };
            for trigger in prev.event_set() {
                if !(same_place && wanted.contains(&trigger)) {
                    let t = tuple(prev, prev_campaign, &trigger);
                    stale.extend(registered_forms(&prev_existing, &t, &prev.hook_url));
                }
            }
        }
        // Only `previous` says what is ours to remove: another subscription may share this
        // hook URL (same endpoint) with other triggers, so other tuples are left alone.
        for t in &stale {
            self.unsubscribe(creds, t).await?;
            wrote = true;
        }
        Ok(Observed {
            id: ids.join(","),
            echo: echo(campaign, &wanted),
            state: UpstreamState::Enabled,
            signing_secret: None,
            action: classify(desired, previous, wrote, false),
        })
    }

    async fn observe(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Option<Observed>, ProviderError> {
        let campaign = campaign_of(desired)?;
        let wanted = desired.event_set();
        let existing = self.list(creds, campaign).await?;
        let mut ids = Vec::new();
        let mut missing = Vec::new();
        for trigger in &wanted {
            let t = tuple(desired, campaign, trigger);
            match existing.iter().find(|s| matches(s, &t, &desired.hook_url)) {
                Some(s) => ids.push(safe_id(&s.id, &desired.hook_url)),
                None => missing.push(trigger.clone()),
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let state = if missing.is_empty() {
            UpstreamState::Enabled
        } else {
            UpstreamState::Incomplete {
                message: format!("triggers missing upstream: {}", missing.join(",")),
            }
        };
        Ok(Some(Observed {
            id: ids.join(","),
            echo: echo(campaign, &wanted),
            state,
            signing_secret: None,
            action: SyncAction::Unchanged,
        }))
    }

    async fn delete(
        &self,
        creds: &Credentials,
        applied: &DesiredSubscription,
    ) -> Result<(), ProviderError> {
        let campaign = campaign_of(applied)?;
        // The forms Atlas lists (a bare one may have been adopted); when it cannot list,
        // both URL forms, since either may exist. An absent one is gone.
        let existing = match self.list(creds, campaign).await {
            Ok(existing) => Some(existing),
            Err(ProviderError::CannotObserve(_)) => None,
            Err(e) => return Err(e),
        };
        for trigger in applied.event_set() {
            let t = tuple(applied, campaign, &trigger);
            let forms = match &existing {
                Some(existing) => registered_forms(existing, &t, &applied.hook_url),
                None => {
                    let bare = TriggerRequest {
                        hook_url: applied.hook_url.clone(),
                        ..t.clone()
                    };
                    vec![t, bare]
                }
            };
            for form in &forms {
                self.unsubscribe(creds, form).await?;
            }
        }
        Ok(())
    }
}

/// Verifies and splits an Atlas delivery. Atlas does not sign: the unguessable hook URL,
/// already matched by the ingress, is the whole check. Atlas may not retry, so one
/// unreadable element does not cost the others: they are read, and it is returned as
/// [`MalformedEvent`] for the dead-letter store.
pub fn parse_inbound(req: &InboundRequest<'_>) -> Result<Parsed, Rejection> {
    if req.method != http::Method::POST {
        return Err(Rejection::MethodNotAllowed);
    }
    require_json(req)?;
    let items =
        json_fields::array(req.body)?.ok_or(Rejection::BadRequest("expected a json array"))?;
    if items.is_empty() {
        return Err(Rejection::BadRequest("no events"));
    }
    let hint = trigger_hint(req.query);
    let mut parsed = Parsed::default();
    for item in items {
        match parse_event(item, hint) {
            Ok(event) => parsed.events.push(event),
            Err(rejection) => parsed.malformed.push(MalformedEvent {
                reason: rejection.detail(),
                raw: json_fields::bytes(item),
            }),
        }
    }
    Ok(parsed)
}

/// The trigger a hook URL was registered for, when it says so (`?trigger=<name>`).
fn trigger_hint(query: Option<&str>) -> Option<&'static str> {
    let t = url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "trigger")?
        .1;
    Provider::Atlas
        .event_names()
        .iter()
        .find(|n| **n == t)
        .copied()
}

/// One event. Atlas documents only `callId`; `triggerName` and `messageId` are used when
/// present. Without a trigger the event is known by where it arrived (`hint`), and the
/// dedupe key falls back to a digest of the event itself, so two different events never
/// share a key while a redelivery of the same one still does.
fn parse_event(raw: &RawValue, hint: Option<&str>) -> Result<InboundEvent, Rejection> {
    let ev = JsonObject::of(raw).ok_or(Rejection::BadRequest("event is not an object"))?;
    let trigger = ev.str("triggerName");
    let trigger = trigger.as_deref().or(hint);
    let dedupe_key = match (ev.str("messageId"), ev.str("callId"), trigger) {
        (Some(m), _, _) => format!("message:{m}"),
        (None, Some(c), Some(t)) => format!("call:{c}:{t}"),
        (None, Some(c), None) => format!("call:{c}:sha256:{}", content_digest(raw)),
        (None, None, _) => format!("sha256:{}", content_digest(raw)),
    };
    Ok(InboundEvent {
        event_type: trigger.unwrap_or(UNKNOWN_TRIGGER).to_string(),
        dedupe_key,
        // The element as Atlas sent it.
        payload: json_fields::bytes(raw),
        test: ev.bool("test") == Some(true),
    })
}

/// A digest of an event's content that a redelivery keeps whatever its key order or
/// spacing: the digest of its compact form with keys sorted (of its bytes as sent, for
/// the rare element `serde_json::Value` cannot hold, such as a number past f64).
fn content_digest(raw: &RawValue) -> String {
    use sha2::Digest;
    let compact = serde_json::from_str::<serde_json::Value>(raw.get())
        .map(|v| serde_json::to_vec(&v).expect("a JSON value serialises"));
    let bytes = compact.as_deref().unwrap_or(raw.get().as_bytes());
    hex::encode(&sha2::Sha256::digest(bytes)[..12])
}

/// Event type of an event that names no trigger and arrived on a URL that does not say.
pub const UNKNOWN_TRIGGER: &str = "unknown";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound_util::testing::{POST, json_headers, request};
    use proptest::prelude::*;

    fn req<'a>(h: &'a http::HeaderMap, body: &'a [u8]) -> InboundRequest<'a> {
        request(&POST, h, None, body)
    }

    #[test]
    fn parses_array_of_events() {
        let h = json_headers(&[]);
        let body = br#"[{"callId":"c1","campaignId":"k","triggerName":"call_completed","customerNumber":"+1"},
                        {"messageId":"m9","campaignId":"k","triggerName":"message_sent"}]"#;
        let parsed = parse_inbound(&req(&h, body)).unwrap();
        assert!(parsed.malformed.is_empty());
        let evs = parsed.events;
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].event_type, "call_completed");
        assert_eq!(evs[0].dedupe_key, "call:c1:call_completed");
        assert_eq!(evs[1].dedupe_key, "message:m9");
        let p: serde_json::Value = serde_json::from_slice(&evs[0].payload).unwrap();
        assert_eq!(p["callId"], "c1");
    }

    #[test]
    fn a_bad_element_is_kept_raw_and_the_others_are_read() {
        let h = json_headers(&[]);
        let body = br#"[{"callId":"c1","triggerName":"call_completed"},
                        "not an object",
                        {"callId":"c2","triggerName":"call_started"},
                        42]"#;
        let parsed = parse_inbound(&req(&h, body)).unwrap();
        let keys: Vec<_> = parsed
            .events
            .iter()
            .map(|e| e.dedupe_key.as_str())
            .collect();
        assert_eq!(keys, ["call:c1:call_completed", "call:c2:call_started"]);
        let reasons: Vec<_> = parsed.malformed.iter().map(|m| m.reason).collect();
        assert_eq!(
            reasons,
            ["event is not an object", "event is not an object"]
        );
        assert_eq!(&parsed.malformed[0].raw[..], br#""not an object""#);
        assert_eq!(&parsed.malformed[1].raw[..], b"42");
    }

    #[test]
    fn rejects_bad_input() {
        let h = json_headers(&[]);
        for (body, why) in [
            (&b"{"[..], "malformed json"),
            (br#"{"callId":"c"}"#, "expected a json array"),
            (b"[]", "no events"),
        ] {
            assert_eq!(
                parse_inbound(&req(&h, body)),
                Err(Rejection::BadRequest(why))
            );
        }
        let plain = http::HeaderMap::new();
        assert_eq!(
            parse_inbound(&req(&plain, b"[]")),
            Err(Rejection::UnsupportedMediaType)
        );
        let get = http::Method::GET;
        let r = request(&get, &h, None, b"[]");
        assert_eq!(parse_inbound(&r), Err(Rejection::MethodNotAllowed));
    }

    #[test]
    fn events_without_trigger_or_message_id_are_accepted_and_kept_apart() {
        let h = json_headers(&[]);
        // Only `callId` is documented: no triggerName, no messageId.
        let started = br#"[{"callId":"c7","campaignId":"k","startedAt":"2025-01-01T00:00:00Z"}]"#;
        let completed = br#"[{"callId":"c7","campaignId":"k","startedAt":"2025-01-01T00:00:00Z","endedAt":"2025-01-01T00:02:00Z","status":"completed"}]"#;
        let a = parse_inbound(&req(&h, started)).unwrap().events;
        let b = parse_inbound(&req(&h, completed)).unwrap().events;
        assert_eq!(a[0].event_type, UNKNOWN_TRIGGER);
        assert_ne!(a[0].dedupe_key, b[0].dedupe_key, "two events merged");
        assert!(
            a[0].dedupe_key.starts_with("call:c7:"),
            "{}",
            a[0].dedupe_key
        );
        // A redelivery of the same event keeps its key.
        assert_eq!(
            parse_inbound(&req(&h, started)).unwrap().events[0].dedupe_key,
            a[0].dedupe_key
        );
        // A message event without messageId is keyed by its content too.
        let m1 = parse_inbound(&req(
            &h,
            br#"[{"campaignId":"k","triggerName":"message_sent","text":"a"}]"#,
        ))
        .unwrap()
        .events;
        let m2 = parse_inbound(&req(
            &h,
            br#"[{"campaignId":"k","triggerName":"message_sent","text":"b"}]"#,
        ))
        .unwrap()
        .events;
        assert_eq!(m1[0].event_type, "message_sent");
        assert_ne!(m1[0].dedupe_key, m2[0].dedupe_key);
    }

    #[test]
    fn each_event_is_delivered_as_sent_and_keyed_by_its_content() {
        let h = json_headers(&[]);
        let first = br#"[ {"callId":"c9", "campaignId":"k","n":1} ]"#;
        let again = br#"[{"n":1,"campaignId":"k","callId":"c9"}]"#;
        let a = parse_inbound(&req(&h, first)).unwrap().events;
        let b = parse_inbound(&req(&h, again)).unwrap().events;
        assert_eq!(
            &a[0].payload[..],
            br#"{"callId":"c9", "campaignId":"k","n":1}"#
        );
        assert_eq!(
            &b[0].payload[..],
            br#"{"n":1,"campaignId":"k","callId":"c9"}"#
        );
        // A redelivery in another key order or spacing is still the same event.
        assert_eq!(a[0].dedupe_key, b[0].dedupe_key);
        // A number serde_json's tree cannot hold is keyed by its bytes, not a panic.
        let huge = parse_inbound(&req(&h, br#"[{"callId":"c9","n":1e999}]"#));
        assert!(
            huge.unwrap().events[0]
                .dedupe_key
                .starts_with("call:c9:sha256:")
        );
    }

    #[test]
    fn trigger_is_known_from_the_hook_url_it_arrived_on() {
        let h = json_headers(&[]);
        let body = br#"[{"callId":"c8","campaignId":"k"}]"#;
        let r = request(&POST, &h, Some("trigger=call_completed"), body);
        let evs = parse_inbound(&r).unwrap().events;
        assert_eq!(evs[0].event_type, "call_completed");
        assert_eq!(evs[0].dedupe_key, "call:c8:call_completed");
        // A field in the event wins over the URL; an unknown hint is ignored.
        let r = InboundRequest {
            query: Some("trigger=bogus"),
            ..r
        };
        assert_eq!(
            parse_inbound(&r).unwrap().events[0].event_type,
            UNKNOWN_TRIGGER
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panics(body in proptest::collection::vec(any::<u8>(), 0..512), ct in "[a-z/+;= -]{0,30}") {
            let mut h = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(&ct) { h.insert(http::header::CONTENT_TYPE, v); }
            let _ = parse_inbound(&req(&h, &body));
        }

        #[test]
        fn valid_event_always_parses(call in "[A-Za-z0-9_-]{1,24}", trig in prop::sample::select(vec!["call_started", "call_completed"])) {
            let h = json_headers(&[]);
            let body = serde_json::to_vec(&serde_json::json!([{"callId": call, "triggerName": trig, "campaignId": "c"}])).unwrap();
            let evs = parse_inbound(&req(&h, &body)).unwrap().events;
            prop_assert_eq!(evs.len(), 1);
            prop_assert_eq!(&evs[0].dedupe_key, &format!("call:{call}:{trig}"));
        }
    }
}
