//! What every provider client and parser shares: which provider, the subscription
//! wanted upstream (its `Scope` per provider) and what was observed there, credentials,
//! where the APIs are (`ProviderEndpoints`; its defaults are set in `lib.rs`), the error,
//! and the management API's trait. A leaf: it imports no module of this crate, so the
//! clients, the inbound contract and the crate's face all import it, never the other way
//! round.

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
    pub(crate) fn secrets(&self) -> Vec<&str> {
        [&self.api_key, &self.client_secret]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub(crate) fn require_api_key(&self) -> Result<&str, ProviderError> {
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

/// Names what `ensure` did from what it wrote. `replaced`: a new upstream object took
/// the place of an old one (rather than being changed in place).
pub(crate) fn classify(
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

pub(crate) fn scope_mismatch(provider: Provider) -> ProviderError {
    ProviderError::Invalid(format!("scope does not belong to provider {provider}"))
}
