//! Smallest.ai Atoms: one webhook per hook URL (its description names the owner), plus
//! per-agent subscriptions that several webhooks share, so every change to an agent's
//! subscriptions is read-merge-write and never drops another webhook's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::http as phttp;
use super::inbound_util::{require_json, verify_signature};
use super::json_fields::JsonObject;
use super::list_rounds::ListRounds;
use crate::inbound::{
    InboundEvent, InboundRequest, Rejection, SignatureEncoding, VerificationKeys,
};
use crate::model::{
    Credentials, DesiredSubscription, Observed, Provider, ProviderApi, ProviderEndpoints,
    ProviderError, Scope, SyncAction, UpstreamState, classify,
};

pub const SIGNATURE_HEADER: &str = "x-signature";
/// Prefix of the descriptions we write; the rest is the owner (`namespace/name`).
pub const DESCRIPTION_PREFIX: &str = "managed by webhook-operator for ";

/// `{status, data}` wrapper of every success answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub status: bool,
    pub data: T,
}

/// Body of `POST /webhook`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateWebhook {
    pub endpoint: String,
    pub description: String,
    pub events: Vec<AgentEvent>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentEvent {
    pub agent_id: String,
    pub event_type: String,
}

/// Body of `PATCH /webhook/{id}`; at least one field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchWebhook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

/// Body of `POST /agent/{agentId}/webhook-subscriptions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSubscriptions {
    pub webhook_id: String,
    pub event_types: Vec<String>,
}

/// A reference the API returns either as an id or populated (`{_id, name, ...}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IdRef {
    Id(String),
    Populated(Populated),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Populated {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl IdRef {
    pub fn id(&self) -> &str {
        match self {
            IdRef::Id(s) => s,
            IdRef::Populated(p) => &p.id,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    #[serde(rename = "_id")]
    pub id: String,
    pub webhook_id: IdRef,
    pub agent_id: IdRef,
    pub event_type: String,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    #[serde(rename = "_id")]
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub description: String,
    /// `enabled` or `disabled`.
    pub status: String,
    #[serde(default)]
    pub organization_id: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    /// Only on get-by-id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decrypted_secret_key: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("status", &self.status)
            .field("subscriptions", &self.subscriptions.len())
            .field(
                "decrypted_secret_key",
                &self.decrypted_secret_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// `data` of `GET /webhook`: one webhook with `webhookId`, all without.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    Many(Vec<Webhook>),
    One(Box<Webhook>),
}

fn extract_error(v: &serde_json::Value) -> Option<String> {
    let errs = v.get("errors")?.as_array()?;
    Some(
        errs.iter()
            .filter_map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    )
}

pub fn description_for(owner: &str) -> String {
    format!("{DESCRIPTION_PREFIX}{owner}")
}

#[derive(Clone)]
pub struct SmallestClient {
    api: phttp::KeyedApi,
    /// `GET /webhook` lists the whole account: concurrent passes share one list.
    lists: Arc<ListRounds<Vec<Webhook>>>,
}

fn scope_agents(d: &DesiredSubscription) -> Result<Vec<String>, ProviderError> {
    match &d.scope {
        Scope::Smallest { agent_ids } if !agent_ids.is_empty() => {
            let set: BTreeSet<String> = agent_ids.iter().cloned().collect();
            if set
                .iter()
                .any(|a| a.is_empty() || !a.chars().all(|c| c.is_ascii_alphanumeric()))
            {
                return Err(ProviderError::Invalid(
                    "agent id must be alphanumeric".into(),
                ));
            }
            Ok(set.into_iter().collect())
        }
        Scope::Smallest { .. } => Err(ProviderError::Invalid("no agent ids".into())),
        _ => Err(crate::model::scope_mismatch(Provider::Smallest)),
    }
}

/// Event types per agent that `w` currently holds.
fn subscribed(w: &Webhook) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &w.subscriptions {
        m.entry(s.agent_id.id().to_string())
            .or_default()
            .insert(s.event_type.clone());
    }
    m
}

fn observed(w: &Webhook, action: SyncAction) -> Observed {
    let subs = subscribed(w);
    let events: BTreeSet<&String> = subs.values().flatten().collect();
    Observed {
        id: w.id.clone(),
        echo: BTreeMap::from([
            ("webhookId".to_string(), w.id.clone()),
            ("status".to_string(), w.status.clone()),
            ("description".to_string(), w.description.clone()),
            (
                "agentIds".to_string(),
                subs.keys().cloned().collect::<Vec<_>>().join(","),
            ),
            (
                "eventTypes".to_string(),
                events.into_iter().cloned().collect::<Vec<_>>().join(","),
            ),
        ]),
        state: if w.status == "enabled" {
            UpstreamState::Enabled
        } else {
            UpstreamState::Disabled {
                message: format!(
                    "Smallest reports the webhook status {:?}; re-enable it in the Atoms dashboard (the API cannot)",
                    w.status
                ),
            }
        },
        signing_secret: w.decrypted_secret_key.clone(),
        action,
    }
}

impl SmallestClient {
    pub fn new(endpoints: &ProviderEndpoints) -> Self {
        SmallestClient {
            api: phttp::KeyedApi::new(
                endpoints,
                &endpoints.smallest_base,
                |r, key| r.bearer_auth(key),
                extract_error,
            ),
            lists: Arc::default(),
        }
    }

    async fn list(&self, creds: &Credentials) -> Result<Vec<Webhook>, ProviderError> {
        let resp = self
            .api
            .send(
                self.api.request(Method::GET, "/webhook", creds)?,
                "smallest list",
                creds,
            )
            .await?;
        Ok(
            match phttp::decode::<Envelope<OneOrMany>>(resp, "smallest list")
                .await?
                .data
            {
                OneOrMany::Many(v) => v,
                OneOrMany::One(w) => vec![*w],
            },
        )
    }

    /// `w` as listed when the list carried its secret (the SDK documents it there), else
    /// read again by id.
    async fn with_secret(&self, creds: &Credentials, w: Webhook) -> Result<Webhook, ProviderError> {
        if w.decrypted_secret_key
            .as_deref()
            .is_some_and(|k| !k.is_empty())
        {
            Ok(w)
        } else {
            self.get(creds, &w.id).await
        }
    }

    /// Get by id: always carries the signing secret.
    async fn get(&self, creds: &Credentials, id: &str) -> Result<Webhook, ProviderError> {
        let req = self
            .api
            .request(Method::GET, "/webhook", creds)?
            .query(&[("webhookId", id)]);
        let resp = self.api.send(req, "smallest get", creds).await?;
        match phttp::decode::<Envelope<OneOrMany>>(resp, "smallest get")
            .await?
            .data
        {
            OneOrMany::One(w) => Ok(*w),
            OneOrMany::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
            OneOrMany::Many(_) => Err(ProviderError::Unavailable(
                "smallest get: unexpected response shape".into(),
            )),
        }
    }

    /// Brings webhook `w` to `description` and to `events` for exactly `agents`; returns
    /// whether it wrote anything.
    async fn fix_up(
        &self,
        creds: &Credentials,
        w: &Webhook,
        description: String,
        agents: &[String],
        events: &BTreeSet<String>,
    ) -> Result<bool, ProviderError> {
        let mut wrote = false;
        if w.description != description {
            let patch = PatchWebhook {
                description: Some(description),
                ..Default::default()
            };
            self.patch(creds, &w.id, &patch).await?;
            wrote = true;
        }
        let current = subscribed(w);
        for agent in agents {
            if current.get(agent) != Some(events) {
                self.set_agent(creds, agent, &w.id, events).await?;
                wrote = true;
            }
        }
        for agent in current.keys().filter(|a| !agents.contains(a)) {
            self.remove_from_agent(creds, agent, &w.id).await?;
            wrote = true;
        }
        Ok(wrote)
    }

    async fn find_by_url(
        &self,
        creds: &Credentials,
        url: &str,
    ) -> Result<Option<Webhook>, ProviderError> {
        let key = creds.require_api_key()?.to_string();
        let (client, creds) = (self.clone(), creds.clone());
        let all = self
            .lists
            .join(&key, move || async move { client.list(&creds).await })
            .await?;
        Ok(all.iter().find(|w| w.url == url).cloned())
    }

    async fn create(
        &self,
        creds: &Credentials,
        body: &CreateWebhook,
    ) -> Result<String, ProviderError> {
        let resp = self
            .api
            .send_json(Method::POST, "/webhook", body, "smallest create", creds)
            .await?;
        Ok(phttp::decode::<Envelope<String>>(resp, "smallest create")
            .await?
            .data)
    }

    async fn patch(
        &self,
        creds: &Credentials,
        id: &str,
        body: &PatchWebhook,
    ) -> Result<(), ProviderError> {
        self.api
            .send_json(
                Method::PATCH,
                &format!("/webhook/{id}"),
                body,
                "smallest update",
                creds,
            )
            .await
            .map(drop)
    }

    async fn agent_subscriptions(
        &self,
        creds: &Credentials,
        agent: &str,
    ) -> Result<Vec<Subscription>, ProviderError> {
        let req = self.api.request(
            Method::GET,
            &format!("/agent/{agent}/webhook-subscriptions"),
            creds,
        )?;
        let resp = self
            .api
            .send(req, "smallest agent subscriptions", creds)
            .await?;
        Ok(
            phttp::decode::<Envelope<Vec<Subscription>>>(resp, "smallest agent subscriptions")
                .await?
                .data,
        )
    }

    /// Sets the event types of one webhook on one agent (PROVIDERS.md: the POST replaces
    /// the agent's subscriptions to the named webhook).
    async fn set_agent(
        &self,
        creds: &Credentials,
        agent: &str,
        webhook_id: &str,
        types: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let body = AgentSubscriptions {
            webhook_id: webhook_id.to_string(),
            event_types: types.iter().cloned().collect(),
        };
        self.api
            .send_json(
                Method::POST,
                &format!("/agent/{agent}/webhook-subscriptions"),
                &body,
                "smallest subscribe agent",
                creds,
            )
            .await
            .map(drop)
    }

    /// Removes `webhook_id`'s subscriptions from `agent`. The only removal endpoint drops
    /// every webhook's subscriptions on the agent, so the others are read first and
    /// written back.
    async fn remove_from_agent(
        &self,
        creds: &Credentials,
        agent: &str,
        webhook_id: &str,
    ) -> Result<(), ProviderError> {
        let current = match self.agent_subscriptions(creds, agent).await {
            Ok(c) => c,
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !current.iter().any(|s| s.webhook_id.id() == webhook_id) {
            return Ok(());
        }
        let mut others: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in current.iter().filter(|s| s.webhook_id.id() != webhook_id) {
            others
                .entry(s.webhook_id.id().to_string())
                .or_default()
                .insert(s.event_type.clone());
        }
        let req = self.api.request(
            Method::DELETE,
            &format!("/agent/{agent}/webhook-subscriptions"),
            creds,
        )?;
        phttp::removed(
            self.api
                .send(req, "smallest unsubscribe agent", creds)
                .await,
        )?;
        for (other, types) in &others {
            self.set_agent(creds, agent, other, types).await?;
        }
        Ok(())
    }

    async fn delete_webhook(&self, creds: &Credentials, w: &Webhook) -> Result<(), ProviderError> {
        for agent in subscribed(w).keys() {
            self.remove_from_agent(creds, agent, &w.id).await?;
        }
        let req = self
            .api
            .request(Method::DELETE, &format!("/webhook/{}", w.id), creds)?;
        phttp::removed(self.api.send(req, "smallest delete", creds).await)
    }
}

#[async_trait]
impl ProviderApi for SmallestClient {
    async fn ensure(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
        previous: Option<&DesiredSubscription>,
    ) -> Result<Observed, ProviderError> {
        let agents = scope_agents(desired)?;
        let events: BTreeSet<String> = desired.event_set().into_iter().collect();
        if events.is_empty() {
            return Err(ProviderError::Invalid("no events".into()));
        }
        let description = description_for(&desired.owner);
        let mut found = false;
        let mut listed = None;
        // Find by URL first: creating a second webhook for a registered URL is a 400.
        let (id, wrote) = match self.find_by_url(creds, &desired.hook_url).await? {
            None => {
                let body = CreateWebhook {
                    endpoint: desired.hook_url.clone(),
                    description,
                    events: agents
                        .iter()
                        .flat_map(|a| {
                            events.iter().map(move |e| AgentEvent {
                                agent_id: a.clone(),
                                event_type: e.clone(),
                            })
                        })
                        .collect(),
                };
                (self.create(creds, &body).await?, true)
            }
            Some(w) => {
                found = true;
                let wrote = self
                    .fix_up(creds, &w, description, &agents, &events)
                    .await?;
                let id = w.id.clone();
                listed = Some(w);
                (id, wrote)
            }
        };
        // The hook URL moved: the old webhook is ours alone and must go.
        let mut replaced = false;
        if let Some(prev) =
            previous.filter(|p| p.provider == Provider::Smallest && p.hook_url != desired.hook_url)
            && let Some(old) = self.find_by_url(creds, &prev.hook_url).await?
        {
            self.delete_webhook(creds, &old).await?;
            replaced = true;
        }
        let w = match listed.filter(|_| !wrote && !replaced) {
            Some(w) => self.with_secret(creds, w).await?,
            None => self.get(creds, &id).await?,
        };
        let action = if found && previous.is_none() {
            // Ours by URL but unknown to the caller: taken over, even if we fixed it up.
            SyncAction::Adopted
        } else {
            classify(desired, previous, wrote || replaced, replaced)
        };
        Ok(observed(&w, action))
    }

    async fn observe(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Option<Observed>, ProviderError> {
        let agents = scope_agents(desired)?;
        let Some(w) = self.find_by_url(creds, &desired.hook_url).await? else {
            return Ok(None);
        };
        let w = self.with_secret(creds, w).await?;
        let mut o = observed(&w, SyncAction::Unchanged);
        let events: BTreeSet<String> = desired.event_set().into_iter().collect();
        let current = subscribed(&w);
        let missing: Vec<&str> = agents
            .iter()
            .filter(|a| current.get(*a) != Some(&events))
            .map(String::as_str)
            .collect();
        if o.state == UpstreamState::Enabled && !missing.is_empty() {
            o.state = UpstreamState::Incomplete {
                message: format!(
                    "agents without the desired subscriptions: {}",
                    missing.join(",")
                ),
            };
        }
        Ok(Some(o))
    }

    /// The webhook at the URL (one per URL at Smallest), from the list, or a GET by id
    /// when the list leaves `decryptedSecretKey` out.
    async fn signing_secrets(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Vec<String>, ProviderError> {
        let Some(w) = self.find_by_url(creds, &desired.hook_url).await? else {
            return Ok(Vec::new());
        };
        let w = self.with_secret(creds, w).await?;
        Ok(w.decrypted_secret_key
            .into_iter()
            .filter(|k| !k.is_empty())
            .collect())
    }

    async fn delete(
        &self,
        creds: &Credentials,
        applied: &DesiredSubscription,
    ) -> Result<(), ProviderError> {
        match self.find_by_url(creds, &applied.hook_url).await? {
            Some(w) => self.delete_webhook(creds, &w).await,
            None => Ok(()),
        }
    }
}

/// Verifies a Smallest delivery (`X-Signature`); the body is one event.
pub fn parse_inbound(
    keys: &VerificationKeys,
    req: &InboundRequest<'_>,
) -> Result<Vec<InboundEvent>, Rejection> {
    if req.method != http::Method::POST {
        return Err(Rejection::MethodNotAllowed);
    }
    require_json(req)?;
    verify_signature(req, SIGNATURE_HEADER, &keys.secrets, SignatureEncoding::Hex)?;
    let ev = JsonObject::parse(req.body)?.ok_or(Rejection::BadRequest("expected a json object"))?;
    let id = ev.str("id").ok_or(Rejection::BadRequest("missing id"))?;
    let event = ev
        .str("event")
        .ok_or(Rejection::BadRequest("missing event"))?;
    let event_type = match ev.object("metadata").and_then(|m| m.str("eventType")) {
        Some(t) => t.into_owned(),
        None => event
            .split_once('.')
            .map(|(_, t)| t)
            .filter(|t| !t.is_empty())
            .ok_or(Rejection::BadRequest("missing event type"))?
            .to_string(),
    };
    Ok(vec![InboundEvent {
        event_type,
        dedupe_key: id.into_owned(),
        // The envelope is the event: keep the exact bytes that were signed.
        payload: bytes::Bytes::copy_from_slice(req.body),
        test: ev.bool("test") == Some(true),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound_util::testing::{POST, json_headers, request};
    use crate::sign_hex;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"whsec-smallest-1";

    fn keys() -> VerificationKeys {
        VerificationKeys {
            secrets: vec![SECRET.to_vec()],
            header_name: None,
            ..Default::default()
        }
    }

    fn body(kind: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "url": "https://x/h", "description": "d", "event": format!("60d0fe4f5311236168a109ca.{kind}"),
            "metadata": {"agentId": "60d0fe4f5311236168a109ca", "eventType": kind, "conversationType": "outbound", "callId": "c1"},
            "id": "dlv-1"
        })).unwrap()
    }

    fn parse(body: &[u8], sig: &str) -> Result<Vec<InboundEvent>, Rejection> {
        let h = json_headers(&[("X-Signature", sig)]);
        parse_inbound(&keys(), &request(&POST, &h, None, body))
    }

    #[test]
    fn parses_signed_delivery() {
        let b = body("post-conversation");
        let evs = parse(&b, &sign_hex(SECRET, &b)).unwrap();
        assert_eq!(evs[0].event_type, "post-conversation");
        assert_eq!(evs[0].dedupe_key, "dlv-1");
        assert_eq!(&evs[0].payload[..], &b[..]);
    }

    #[test]
    fn event_type_falls_back_to_event_suffix() {
        let b =
            br#"{"id":"d","event":"a1.pre-conversation","url":"u","description":"","metadata":{}}"#;
        assert_eq!(
            parse(b, &sign_hex(SECRET, b)).unwrap()[0].event_type,
            "pre-conversation"
        );
        let b = br#"{"id":"d","event":"nodot"}"#;
        assert_eq!(
            parse(b, &sign_hex(SECRET, b)),
            Err(Rejection::BadRequest("missing event type"))
        );
    }

    #[test]
    fn rejects_unsigned_and_wrong_type() {
        let b = body("pre-conversation");
        assert_eq!(
            parse(&b, &sign_hex(b"nope", &b)),
            Err(Rejection::Unauthorized("bad signature"))
        );
        let mut h = json_headers(&[("X-Signature", &sign_hex(SECRET, &b))]);
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        let r = request(&POST, &h, None, &b);
        assert_eq!(
            parse_inbound(&keys(), &r),
            Err(Rejection::UnsupportedMediaType)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..512), sig in "[0-9a-fA-F]{0,70}") {
            let _ = parse(&b, &sig);
            let _ = parse(&b, &sign_hex(SECRET, &b));
        }

        #[test]
        fn signed_valid_body_parses(kind in prop::sample::select(vec!["pre-conversation", "post-conversation", "analytics-completed"])) {
            let b = body(kind);
            prop_assert_eq!(&parse(&b, &sign_hex(SECRET, &b)).unwrap()[0].event_type, kind);
        }

        #[test]
        fn flipped_byte_is_rejected(idx in any::<prop::sample::Index>(), bit in 0u8..8) {
            let b = body("post-conversation");
            let sig = sign_hex(SECRET, &b);
            let mut t = b.clone();
            let i = idx.index(t.len());
            t[i] ^= 1 << bit;
            prop_assert_eq!(parse(&t, &sig), Err(Rejection::Unauthorized("bad signature")));
        }
    }
}
