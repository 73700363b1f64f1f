//! Atomic (atomic.io) Workbench webhooks: OAuth2 client credentials, one upstream webhook
//! per subscription, no update endpoint (replace = create new, then disable old), and
//! deliveries signed with `X-Atomic-Signature` (an assumption, see PROVIDERS.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::http::{self as phttp, USER_AGENT};
use super::inbound_util::{require_json, verify_signature};
use super::json_fields::{self, JsonObject};
use crate::inbound::{InboundEvent, InboundRequest, Rejection, VerificationKeys};
use crate::model::{
    AtomicMethod, Credentials, DesiredSubscription, Observed, Provider, ProviderApi,
    ProviderEndpoints, ProviderError, Scope, SyncAction, UpstreamState, classify, method_str,
};

/// Signature header of deliveries.
pub const SIGNATURE_HEADER: &str = "x-atomic-signature";
/// Custom header written on every webhook we create: Atomic echoes `headers` in the list,
/// which makes it our ownership marker (Atomic has no description field).
pub const OWNER_HEADER: &str = "X-Webhook-Operator-Owner";
/// `data.analyticsEvent` of the payload the test endpoint sends (assumption).
pub const TEST_EVENT: &str = "webhook-test";

/// Body of `POST /v1/{env}/webhook`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateWebhook {
    pub types: Vec<String>,
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_template_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_flow_config_id: Option<String>,
    /// Delivery method, `POST` (default) or `PUT` (assumed field name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<AtomicMethod>,
}

/// A webhook as Atomic returns it: what was created, with its id, secret and dates.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    #[serde(flatten)]
    pub spec: CreateWebhook,
    #[serde(default)]
    pub secret: Option<String>,
    pub created: String,
    pub updated: String,
    /// Disabled webhooks stay listed with `enabled: false` (assumption). `None`: the
    /// provider did not say, which is never read as enabled when adopting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("types", &self.spec.types)
            .field("enabled", &self.enabled)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Atomic wraps every answer in `data`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Data<T> {
    pub data: T,
}

/// OAuth2 token answer.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
}

/// Error shape (assumption): API errors `{"error":"<code>","message":"..."}`; the token
/// endpoint answers the OAuth2 `{"error":"...","error_description":"..."}`.
fn extract_error(v: &serde_json::Value) -> Option<String> {
    let code = v.get("error").and_then(|e| e.as_str());
    let msg = v
        .get("message")
        .or_else(|| v.get("error_description"))
        .and_then(|m| m.as_str());
    match (code, msg) {
        (Some(c), Some(m)) => Some(format!("{c}: {m}")),
        (c, m) => c.or(m).map(str::to_string),
    }
}

/// Organization, client id and a digest of the client secret: a token is only reused for
/// the very credential that obtained it (a wrong secret with a known client id must not
/// borrow another subscription's token), and the secret itself is never kept.
type TokenKey = (String, String, [u8; 32]);

fn token_key(org: &str, id: &str, secret: &str) -> TokenKey {
    use sha2::Digest;
    (
        org.to_string(),
        id.to_string(),
        sha2::Sha256::digest(secret.as_bytes()).into(),
    )
}

struct CachedToken {
    token: String,
    refresh_at: Instant,
}

pub struct AtomicClient {
    http: reqwest::Client,
    base_template: String,
    token_template: String,
    /// Per organization and credential (see [`token_key`]).
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    /// Webhooks this client disabled. Atomic may not say `enabled: false` in its list
    /// (an assumption), so without this a disabled one would be disabled again, and
    /// reported as a change, on every resync.
    disabled: Mutex<HashSet<String>>,
}

/// Bound of [`AtomicClient::disabled`]; past it the memory starts over (at worst one
/// redundant disable call per webhook).
const DISABLED_MEMORY: usize = 10_000;

struct AtomicScope<'a> {
    org: &'a str,
    env: &'a str,
    card: Option<&'a str>,
    flow: Option<&'a str>,
    method: AtomicMethod,
}

fn scope_of(d: &DesiredSubscription) -> Result<AtomicScope<'_>, ProviderError> {
    match &d.scope {
        Scope::Atomic {
            organization_id,
            environment_id,
            card_template_id,
            action_flow_config_id,
            method,
        } => {
            // The org id becomes part of a host name and the env id a path segment.
            let safe = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            };
            if !safe(organization_id) || !safe(environment_id) {
                return Err(ProviderError::Invalid(
                    "organization or environment id has invalid characters".into(),
                ));
            }
            Ok(AtomicScope {
                org: organization_id,
                env: environment_id,
                card: card_template_id.as_deref(),
                flow: action_flow_config_id.as_deref(),
                method: *method,
            })
        }
        _ => Err(crate::model::scope_mismatch(Provider::Atomic)),
    }
}

/// Same delivery as `d` wants. Only what the provider documents in its answers (`url`,
/// `types`) must match; the assumed echoes (`cardTemplateId`, `actionFlowConfigId`,
/// `method`) are compared only when the provider returned them, so a provider that does
/// not echo them never makes us replace a webhook (PROVIDERS.md).
fn identical(w: &Webhook, d: &DesiredSubscription, s: &AtomicScope<'_>) -> bool {
    let mut types = w.spec.types.clone();
    types.sort();
    types.dedup();
    let same_if_returned = |got: Option<&str>, want: Option<&str>| got.is_none() || got == want;
    w.spec.url == d.hook_url
        && types == d.event_set()
        && same_if_returned(w.spec.card_template_id.as_deref(), s.card)
        && same_if_returned(w.spec.action_flow_config_id.as_deref(), s.flow)
        && w.spec.method.is_none_or(|m| m == s.method)
}

/// Worth keeping for `d` (the caller also drops what is known to be disabled): ours
/// (the owner header we send), or someone else's that the provider says is enabled:
/// adopting needs certainty, a missing `enabled` is not enough.
fn keepable(w: &Webhook, d: &DesiredSubscription, s: &AtomicScope<'_>) -> bool {
    identical(w, d, s) && (owned_by(w, &d.owner) || w.enabled == Some(true))
}

fn owned_by(w: &Webhook, owner: &str) -> bool {
    w.spec
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case(OWNER_HEADER) && v == owner)
}

fn echo(w: &Webhook, s: &AtomicScope<'_>) -> BTreeMap<String, String> {
    let mut e = BTreeMap::from([
        ("webhookId".to_string(), w.id.clone()),
        ("types".to_string(), w.spec.types.join(",")),
        ("environmentId".to_string(), s.env.to_string()),
        ("updated".to_string(), w.updated.clone()),
    ]);
    // Assumed fields: echoed only when the provider returned them.
    if let Some(m) = w.spec.method {
        e.insert("method".into(), method_str(m).into());
    }
    if let Some(en) = w.enabled {
        e.insert("enabled".into(), en.to_string());
    }
    if let Some(c) = &w.spec.card_template_id {
        e.insert("cardTemplateId".into(), c.clone());
    }
    if let Some(f) = &w.spec.action_flow_config_id {
        e.insert("actionFlowConfigId".into(), f.clone());
    }
    e
}

impl AtomicClient {
    pub fn new(endpoints: &ProviderEndpoints) -> Self {
        AtomicClient {
            // Atomic rejects calls without a User-Agent; the client sets it on every call.
            http: phttp::build_client(endpoints, USER_AGENT),
            base_template: endpoints.atomic_base.trim_end_matches('/').to_string(),
            token_template: endpoints.atomic_token_url.clone(),
            tokens: Mutex::new(HashMap::new()),
            disabled: Mutex::new(HashSet::new()),
        }
    }

    fn client_creds(creds: &Credentials) -> Result<(&str, &str), ProviderError> {
        match (creds.client_id.as_deref(), creds.client_secret.as_deref()) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Ok((id, secret)),
            _ => Err(ProviderError::Invalid(
                "credentials need a client id and a client secret".into(),
            )),
        }
    }

    async fn token(&self, creds: &Credentials, org: &str) -> Result<String, ProviderError> {
        let (id, secret) = Self::client_creds(creds)?;
        let key = token_key(org, id, secret);
        if let Some(t) = self.tokens.lock().expect("token cache").get(&key)
            && Instant::now() < t.refresh_at
        {
            return Ok(t.token.clone());
        }
        let url = self.token_template.replace("{orgId}", org);
        let resp = self
            .http
            .post(url)
            .basic_auth(id, Some(secret))
            // reqwest's `form` feature is off; the body is a fixed form string.
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| phttp::transport_error("atomic token", &e))?;
        if !resp.status().is_success() {
            return Err(phttp::error_from_response(
                resp,
                "atomic token",
                creds,
                &[],
                extract_error,
            )
            .await);
        }
        let t: TokenResponse = phttp::decode(resp, "atomic token").await?;
        let lifetime = Duration::from_secs(t.expires_in);
        // Refresh a minute early, or half-way for short-lived tokens, so a call never
        // leaves with a token that expires in flight.
        let margin = Duration::from_secs(60).min(lifetime / 2);
        self.tokens.lock().expect("token cache").insert(
            key,
            CachedToken {
                token: t.access_token.clone(),
                refresh_at: Instant::now() + lifetime - margin,
            },
        );
        Ok(t.access_token)
    }

    fn forget_token(&self, creds: &Credentials, org: &str) {
        if let Ok((id, secret)) = Self::client_creds(creds) {
            self.tokens
                .lock()
                .expect("token cache")
                .remove(&token_key(org, id, secret));
        }
    }

    /// One API call with a bearer token; a 401 drops the cached token and retries once
    /// (the token may have been revoked or expired early).
    async fn call(
        &self,
        creds: &Credentials,
        org: &str,
        method: Method,
        path: &str,
        body: Option<&CreateWebhook>,
        what: &str,
    ) -> Result<reqwest::Response, ProviderError> {
        let url = format!("{}{path}", self.base_template.replace("{orgId}", org));
        for attempt in 0..2 {
            let token = self.token(creds, org).await?;
            let mut req = self.http.request(method.clone(), &url).bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| phttp::transport_error(what, &e))?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.forget_token(creds, org);
                continue;
            }
            if resp.status().is_success() {
                return Ok(resp);
            }
            return Err(
                phttp::error_from_response(resp, what, creds, &[&token], extract_error).await,
            );
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn list(
        &self,
        creds: &Credentials,
        s: &AtomicScope<'_>,
    ) -> Result<Vec<Webhook>, ProviderError> {
        let resp = self
            .call(
                creds,
                s.org,
                Method::GET,
                &format!("/v1/{}/webhook", s.env),
                None,
                "atomic list",
            )
            .await?;
        Ok(phttp::decode::<Data<Vec<Webhook>>>(resp, "atomic list")
            .await?
            .data)
    }

    async fn create(
        &self,
        creds: &Credentials,
        d: &DesiredSubscription,
        s: &AtomicScope<'_>,
    ) -> Result<Webhook, ProviderError> {
        let body = CreateWebhook {
            types: d.event_set(),
            url: d.hook_url.clone(),
            headers: BTreeMap::from([(OWNER_HEADER.to_string(), d.owner.clone())]),
            card_template_id: s.card.map(str::to_string),
            action_flow_config_id: s.flow.map(str::to_string),
            method: Some(s.method),
        };
        let path = format!("/v1/{}/webhook", s.env);
        let resp = self
            .call(
                creds,
                s.org,
                Method::POST,
                &path,
                Some(&body),
                "atomic create",
            )
            .await?;
        Ok(phttp::decode::<Data<Webhook>>(resp, "atomic create")
            .await?
            .data)
    }

    /// DELETE disables; an unknown id is already gone.
    async fn disable(
        &self,
        creds: &Credentials,
        s: &AtomicScope<'_>,
        id: &str,
    ) -> Result<(), ProviderError> {
        let path = format!("/v1/{}/webhook/{}", s.env, urlencode(id));
        phttp::removed(
            self.call(creds, s.org, Method::DELETE, &path, None, "atomic disable")
                .await,
        )
    }

    /// Asks Atomic to send a test event to the webhook.
    pub async fn test(
        &self,
        creds: &Credentials,
        d: &DesiredSubscription,
        id: &str,
    ) -> Result<(), ProviderError> {
        let s = scope_of(d)?;
        let path = format!("/v1/{}/webhook/{}/test", s.env, urlencode(id));
        self.call(creds, s.org, Method::POST, &path, None, "atomic test")
            .await
            .map(drop)
    }

    /// Disables every enabled webhook that `owner` or `prev` registered, except `keep`.
    async fn disable_ours(
        &self,
        creds: &Credentials,
        s: &AtomicScope<'_>,
        list: &[Webhook],
        owner: &str,
        prev: Option<(&DesiredSubscription, &AtomicScope<'_>)>,
        keep: Option<&str>,
    ) -> Result<bool, ProviderError> {
        let mut any = false;
        for w in list
            .iter()
            .filter(|w| self.may_be_enabled(w) && Some(w.id.as_str()) != keep)
        {
            let was_prev = prev.is_some_and(|(p, ps)| identical(w, p, ps));
            if owned_by(w, owner) || was_prev {
                self.disable(creds, s, &w.id).await?;
                let mut disabled = self.disabled.lock().expect("disabled ids");
                if disabled.len() >= DISABLED_MEMORY {
                    disabled.clear();
                }
                disabled.insert(w.id.clone());
                any = true;
            }
        }
        Ok(any)
    }

    /// Not known to be disabled, neither by the list nor because we disabled it.
    fn may_be_enabled(&self, w: &Webhook) -> bool {
        match w.enabled {
            Some(enabled) => enabled,
            None => !self.disabled.lock().expect("disabled ids").contains(&w.id),
        }
    }

    /// Which of several identical webhooks is the live one: one that may be enabled,
    /// ours, the newest (replacing creates the new one before disabling the old).
    fn rank<'w>(&self, w: &'w Webhook, owner: &str) -> (bool, bool, &'w str) {
        (
            self.may_be_enabled(w),
            owned_by(w, owner),
            w.created.as_str(),
        )
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[async_trait]
impl ProviderApi for AtomicClient {
    async fn send_test(
        &self,
        creds: &Credentials,
        applied: &DesiredSubscription,
        id: &str,
    ) -> Result<bool, ProviderError> {
        let s = scope_of(applied)?;
        self.call(
            creds,
            s.org,
            Method::POST,
            &format!("/v1/{}/webhook/{}/test", s.env, urlencode(id)),
            None,
            "atomic test",
        )
        .await?;
        Ok(true)
    }

    async fn ensure(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
        previous: Option<&DesiredSubscription>,
    ) -> Result<Observed, ProviderError> {
        let s = scope_of(desired)?;
        if desired.events.is_empty() {
            return Err(ProviderError::Invalid("no events".into()));
        }
        let list = self.list(creds, &s).await?;
        let prev = previous
            .filter(|p| p.provider == Provider::Atomic)
            .and_then(|p| scope_of(p).ok().map(|ps| (p, ps)));
        // The spec changed in a field the provider may not echo: what `previous` created
        // looks identical in the list, yet is the old delivery.
        let unechoed_change = prev
            .as_ref()
            .is_some_and(|(_, ps)| ps.card != s.card || ps.flow != s.flow || ps.method != s.method);
        let found = list
            .iter()
            .filter(|w| self.may_be_enabled(w) && keepable(w, desired, &s))
            .filter(|w| {
                !(unechoed_change && prev.as_ref().is_some_and(|(p, ps)| identical(w, p, ps)))
            })
            .max_by_key(|w| self.rank(w, &desired.owner))
            .cloned();
        let (active, created) = match found {
            Some(w) => (w, false),
            // A disabled identical one cannot be re-enabled through the API: create anew.
            None => (self.create(creds, desired, &s).await?, true),
        };
        let mut replaced = self
            .disable_ours(
                creds,
                &s,
                &list,
                &desired.owner,
                prev.as_ref().map(|(p, ps)| (*p, ps)),
                Some(&active.id),
            )
            .await?;
        // The previous spec lived in another org or environment: clean up there too.
        if let Some((p, ps)) = &prev
            && (ps.org != s.org || ps.env != s.env)
        {
            let old = self.list(creds, ps).await?;
            replaced |= self
                .disable_ours(creds, ps, &old, &p.owner, Some((p, ps)), None)
                .await?;
        }
        Ok(Observed {
            id: active.id.clone(),
            echo: echo(&active, &s),
            state: UpstreamState::Enabled,
            signing_secret: active.secret.clone(),
            action: classify(desired, previous, created || replaced, replaced),
        })
    }

    async fn observe(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Option<Observed>, ProviderError> {
        let s = scope_of(desired)?;
        let list = self.list(creds, &s).await?;
        // An enabled one wins over disabled leftovers.
        let live = list
            .iter()
            .filter(|w| identical(w, desired, &s))
            .max_by_key(|w| self.rank(w, &desired.owner));
        Ok(live.map(|w| Observed {
            id: w.id.clone(),
            echo: echo(w, &s),
            state: if self.may_be_enabled(w) {
                UpstreamState::Enabled
            } else {
                UpstreamState::Disabled {
                    message: "Atomic lists the webhook with enabled=false (disabled, or paused after failed deliveries), or the operator disabled it; re-enable it in the Atomic Workbench (the API cannot)".into(),
                }
            },
            signing_secret: w.secret.clone(),
            action: SyncAction::Unchanged,
        }))
    }

    /// Every webhook at the URL that may be enabled, whatever its types (a replacement
    /// for changed `spec.events` has new types), newest first.
    async fn signing_secrets(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Vec<String>, ProviderError> {
        let s = scope_of(desired)?;
        let mut live: Vec<Webhook> = self
            .list(creds, &s)
            .await?
            .into_iter()
            .filter(|w| w.spec.url == desired.hook_url && self.may_be_enabled(w))
            .collect();
        live.sort_by(|a, b| b.created.cmp(&a.created));
        Ok(live
            .into_iter()
            .filter_map(|w| w.secret)
            .filter(|k| !k.is_empty())
            .collect())
    }

    async fn delete(
        &self,
        creds: &Credentials,
        applied: &DesiredSubscription,
    ) -> Result<(), ProviderError> {
        let s = scope_of(applied)?;
        let list = self.list(creds, &s).await?;
        self.disable_ours(creds, &s, &list, &applied.owner, Some((applied, &s)), None)
            .await
            .map(drop)
    }
}

/// Verifies and splits an Atomic delivery (POST or PUT, signed in `X-Atomic-Signature`
/// unless the subscription says otherwise).
pub fn parse_inbound(
    keys: &VerificationKeys,
    req: &InboundRequest<'_>,
) -> Result<Vec<InboundEvent>, Rejection> {
    if req.method != http::Method::POST && req.method != http::Method::PUT {
        return Err(Rejection::MethodNotAllowed);
    }
    require_json(req)?;
    // The scheme is a guess; a subscription may name another header and encoding.
    let header = keys.header_name.as_deref().unwrap_or(SIGNATURE_HEADER);
    verify_signature(req, header, &keys.secrets, keys.signature_encoding)?;
    let env =
        JsonObject::parse(req.body)?.ok_or(Rejection::BadRequest("expected a json object"))?;
    for field in ["requestId", "webhookId"] {
        if env.str(field).is_none() {
            return Err(Rejection::BadRequest("missing envelope field"));
        }
    }
    let batched = env
        .bool("isBatched")
        .ok_or(Rejection::BadRequest("missing isBatched"))?;
    let data = env
        .get("data")
        .ok_or(Rejection::BadRequest("missing data"))?;
    let events = if batched {
        json_fields::array_of(data).filter(|a| !a.is_empty())
    } else {
        data.get().starts_with('{').then(|| vec![data])
    }
    .ok_or(Rejection::BadRequest("data does not match isBatched"))?;
    events.into_iter().map(parse_event).collect()
}

fn parse_event(raw: &RawValue) -> Result<InboundEvent, Rejection> {
    let ev = JsonObject::of(raw);
    let field = |key| ev.as_ref().and_then(|ev| ev.str(key));
    let id = field("id").ok_or(Rejection::BadRequest("missing data.id"))?;
    let kind =
        field("analyticsEvent").ok_or(Rejection::BadRequest("missing data.analyticsEvent"))?;
    Ok(InboundEvent {
        test: kind == TEST_EVENT,
        event_type: kind.into_owned(),
        dedupe_key: id.into_owned(),
        // The event as Atomic sent it.
        payload: json_fields::bytes(raw),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound_util::testing::{POST, json_headers, request};
    use crate::sign_hex;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"0217309e-3c74-41b5-82e9-bd60e5db9bdb";

    fn keys() -> VerificationKeys {
        VerificationKeys {
            secrets: vec![b"new-secret".to_vec(), SECRET.to_vec()],
            header_name: None,
            ..Default::default()
        }
    }

    fn body(batched: bool) -> Vec<u8> {
        let ev = |id: &str| serde_json::json!({"id": id, "analyticsEvent": "card-completed", "endUserId": "u", "timestamp": "2021-03-26T00:46:50.711Z"});
        let data = if batched {
            serde_json::json!([ev("e1"), ev("e2")])
        } else {
            ev("e1")
        };
        serde_json::to_vec(&serde_json::json!({"requestId": "r", "environmentId": "env", "webhookId": "w", "isBatched": batched, "data": data})).unwrap()
    }

    fn parse(
        method: &http::Method,
        body: &[u8],
        sig: &str,
    ) -> Result<Vec<InboundEvent>, Rejection> {
        let h = json_headers(&[(SIGNATURE_HEADER, sig)]);
        parse_inbound(&keys(), &request(method, &h, None, body))
    }

    #[test]
    fn verifies_with_old_secret_and_splits_batches() {
        let b = body(true);
        let evs = parse(&POST, &b, &sign_hex(SECRET, &b)).unwrap();
        assert_eq!(
            evs.iter()
                .map(|e| e.dedupe_key.as_str())
                .collect::<Vec<_>>(),
            ["e1", "e2"]
        );
        assert_eq!(evs[0].event_type, "card-completed");
        let b = body(false);
        let evs = parse(&http::Method::PUT, &b, &sign_hex(SECRET, &b)).unwrap();
        assert_eq!(evs.len(), 1);
        let p: serde_json::Value = serde_json::from_slice(&evs[0].payload).unwrap();
        assert_eq!(p["id"], "e1");
    }

    #[test]
    fn rejects_wrong_signature_and_method() {
        let b = body(false);
        assert_eq!(
            parse(&POST, &b, &sign_hex(b"other", &b)),
            Err(Rejection::Unauthorized("bad signature"))
        );
        assert_eq!(
            parse(&POST, &b, "zz"),
            Err(Rejection::Unauthorized("bad signature"))
        );
        assert_eq!(
            parse(&http::Method::GET, &b, ""),
            Err(Rejection::MethodNotAllowed)
        );
        let h = json_headers(&[]);
        let r = request(&POST, &h, None, &b);
        assert_eq!(
            parse_inbound(&keys(), &r),
            Err(Rejection::Unauthorized("missing signature"))
        );
        assert_eq!(
            parse_inbound(&VerificationKeys::default(), &r),
            Err(Rejection::Unauthorized("no signing secret configured"))
        );
    }

    #[test]
    fn signed_but_malformed_is_bad_request() {
        for b in [
            &b"{"[..],
            br#"{"requestId":"r","webhookId":"w","isBatched":true,"data":{}}"#,
            br#"{"requestId":"r","webhookId":"w","isBatched":false,"data":{"id":"x"}}"#,
        ] {
            assert!(matches!(
                parse(&POST, b, &sign_hex(SECRET, b)),
                Err(Rejection::BadRequest(_))
            ));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..512), sig in "[0-9a-f]{0,70}") {
            let _ = parse(&POST, &b, &sig);
            let _ = parse(&POST, &b, &sign_hex(SECRET, &b));
        }

        #[test]
        fn signed_valid_body_parses(batched in any::<bool>()) {
            let b = body(batched);
            prop_assert!(parse(&POST, &b, &sign_hex(SECRET, &b)).is_ok());
        }

        #[test]
        fn flipped_byte_is_rejected(batched in any::<bool>(), idx in any::<prop::sample::Index>(), bit in 0u8..8) {
            let b = body(batched);
            let sig = sign_hex(SECRET, &b);
            let mut t = b.clone();
            let i = idx.index(t.len());
            t[i] ^= 1 << bit;
            prop_assert_eq!(parse(&POST, &t, &sig), Err(Rejection::Unauthorized("bad signature")));
        }
    }
}
