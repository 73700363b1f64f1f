//! Atlas (api.youratlas.com): one upstream subscription per (campaignId, triggerName,
//! hookUrl), `api-key` header, unsigned deliveries holding a JSON array of events.

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response};
use serde::{Deserialize, Serialize};

use super::http::{self as phttp, USER_AGENT};
use super::inbound_util::{parse_json, require_json, str_field, to_payload};
use super::{
    Credentials, DesiredSubscription, Observed, Provider, ProviderApi, ProviderEndpoints,
    ProviderError, Scope, SyncAction, UpstreamState, classify,
};
use crate::inbound::{InboundEvent, InboundRequest, MalformedEvent, Parsed, Rejection};

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

/// One element of the list answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerSubscription {
    pub id: String,
    pub hook_url: String,
    pub campaign_id: String,
    pub trigger_name: String,
    pub provider: String,
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
    http: reqwest::Client,
    base: String,
}

impl AtlasClient {
    pub fn new(endpoints: &ProviderEndpoints) -> Self {
        AtlasClient {
            http: phttp::build_client(endpoints, USER_AGENT),
            base: endpoints.atlas_base.trim_end_matches('/').to_string(),
        }
    }

    fn request(&self, method: Method, path: &str, key: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("api-key", key)
    }

    async fn send(
        &self,
        req: RequestBuilder,
        what: &str,
        creds: &Credentials,
    ) -> Result<Response, ProviderError> {
        phttp::send(req, what, creds, extract_error).await
    }

    async fn list(
        &self,
        creds: &Credentials,
        campaign_id: &str,
    ) -> Result<Vec<TriggerSubscription>, ProviderError> {
        let key = creds.require_api_key()?;
        let req = self
            .request(Method::GET, "/events-gateway/trigger/list", key)
            .query(&[("campaignId", campaign_id)]);
        match self.send(req, "atlas list", creds).await {
            Ok(resp) => phttp::decode(resp, "atlas list").await,
            // A campaign without subscriptions may answer 404 rather than [].
            Err(ProviderError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    async fn subscribe(
        &self,
        creds: &Credentials,
        body: &TriggerRequest,
    ) -> Result<SubscribeResponse, ProviderError> {
        let key = creds.require_api_key()?;
        let req = self
            .request(Method::POST, "/events-gateway/trigger/subscribe", key)
            .json(body);
        let resp = self.send(req, "atlas subscribe", creds).await?;
        phttp::decode(resp, "atlas subscribe").await
    }

    /// Unsubscribes one tuple; an unknown tuple is already gone.
    async fn unsubscribe(
        &self,
        creds: &Credentials,
        body: &TriggerRequest,
    ) -> Result<(), ProviderError> {
        let key = creds.require_api_key()?;
        let req = self
            .request(Method::DELETE, "/events-gateway/trigger/unsubscribe", key)
            .json(body);
        match self.send(req, "atlas unsubscribe", creds).await {
            Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn campaign_of(d: &DesiredSubscription) -> Result<&str, ProviderError> {
    match &d.scope {
        Scope::Atlas { campaign_id } if !campaign_id.is_empty() => Ok(campaign_id),
        _ => Err(super::scope_mismatch(Provider::Atlas)),
    }
}

fn tuple(d: &DesiredSubscription, campaign: &str, trigger: &str) -> TriggerRequest {
    TriggerRequest {
        hook_url: d.hook_url.clone(),
        campaign_id: campaign.to_string(),
        trigger_name: trigger.to_string(),
        provider: PROVIDER_CUSTOM.to_string(),
    }
}

fn matches(s: &TriggerSubscription, t: &TriggerRequest) -> bool {
    s.hook_url == t.hook_url && s.campaign_id == t.campaign_id && s.trigger_name == t.trigger_name
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
        let existing = self.list(creds, campaign).await?;
        let mut wrote = false;
        let mut ids = Vec::with_capacity(wanted.len());
        for trigger in &wanted {
            let t = tuple(desired, campaign, trigger);
            match existing.iter().find(|s| matches(s, &t)) {
                Some(s) => ids.push(s.id.clone()),
                None => {
                    ids.push(self.subscribe(creds, &t).await?.id);
                    wrote = true;
                }
            }
        }
        let keep = |t: &TriggerRequest| {
            t.hook_url == desired.hook_url
                && t.campaign_id == campaign
                && wanted.contains(&t.trigger_name)
        };
        // What the previous spec registered and this one does not want.
        let mut stale: Vec<TriggerRequest> = Vec::new();
        if let Some(prev) = previous.filter(|p| p.provider == Provider::Atlas)
            && let Ok(prev_campaign) = campaign_of(prev)
        {
            for trigger in prev.event_set() {
                let t = tuple(prev, prev_campaign, &trigger);
                if !keep(&t) {
                    stale.push(t);
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
            match existing.iter().find(|s| matches(s, &t)) {
                Some(s) => ids.push(s.id.clone()),
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
        for trigger in applied.event_set() {
            self.unsubscribe(creds, &tuple(applied, campaign, &trigger))
                .await?;
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
    let body = parse_json(req.body)?;
    let items = body
        .as_array()
        .ok_or(Rejection::BadRequest("expected a json array"))?;
    if items.is_empty() {
        return Err(Rejection::BadRequest("no events"));
    }
    let mut parsed = Parsed::default();
    for item in items {
        match parse_event(item) {
            Ok(event) => parsed.events.push(event),
            Err(rejection) => parsed.malformed.push(MalformedEvent {
                reason: rejection.reason(),
                raw: to_payload(item),
            }),
        }
    }
    Ok(parsed)
}

fn parse_event(ev: &serde_json::Value) -> Result<InboundEvent, Rejection> {
    if !ev.is_object() {
        return Err(Rejection::BadRequest("event is not an object"));
    }
    let trigger =
        str_field(ev, "triggerName").ok_or(Rejection::BadRequest("missing triggerName"))?;
    let dedupe_key = if let Some(m) = str_field(ev, "messageId") {
        format!("message:{m}")
    } else if let Some(c) = str_field(ev, "callId") {
        format!("call:{c}:{trigger}")
    } else {
        return Err(Rejection::BadRequest("missing callId or messageId"));
    };
    Ok(InboundEvent {
        event_type: trigger.to_string(),
        dedupe_key,
        payload: to_payload(ev),
        test: ev.get("test").and_then(serde_json::Value::as_bool) == Some(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::inbound_util::testing::{POST, json_headers};
    use proptest::prelude::*;

    fn req<'a>(h: &'a http::HeaderMap, body: &'a [u8]) -> InboundRequest<'a> {
        InboundRequest {
            method: &POST,
            headers: h,
            query: None,
            body,
        }
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
                        {"callId":"c2"},
                        "not an object",
                        {"triggerName":"call_started"}]"#;
        let parsed = parse_inbound(&req(&h, body)).unwrap();
        assert_eq!(parsed.events.len(), 1);
        assert_eq!(parsed.events[0].dedupe_key, "call:c1:call_completed");
        let reasons: Vec<_> = parsed.malformed.iter().map(|m| m.reason).collect();
        assert_eq!(
            reasons,
            [
                "missing triggerName",
                "event is not an object",
                "missing callId or messageId"
            ]
        );
        assert_eq!(&parsed.malformed[0].raw[..], br#"{"callId":"c2"}"#);
        assert_eq!(&parsed.malformed[1].raw[..], br#""not an object""#);
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
        let r = InboundRequest {
            method: &get,
            headers: &h,
            query: None,
            body: b"[]",
        };
        assert_eq!(parse_inbound(&r), Err(Rejection::MethodNotAllowed));
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
