//! `WebhookSubscription`: a subscription at a provider, kept in sync by the operator.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Provider;

/// Asks a provider to send events to an endpoint. The operator creates the subscription
/// at the provider's API, repairs drift and removes it on delete (for Atllas, which has
/// no API, it publishes what to paste into the portal).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hooks.webhook-operator.dev",
    version = "v1alpha1",
    kind = "WebhookSubscription",
    namespaced,
    doc = "Asks a provider to send events to an endpoint; the operator keeps the upstream subscription in sync (for Atllas, which has no API, it publishes what to paste into the portal).",
    status = "WebhookSubscriptionStatus",
    shortname = "whs",
    category = "webhooks",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.provider"}"#,
    printcolumn = r#"{"name":"Events","type":"string","jsonPath":".spec.events"}"#,
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Synced\")].status"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".status.upstream.id"}"#,
    printcolumn = r#"{"name":"Received","type":"integer","jsonPath":".status.events.received","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.provider == 'atllas' || has(self.credentialsRef)", "message": "credentialsRef is required for providers atlas, atomic and smallest", "fieldPath": ".credentialsRef"},
    {"rule": "has(self.endpointRef) != has(self.url)", "message": "exactly one of endpointRef or url must be set", "fieldPath": ".endpointRef"},
    {"rule": "self.provider != 'atllas' || has(self.endpointRef)", "message": "provider atllas delivers only to an endpointRef (the operator must receive its events)", "fieldPath": ".endpointRef"},
    {"rule": "has(self.atlas) == (self.provider == 'atlas')", "message": "atlas (with campaignId) must be set for provider atlas, and only for it", "fieldPath": ".atlas"},
    {"rule": "has(self.atomic) == (self.provider == 'atomic')", "message": "atomic (with organizationId and environmentId) must be set for provider atomic, and only for it", "fieldPath": ".atomic"},
    {"rule": "has(self.smallest) == (self.provider == 'smallest')", "message": "smallest (with agentIds) must be set for provider smallest, and only for it", "fieldPath": ".smallest"},
    {"rule": "!has(self.atllas) || self.provider == 'atllas'", "message": "atllas may be set only for provider atllas", "fieldPath": ".atllas"},
    {"rule": "self.provider != 'atlas' || self.events.all(e, e in ['call_started', 'call_completed', 'message_received', 'message_sent'])", "message": "atlas events must be among call_started, call_completed, message_received, message_sent", "fieldPath": ".events"},
    {"rule": "self.provider != 'atomic' || self.events.all(e, e in ['card-published', 'card-completed', 'card-dismissed', 'card-snoozed', 'card-unsnoozed', 'card-expired', 'card-cancelled', 'card-embargoed', 'card-error', 'card-displayed', 'card-subview-displayed', 'card-subview-exited'])", "message": "atomic events must be among the documented analytics events (card-published, card-completed, card-dismissed, card-snoozed, card-unsnoozed, card-expired, card-cancelled, card-embargoed, card-error, card-displayed, card-subview-displayed, card-subview-exited)", "fieldPath": ".events"},
    {"rule": "self.provider != 'smallest' || self.events.all(e, e in ['pre-conversation', 'post-conversation', 'analytics-completed'])", "message": "smallest events must be among pre-conversation, post-conversation, analytics-completed", "fieldPath": ".events"},
    {"rule": "self.provider != 'atllas' || self.events.all(e, e in ['call.finished', 'call.completed'])", "message": "atllas events must be among call.finished, call.completed", "fieldPath": ".events"}
]))]
pub struct WebhookSubscriptionSpec {
    /// The provider: `atlas`, `atomic`, `smallest` or `atllas` (receive-only).
    pub provider: Provider,
    /// The Secret holding the provider credentials. Not used for `atllas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_ref: Option<CredentialsRef>,
    /// Event names to subscribe to, as the provider spells them (Atlas `call_completed`,
    /// Atomic `card-published`, Smallest `post-conversation`, Atllas `call.finished`).
    #[schemars(length(min = 1, max = 32))]
    pub events: Vec<EventName>,
    /// Atlas scope; required for provider `atlas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atlas: Option<AtlasScope>,
    /// Atomic scope; required for provider `atomic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atomic: Option<AtomicScope>,
    /// Smallest.ai Atoms scope; required for provider `smallest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smallest: Option<SmallestScope>,
    /// Atllas settings; optional for provider `atllas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atllas: Option<AtllasScope>,
    /// The WebhookEndpoint (same namespace) whose ingress URL is registered at the
    /// provider. Exactly one of `endpointRef` or `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_ref: Option<EndpointRef>,
    /// An external https URL registered at the provider instead of an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), extend("x-kubernetes-validations" = [{
        "rule": "isURL(self) && self.startsWith('https://')",
        "message": "must be an https URL"
    }]))]
    pub url: Option<String>,
    /// `Delete` (default) removes the upstream subscription when this object is deleted;
    /// `Orphan` leaves it at the provider.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// `Manage` (default) creates and repairs the upstream subscription; `ObserveOnly`
    /// never writes upstream and only reports what it finds.
    #[serde(default)]
    pub management_policy: ManagementPolicy,
    /// How often the upstream subscription is re-checked and drift repaired (Go duration,
    /// 30s to 24h; default 5m).
    #[serde(default = "default_resync_interval")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('30s') && duration(self) <= duration('24h')", "message": "must be between 30s and 24h"}]
    ))]
    pub resync_interval: String,
}

/// An event name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct EventName(#[schemars(length(min = 1, max = 64))] pub String);

/// Where the provider credentials are: a Secret in the subscription's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the API key (Atlas, Smallest).
    #[serde(default = "default_api_key_key")]
    pub api_key_key: String,
    /// Key of the OAuth2 client id (Atomic).
    #[serde(default = "default_client_id_key")]
    pub client_id_key: String,
    /// Key of the OAuth2 client secret (Atomic).
    #[serde(default = "default_client_secret_key")]
    pub client_secret_key: String,
}

/// Atlas scope.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AtlasScope {
    /// The campaign whose events are sent; `*` means every campaign of the account.
    #[schemars(length(min = 1, max = 128))]
    pub campaign_id: String,
}

/// Atomic scope.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AtomicScope {
    /// The Atomic organization id (the API host is `<organizationId>.customer-api.atomic.io`).
    #[schemars(length(min = 1, max = 128))]
    pub organization_id: String,
    /// The Atomic environment id.
    #[schemars(length(min = 1, max = 128))]
    pub environment_id: String,
    /// Only events of this card template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_template_id: Option<String>,
    /// Only events of this Action Flow configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_flow_config_id: Option<String>,
    /// HTTP method Atomic uses for deliveries.
    #[serde(default)]
    pub method: AtomicMethod,
    /// How Atomic signs deliveries. Atomic does not document it: the defaults
    /// (`X-Atomic-Signature`, lowercase hex HMAC-SHA256 of the raw body keyed by the
    /// webhook secret) are a guess. If deliveries are refused with a signature mismatch,
    /// set what your account actually sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<AtomicSignature>,
}

/// Where an HMAC-SHA256 signature travels and how it is written.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AtomicSignature {
    /// Header carrying the signature.
    #[serde(default = "default_atomic_signature_header")]
    #[schemars(length(min = 1, max = 128), extend("pattern" = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))]
    pub header: String,
    /// `hex` (lowercase or uppercase) or `base64` (standard alphabet).
    #[serde(default)]
    pub encoding: SignatureEncoding,
}

/// The header Atomic is assumed to sign deliveries in.
pub const DEFAULT_ATOMIC_SIGNATURE_HEADER: &str = "X-Atomic-Signature";

fn default_atomic_signature_header() -> String {
    DEFAULT_ATOMIC_SIGNATURE_HEADER.into()
}

/// How a signature's bytes are written in its header.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// The Atllas header name when the spec has no `atllas` block.
pub const DEFAULT_ATLLAS_HEADER: &str = "X-Webhook-Token";

/// Key of the provider's signing secret in [`WebhookSubscription::provider_signing_secret_name`].
pub const SIGNING_SECRET_KEY: &str = "secret";
/// Key of the Atllas header value in [`WebhookSubscription::atllas_header_secret_name`].
pub const HEADER_VALUE_KEY: &str = "value";

/// The names of the Secrets the operator generates for a subscription: one definition
/// each, for the reconciler and the follower's route sync alike.
impl WebhookSubscription {
    /// The provider's signing secret, stored on sync (`<subscription>-provider-signing`).
    pub fn provider_signing_secret_name(&self) -> String {
        format!("{}-provider-signing", kube::ResourceExt::name_any(self))
    }

    /// The generated Atllas header value (`<subscription>-atllas-header`).
    pub fn atllas_header_secret_name(&self) -> String {
        format!("{}-atllas-header", kube::ResourceExt::name_any(self))
    }
}

impl WebhookSubscriptionSpec {
    /// The header Atllas deliveries carry the shared value in.
    pub fn atllas_header_name(&self) -> String {
        self.atllas
            .as_ref()
            .map_or_else(|| DEFAULT_ATLLAS_HEADER.into(), |a| a.header_name.clone())
    }

    /// The signature header (when the spec overrides the provider's) and encoding the
    /// ingress checks deliveries with.
    pub fn signature_scheme(&self) -> (Option<String>, SignatureEncoding) {
        match self.atomic.as_ref().and_then(|a| a.signature.as_ref()) {
            Some(sig) => (Some(sig.header.clone()), sig.encoding),
            None => (None, SignatureEncoding::Hex),
        }
    }
}

/// HTTP method of Atomic deliveries.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AtomicMethod {
    #[default]
    #[serde(rename = "POST")]
    Post,
    #[serde(rename = "PUT")]
    Put,
}

/// Smallest.ai Atoms scope.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SmallestScope {
    /// The agents whose events are sent (24-hex ids).
    #[schemars(length(min = 1, max = 50))]
    pub agent_ids: Vec<AgentId>,
}

/// A Smallest.ai agent id.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(transparent)]
pub struct AgentId(#[schemars(length(min = 1, max = 64))] pub String);

/// Atllas settings (the webhook is created by hand in the Atllas portal).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AtllasScope {
    /// Name of the custom header to configure in the portal; its value is generated into
    /// the Secret named in `status.manualSetup.secretName`.
    #[serde(default = "default_atllas_header")]
    #[schemars(length(min = 1, max = 128), extend("pattern" = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))]
    pub header_name: String,
}

/// Reference to a WebhookEndpoint in the same namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EndpointRef {
    /// WebhookEndpoint name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What happens upstream when the object is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Orphan,
}

/// Whether the operator writes upstream.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ManagementPolicy {
    #[default]
    Manage,
    ObserveOnly,
}

/// Observed state of a WebhookSubscription.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscriptionStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Synced`: the last call to the provider succeeded. `Ready`: the subscription exists
    /// upstream as specified and its endpoint is ready. `Reconciling` / `Stalled` in the
    /// kstatus sense.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What the provider holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamStatus>,
    /// Events received for this subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventCounters>,
    /// For receive-only providers: what to enter in the provider's portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_setup: Option<ManualSetup>,
    /// The last `hooks.webhook-operator.dev/requested-at` value handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_requested_at: Option<String>,
    /// The outcome of the last `hooks.webhook-operator.dev/test-requested-at` request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_test: Option<LastTest>,
}

/// A test event sent through the whole path: provider (or a synthetic event in the
/// provider's format, injected at the ingress) → queue → delivery → destination.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastTest {
    /// The annotation value this result answers (each value is handled once).
    pub requested_at: String,
    /// `Pending`, `Delivered` or `Failed`.
    pub result: TestResult,
    /// Ingest-to-delivered latency of the test event, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// How the test was sent, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a test event is: sent and not yet seen delivered, delivered, or failed.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TestResult {
    #[default]
    Pending,
    Delivered,
    Failed,
}

impl TestResult {
    /// The name written to the status.
    pub fn as_str(&self) -> &'static str {
        match self {
            TestResult::Pending => "Pending",
            TestResult::Delivered => "Delivered",
            TestResult::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for TestResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with the name written to the status (`"Delivered"`).
impl PartialEq<&str> for TestResult {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The upstream subscription.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    /// The provider's id (several ids joined by `,` where one object maps to several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What the provider echoed back (no secrets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub echo: BTreeMap<String, String>,
    /// The provider's own state of the subscription, for example `enabled` or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When the operator last found the provider's subscription different from what
    /// this status recorded (and recorded the new state), or first recorded it. Not a
    /// heartbeat: a resync that finds everything as recorded leaves it, and the status,
    /// unwritten; the `Synced` condition says whether the last pass reached the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// The last desired state applied upstream (JSON, no secrets). A spec change removes
    /// upstream what this registered and the new spec no longer wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<String>,
    /// The Secret (owned by this subscription) holding the signing secret the provider
    /// issued, used by the ingress to verify deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_name: Option<String>,
}

/// Event counters.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventCounters {
    /// Events accepted at the ingress for this subscription.
    #[serde(default)]
    pub received: u64,
    /// When the last one arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_received_time: Option<Time>,
    /// Deliveries refused because their signature (or header secret) did not verify,
    /// counted since the ingress replica started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub signature_mismatches: u64,
    /// When the last one was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_signature_mismatch_time: Option<Time>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What to configure by hand at a receive-only provider.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualSetup {
    /// The URL to paste in the provider's portal.
    #[serde(default, rename = "hookURL", skip_serializing_if = "Option::is_none")]
    pub hook_url: Option<String>,
    /// The header name to add in the portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_name: Option<String>,
    /// The Secret (key `value`) holding the header value to add in the portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

fn default_resync_interval() -> String {
    "5m".into()
}
fn default_api_key_key() -> String {
    "apiKey".into()
}
fn default_client_id_key() -> String {
    "clientId".into()
}
fn default_client_secret_key() -> String {
    "clientSecret".into()
}
fn default_atllas_header() -> String {
    DEFAULT_ATLLAS_HEADER.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(spec: serde_json::Value) -> WebhookSubscription {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
            "metadata": {"name": "calls", "namespace": "b"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn generated_names_and_the_atllas_header_have_one_definition() {
        let plain = sub(serde_json::json!({"provider": "atllas", "events": ["call.finished"]}));
        assert_eq!(
            plain.provider_signing_secret_name(),
            "calls-provider-signing"
        );
        assert_eq!(plain.atllas_header_secret_name(), "calls-atllas-header");
        assert_eq!(plain.spec.atllas_header_name(), "X-Webhook-Token");
        // An `atllas` block without a header name gets the same default.
        let block = sub(
            serde_json::json!({"provider": "atllas", "events": ["call.finished"], "atllas": {}}),
        );
        assert_eq!(block.spec.atllas_header_name(), DEFAULT_ATLLAS_HEADER);
        let custom = sub(
            serde_json::json!({"provider": "atllas", "events": ["call.finished"], "atllas": {"headerName": "X-Secret"}}),
        );
        assert_eq!(custom.spec.atllas_header_name(), "X-Secret");
    }

    #[test]
    fn test_results_keep_their_status_strings() {
        for (result, text) in [
            (TestResult::Pending, "Pending"),
            (TestResult::Delivered, "Delivered"),
            (TestResult::Failed, "Failed"),
        ] {
            assert_eq!(serde_json::to_value(result).unwrap(), text);
            assert_eq!(
                serde_json::from_value::<TestResult>(text.into()).unwrap(),
                result
            );
            assert_eq!(result, text);
        }
        assert_ne!(TestResult::Failed, "Delivered");
    }
}
