//! Provider management clients and inbound parsers, one module per provider.
//!
//! Owns: the wire types of each provider's management API and deliveries, the clients
//! that make an upstream subscription match a [`DesiredSubscription`], and the
//! verification/normalisation of what a provider POSTs (implementing
//! [`crate::inbound::InboundParser`]). Knows nothing of Kubernetes: the controller
//! translates custom resources into [`DesiredSubscription`] and [`Credentials`].

pub mod atlas;
pub mod atllas;
pub mod atomic;
mod http;
pub mod inbound;
mod inbound_util;
mod json_fields;
mod list_rounds;
pub mod smallest;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A provider these clients and parsers speak to. The API has an enum of its own (with a
/// schema); the controller translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Atlas,
    Atomic,
    Smallest,
    Atllas,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Atlas,
        Provider::Atomic,
        Provider::Smallest,
        Provider::Atllas,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Atlas => "atlas",
            Provider::Atomic => "atomic",
            Provider::Smallest => "smallest",
            Provider::Atllas => "atllas",
        }
    }

    /// The event names the provider documents.
    pub fn event_names(self) -> &'static [&'static str] {
        match self {
            Provider::Atlas => &[
                "call_started",
                "call_completed",
                "message_received",
                "message_sent",
            ],
            Provider::Atomic => &[
                "card-published",
                "card-completed",
                "card-dismissed",
                "card-snoozed",
                "card-unsnoozed",
                "card-expired",
                "card-cancelled",
                "card-embargoed",
                "card-error",
                "card-displayed",
                "card-subview-displayed",
                "card-subview-exited",
            ],
            Provider::Smallest => &[
                "pre-conversation",
                "post-conversation",
                "analytics-completed",
            ],
            Provider::Atllas => &["call.finished", "call.completed"],
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
use crate::inbound::{InboundParser, InboundRequest, Parsed, Rejection, VerificationKeys};
pub use http::install_crypto_provider;
pub use inbound_util::{encode_signature, sign_hex};

/// Credentials read from the subscription's Secret. `Debug` never shows values.
#[derive(Clone, Default)]
pub struct Credentials {
    /// Atlas `api-key`, Smallest bearer key.
    pub api_key: Option<String>,
    /// Atomic OAuth2 client id.
    pub client_id: Option<String>,
    /// Atomic OAuth2 client secret.
    pub client_secret: Option<String>,
}

impl Credentials {
    pub fn api_key(key: impl Into<String>) -> Self {
        Credentials {
            api_key: Some(key.into()),
            ..Default::default()
        }
    }

    pub fn client(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Credentials {
            client_id: Some(id.into()),
            client_secret: Some(secret.into()),
            ..Default::default()
        }
    }

    /// Every secret value held, so error text can be scrubbed of them.
    fn secrets(&self) -> Vec<&str> {
        [&self.api_key, &self.client_secret]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn require_api_key(&self) -> Result<&str, ProviderError> {
        self.api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ProviderError::Invalid("credentials have no api key".into()))
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<String>| if v.is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("Credentials")
            .field("api_key", &shown(&self.api_key))
            // A client id is an identifier, not a secret; it helps diagnose a wrong Secret.
            .field("client_id", &self.client_id)
            .field("client_secret", &shown(&self.client_secret))
            .finish()
    }
}

/// HTTP method of Atomic deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AtomicMethod {
    #[default]
    #[serde(rename = "POST")]
    Post,
    #[serde(rename = "PUT")]
    Put,
}

pub(crate) fn method_str(m: AtomicMethod) -> &'static str {
    match m {
        AtomicMethod::Post => "POST",
        AtomicMethod::Put => "PUT",
    }
}

/// Where, upstream, the subscription applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "camelCase")]
pub enum Scope {
    #[serde(rename_all = "camelCase")]
    Atlas { campaign_id: String },
    #[serde(rename_all = "camelCase")]
    Atomic {
        organization_id: String,
        environment_id: String,
        card_template_id: Option<String>,
        action_flow_config_id: Option<String>,
        method: AtomicMethod,
    },
    #[serde(rename_all = "camelCase")]
    Smallest { agent_ids: Vec<String> },
    #[serde(rename_all = "camelCase")]
    Atllas { header_name: String },
}

/// What the controller wants to exist upstream for one WebhookSubscription.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredSubscription {
    pub provider: Provider,
    /// The ingress URL the provider must call.
    pub hook_url: String,
    pub events: Vec<String>,
    pub scope: Scope,
    /// `<namespace>/<name>`: stable, written into upstream descriptions where possible.
    pub owner: String,
}

impl DesiredSubscription {
    /// Events sorted and without duplicates: upstream sets are compared this way.
    pub fn event_set(&self) -> Vec<String> {
        let mut v = self.events.clone();
        v.sort();
        v.dedup();
        v
    }
}

/// The upstream subscription's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum UpstreamState {
    Enabled,
    /// The provider disabled or paused it; the message has the provider's words and
    /// what the user can do. `ensure` repairs nothing here: re-enabling is the user's call.
    Disabled {
        message: String,
    },
    /// Exists, but part of what is wanted is missing upstream (triggers, agent events);
    /// `ensure` repairs it.
    Incomplete {
        message: String,
    },
    /// Configured by hand (Atllas): nothing to observe.
    Manual,
}

/// What `ensure` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncAction {
    /// Nothing of ours existed; created it.
    Created,
    /// An identical subscription existed that `previous` did not account for; took it over.
    Adopted,
    /// Changed in place.
    Updated,
    /// Created a new one and removed/disabled the old one (no update endpoint, or scope moved).
    Replaced,
    /// Upstream already matched what was last applied.
    Unchanged,
    /// Ours had vanished or been disabled behind our back; created it again.
    Recreated,
}

/// The upstream subscription as last seen.
#[derive(Clone, PartialEq)]
pub struct Observed {
    /// Provider id(s); Atlas joins its per-trigger ids with `,`.
    pub id: String,
    /// What the provider echoed back (never secrets), for `status.upstream`.
    pub echo: BTreeMap<String, String>,
    pub state: UpstreamState,
    /// The secret the provider signs deliveries with (Atomic, Smallest).
    pub signing_secret: Option<String>,
    pub action: SyncAction,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("id", &self.id)
            .field("echo", &self.echo)
            .field("state", &self.state)
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("action", &self.action)
            .finish()
    }
}

/// Why a call to a provider failed. Messages never hold credentials or signing secrets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("not found upstream: {0}")]
    NotFound(String),
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    #[error("invalid: {0}")]
    Invalid(String),
    /// The provider's state cannot be read (e.g. the assumed list call is refused), so
    /// drift is unknown: nothing is re-created on a guess.
    #[error("cannot observe upstream: {0}")]
    CannotObserve(String),
}

impl ProviderError {
    /// Stable reason for conditions, Events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::Unauthorized(_) => "Unauthorized",
            ProviderError::NotFound(_) => "NotFoundUpstream",
            ProviderError::RateLimited { .. } => "RateLimited",
            ProviderError::Unavailable(_) => "UpstreamUnavailable",
            ProviderError::Invalid(_) => "InvalidSpec",
            ProviderError::CannotObserve(_) => "CannotObserve",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// Retrying without a change (to the spec or the Secret) will not help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ProviderError::Unauthorized(_)
                | ProviderError::Invalid(_)
                | ProviderError::NotFound(_)
                | ProviderError::CannotObserve(_)
        )
    }
}

/// One provider's management API.
#[async_trait]
pub trait ProviderApi: Send + Sync {
    /// Make upstream match `desired`. `previous` is the last desired state applied
    /// successfully (None on first sync); what it registered that `desired` no longer
    /// wants is removed. An identical existing subscription is adopted, never duplicated.
    /// Idempotent: with `previous == Some(desired)` and nothing changed upstream, the
    /// result is `Unchanged` and no write is made.
    async fn ensure(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
        previous: Option<&DesiredSubscription>,
    ) -> Result<Observed, ProviderError>;

    /// Read-only: what exists upstream for `desired` (None if nothing).
    async fn observe(
        &self,
        creds: &Credentials,
        desired: &DesiredSubscription,
    ) -> Result<Option<Observed>, ProviderError>;

    /// Remove what `applied` registered; NotFound upstream counts as success.
    async fn delete(
        &self,
        creds: &Credentials,
        applied: &DesiredSubscription,
    ) -> Result<(), ProviderError>;

    /// Read-only: the secrets the provider signs deliveries to `desired.hook_url` with
    /// now, newest first; empty when it holds nothing for that URL, or issues no secret
    /// (Atlas does not sign; Atllas's header value is the operator's). Called by the
    /// ingress's fetch on a failed signature, on any replica: it never writes.
    async fn signing_secrets(
        &self,
        _creds: &Credentials,
        _desired: &DesiredSubscription,
    ) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }

    /// Asks the provider to send its own test event to subscription `id`. `Ok(false)`:
    /// the provider has no such endpoint (the operator then sends a synthetic one).
    async fn send_test(
        &self,
        _creds: &Credentials,
        _applied: &DesiredSubscription,
        _id: &str,
    ) -> Result<bool, ProviderError> {
        Ok(false)
    }
}

/// Marks the events the operator makes up for a test request (ids and payloads).
pub const SYNTHETIC_TEST_PREFIX: &str = "webhook-operator-test-";

/// A test delivery in `desired.provider`'s own format, as its parser expects it, signed or
/// headed with `keys` the way that provider does; the parser marks it as a test.
pub fn synthetic_test_event(
    desired: &DesiredSubscription,
    keys: &VerificationKeys,
) -> (::http::HeaderMap, Vec<u8>) {
    let id = format!("{SYNTHETIC_TEST_PREFIX}{:016x}", rand::random::<u64>());
    let event = desired.events.first().cloned().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let mut headers = ::http::HeaderMap::new();
    headers.insert(
        ::http::header::CONTENT_TYPE,
        ::http::HeaderValue::from_static("application/json"),
    );
    let secret = keys.secrets.first().cloned().unwrap_or_default();
    let body = match &desired.scope {
        Scope::Atlas { campaign_id } => serde_json::json!([{
            "callId": id, "campaignId": campaign_id, "triggerName": event,
            "customerNumber": "+10000000000", "startedAt": now.to_string(), "test": true,
        }]),
        Scope::Atomic { environment_id, .. } => serde_json::json!({
            "requestId": id, "environmentId": environment_id, "webhookId": "test", "isBatched": false,
            "data": {"id": id, "analyticsEvent": atomic::TEST_EVENT, "endUserId": "test", "timestamp": now.to_string()},
        }),
        Scope::Smallest { agent_ids } => {
            let agent = agent_ids.first().cloned().unwrap_or_default();
            serde_json::json!({
                "url": desired.hook_url, "description": "webhook-operator test event",
                "event": format!("{agent}.{event}"), "id": id, "test": true,
                "metadata": {"agentId": agent, "eventType": event, "conversationType": "test", "callId": id},
            })
        }
        Scope::Atllas { .. } => serde_json::json!({
            "type": "call.finished", "timestamp": now.as_millisecond(),
            "webhook": {"id": format!("webhook_test_{id}"), "type": "outbound"},
            "call": {"id": id, "status": "finished"},
        }),
    };
    let body = serde_json::to_vec(&body).expect("a JSON value serialises");
    let sign = |name: &str, encoding, headers: &mut ::http::HeaderMap| {
        if let (Ok(n), Ok(v)) = (
            ::http::HeaderName::try_from(name),
            ::http::HeaderValue::from_str(&encode_signature(&secret, &body, encoding)),
        ) {
            headers.insert(n, v);
        }
    };
    match &desired.scope {
        Scope::Atomic { .. } => sign(
            keys.header_name
                .as_deref()
                .unwrap_or(atomic::SIGNATURE_HEADER),
            keys.signature_encoding,
            &mut headers,
        ),
        Scope::Smallest { .. } => sign(
            smallest::SIGNATURE_HEADER,
            crate::inbound::SignatureEncoding::Hex,
            &mut headers,
        ),
        Scope::Atllas { header_name } => {
            if let (Ok(n), Ok(v)) = (
                ::http::HeaderName::try_from(header_name.as_str()),
                ::http::HeaderValue::from_bytes(&secret),
            ) {
                headers.insert(n, v);
            }
        }
        Scope::Atlas { .. } => {}
    }
    (headers, body)
}

/// Base URLs and timeouts of the providers' management APIs.
#[derive(Clone, Debug)]
pub struct ProviderEndpoints {
    pub atlas_base: String,
    /// Path of the Atlas list call (an assumption, PROVIDERS.md).
    pub atlas_list_path: String,
    /// Template: `{orgId}` is replaced by the scope's organization id.
    pub atomic_base: String,
    /// Template: `{orgId}` is replaced by the scope's organization id.
    pub atomic_token_url: String,
    pub smallest_base: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for ProviderEndpoints {
    fn default() -> Self {
        ProviderEndpoints {
            atlas_base: "https://api.youratlas.com/v1/api".into(),
            atlas_list_path: atlas::DEFAULT_LIST_PATH.into(),
            atomic_base: "https://{orgId}.customer-api.atomic.io".into(),
            // Assumption (PROVIDERS.md): the token endpoint lives on the org's API host.
            atomic_token_url: "https://{orgId}.customer-api.atomic.io/auth/token".into(),
            smallest_base: "https://api.smallest.ai/atoms/v1".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
        }
    }
}

/// One client per provider, each with its own connection pool.
pub struct ProviderClients {
    atlas: atlas::AtlasClient,
    atomic: atomic::AtomicClient,
    smallest: smallest::SmallestClient,
    atllas: atllas::AtllasClient,
}

impl ProviderClients {
    pub fn new(endpoints: ProviderEndpoints) -> Self {
        ProviderClients {
            atlas: atlas::AtlasClient::new(&endpoints),
            atomic: atomic::AtomicClient::new(&endpoints),
            smallest: smallest::SmallestClient::new(&endpoints),
            atllas: atllas::AtllasClient,
        }
    }

    pub fn get(&self, p: Provider) -> &dyn ProviderApi {
        match p {
            Provider::Atlas => &self.atlas,
            Provider::Atomic => &self.atomic,
            Provider::Smallest => &self.smallest,
            Provider::Atllas => &self.atllas,
        }
    }

    /// Endpoints pointing every provider at a simulator (`webhook-operator sandbox`)
    /// listening at `base`, e.g. `http://127.0.0.1:8090`.
    pub fn sandbox(base: &str) -> ProviderEndpoints {
        let base = base.trim_end_matches('/');
        ProviderEndpoints {
            atlas_base: format!("{base}/atlas/v1/api"),
            atlas_list_path: atlas::DEFAULT_LIST_PATH.into(),
            atomic_base: format!("{base}/atomic/{{orgId}}"),
            atomic_token_url: format!("{base}/atomic/{{orgId}}/auth/token"),
            smallest_base: format!("{base}/smallest/atoms/v1"),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Dispatches each provider's deliveries to its parser.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProviderParser;

impl InboundParser for ProviderParser {
    fn parse(
        &self,
        provider: Provider,
        keys: &VerificationKeys,
        request: &InboundRequest<'_>,
    ) -> Result<Parsed, Rejection> {
        match provider {
            Provider::Atlas => atlas::parse_inbound(request),
            Provider::Atomic => atomic::parse_inbound(keys, request).map(Parsed::from),
            Provider::Smallest => smallest::parse_inbound(keys, request).map(Parsed::from),
            Provider::Atllas => atllas::parse_inbound(keys, request).map(Parsed::from),
        }
    }
}

/// Names what `ensure` did from what it wrote. `replaced`: a new upstream object took
/// the place of an old one (rather than being changed in place).
fn classify(
    desired: &DesiredSubscription,
    previous: Option<&DesiredSubscription>,
    wrote: bool,
    replaced: bool,
) -> SyncAction {
    match (wrote, previous) {
        (false, Some(p)) if p == desired => SyncAction::Unchanged,
        // Upstream already matched, but not because of our last apply.
        (false, _) => SyncAction::Adopted,
        (true, None) => SyncAction::Created,
        // Same spec as last time, yet we had to write: something changed behind our back.
        (true, Some(p)) if p == desired => SyncAction::Recreated,
        (true, Some(p))
            if replaced || p.hook_url != desired.hook_url || p.scope != desired.scope =>
        {
            SyncAction::Replaced
        }
        (true, Some(_)) => SyncAction::Updated,
    }
}

fn scope_mismatch(provider: Provider) -> ProviderError {
    ProviderError::Invalid(format!("scope does not belong to provider {provider}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_redacts() {
        let c = Credentials {
            api_key: Some("k-123-secret".into()),
            client_id: Some("cid".into()),
            client_secret: Some("s-456-secret".into()),
        };
        let d = format!("{c:?}");
        assert!(
            !d.contains("k-123-secret") && !d.contains("s-456-secret"),
            "{d}"
        );
        assert!(d.contains("cid"));
    }

    #[test]
    fn reasons_and_permanence() {
        let rl = ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(rl.reason(), "RateLimited");
        assert_eq!(rl.retry_after(), Some(Duration::from_secs(7)));
        assert!(!rl.is_permanent());
        assert!(ProviderError::Unauthorized("x".into()).is_permanent());
        assert!(!ProviderError::Unavailable("x".into()).is_permanent());
        assert_eq!(ProviderError::Invalid("x".into()).reason(), "InvalidSpec");
        assert_eq!(
            ProviderError::NotFound("x".into()).reason(),
            "NotFoundUpstream"
        );
    }

    #[test]
    fn scope_round_trips() {
        let s = Scope::Atomic {
            organization_id: "o".into(),
            environment_id: "e".into(),
            card_template_id: None,
            action_flow_config_id: Some("f".into()),
            method: AtomicMethod::Put,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Scope>(&j).unwrap(), s);
    }
}
