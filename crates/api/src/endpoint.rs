//! `WebhookEndpoint`: where the events for one ingress URL are delivered in the cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::SecretKeyRef;

/// Receives provider events at an unguessable ingress URL, stores each one durably and
/// delivers it, signed with Standard Webhooks, to an in-cluster Service or a URL.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hooks.webhook-operator.dev",
    version = "v1alpha1",
    kind = "WebhookEndpoint",
    namespaced,
    doc = "Receives provider events at an unguessable ingress URL, stores each one durably and delivers it, signed with Standard Webhooks, to an in-cluster Service or a URL.",
    status = "WebhookEndpointStatus",
    shortname = "whe",
    category = "webhooks",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Healthy","type":"string","jsonPath":".status.conditions[?(@.type==\"Healthy\")].status"}"#,
    printcolumn = r#"{"name":"Delivered","type":"integer","jsonPath":".status.delivery.delivered"}"#,
    printcolumn = r#"{"name":"Failing","type":"integer","jsonPath":".status.delivery.consecutiveFailures"}"#,
    printcolumn = r#"{"name":"Ingress","type":"string","jsonPath":".status.ingressURL","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointSpec {
    /// Where events are delivered: exactly one of `service` or `url`.
    pub destination: Destination,
    /// How events are delivered: timeout, retries, concurrency, rate and dead letters.
    #[serde(default)]
    pub delivery: DeliveryPolicy,
    /// Standard Webhooks signing of deliveries (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`). When `secretRef` is absent the operator generates a secret
    /// into a Secret named `<endpoint>-signing` owned by this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<Signing>,
    /// Extra headers sent with every delivery; each value is read from a Secret key and
    /// never shown in status, Events or logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderFromSecret>,
    /// Deliver only these event types (the provider's event names, for example
    /// `call_completed`); empty delivers every event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub event_types: Vec<EventTypeName>,
    /// Most events that may wait for this endpoint (stored, not yet delivered or
    /// dead-lettered). At the bound the ingress answers 503 with `Retry-After` and the
    /// `Healthy` condition is `False` with reason `Backlogged`. Absent: the operator's
    /// `--max-endpoint-queued-events`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_queued_events: Option<u64>,
    /// Most bytes that may wait for this endpoint: the stored size of its waiting events
    /// (payload plus about 100 bytes of metadata each). At the bound the ingress answers
    /// 503 with `Retry-After` and the `Healthy` condition is `False` with reason
    /// `Backlogged`. Absent: the operator's `--max-endpoint-queued-bytes`. Counted by the
    /// embedded queue only (with JetStream, the stream's `maxBytes` bounds the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_queued_bytes: Option<u64>,
    /// A bound on how fast the ingress takes requests for this endpoint (all its
    /// subscriptions together); requests above it are answered 429 with `Retry-After`
    /// before their body is read. Absent: no rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_rate_limit: Option<IngressRateLimit>,
    /// The shape of a delivery: `default` (the provider payload as the body, Standard
    /// Webhooks headers) or `cloudevents` (CloudEvents 1.0 HTTP binary mode: `ce-id`,
    /// `ce-source`, `ce-type`, `ce-specversion`, `ce-time` headers, the provider payload as
    /// the body). Signing applies to both.
    #[serde(default, skip_serializing_if = "DeliveryFormat::is_default")]
    pub format: DeliveryFormat,
    /// A CEL expression deciding per event whether it is delivered, over `payload` (the
    /// provider's JSON payload), `eventType`, `subscription` and `headers` (the provider's
    /// request headers by lower-case name, credentials left out); for example
    /// `payload.call.analysis.lead_warmth == 'hot'`. False: the event is acknowledged and
    /// counted as filtered. An expression that does not compile makes `Ready=False` with
    /// reason `FilterInvalid`; one that fails on an event (or gives no bool) keeps that
    /// event as a dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub filter: Option<String>,
    /// The endpoint's own dedupe key, in place of the provider's event id: events whose
    /// key is equal within `window` are delivered once. Absent: the provider's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<Dedupe>,
}

/// `spec.dedupe`: a dedupe key computed from each event.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dedupe {
    /// A CEL expression over the same variables as `filter` (`payload`, `eventType`,
    /// `subscription`, `headers`) giving a string or number, for example
    /// `payload.call.id + ':' + eventType`. An expression that does not compile makes
    /// `Ready=False` with reason `DedupeInvalid`; one that fails on an event (a missing
    /// field, an empty string, a list) leaves that event the provider's id, counted in
    /// `webhook_operator_dedupe_key_errors_total`.
    #[schemars(length(min = 1, max = 4096))]
    pub key: String,
    /// How long a key is remembered (Go duration, 1s to 24h; default and upper bound: the
    /// queue's dedupe window, 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('1s') && duration(self) <= duration('24h')", "message": "must be between 1s and 24h"}]
    ))]
    pub window: Option<String>,
}

/// A token bucket over the ingress requests of one endpoint.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRateLimit {
    /// Sustained requests per second (1 to 100000).
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_second: u32,
    /// Requests taken at once above the sustained rate (1 to 1000000); absent: one
    /// second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
}

/// How a delivery is shaped on the wire.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryFormat {
    /// The provider payload plus Standard Webhooks headers.
    #[default]
    Default,
    /// CloudEvents 1.0, HTTP binary content mode; `ce-id` is the stable `webhook-id`.
    Cloudevents,
}

impl DeliveryFormat {
    fn is_default(&self) -> bool {
        *self == Self::Default
    }
}

/// An event type name used in filters.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct EventTypeName(#[schemars(length(min = 1, max = 64))] pub String);

/// The delivery target. Exactly one of `service` or `url`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.service) != has(self.url)",
    "message": "exactly one of destination.service or destination.url must be set"
}, {
    "rule": "!has(self.tls) || (has(self.url) && self.url.startsWith('https://'))",
    "message": "destination.tls is only for an https destination.url"
}]))]
pub struct Destination {
    /// A Service in the cluster, addressed as `http://<name>.<namespace>.svc:<port><path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceDestination>,
    /// A URL. It must be `https`, or `http` to an in-cluster host (`*.svc`,
    /// `*.cluster.local`, a bare Service name) or loopback. Loopback, unspecified,
    /// link-local and cloud metadata addresses are refused (`DestinationForbidden`) unless
    /// the operator allows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self) && (self.startsWith('https://') || self.matches('^http://([a-z0-9]([-a-z0-9]*[a-z0-9])?|[-a-z0-9.]+[.]svc|[-a-z0-9.]+[.]cluster[.]local|localhost|127[.]0[.]0[.]1|\\\\[::1\\\\])(:[0-9]+)?([/?#].*)?$'))",
        "message": "must be an https URL, or http only to an in-cluster host (*.svc, *.cluster.local, a bare Service name) or loopback"
    }]))]
    pub url: Option<String>,
    /// TLS to an `https` URL: the CA that verifies the destination and the client
    /// certificate it asks for (mTLS). Each Secret is read again when it changes, without
    /// a restart. A handshake that fails makes `Healthy=False` with reason
    /// `TLSHandshakeFailed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DestinationTls>,
}

/// TLS settings of an `https` destination.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationTls {
    /// A Secret key holding the PEM CA certificates that verify the destination's
    /// certificate, instead of the platform's trust store (for example `{name: consumer-ca,
    /// key: ca.crt}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`: the PEM certificate chain, `tls.key`: its
    /// PEM private key) presented as the client certificate when the destination asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// A Secret in the resource's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The keys of a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

impl WebhookEndpointSpec {
    /// The Secrets `spec.destination.tls` names.
    pub fn tls_secret_names(&self) -> impl Iterator<Item = &String> {
        let tls = self.destination.tls.as_ref();
        tls.and_then(|t| t.ca_secret_ref.as_ref().map(|r| &r.name))
            .into_iter()
            .chain(tls.and_then(|t| t.client_cert_secret_ref.as_ref().map(|r| &r.name)))
    }
}

/// A Service destination.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ServiceDestination {
    /// Service name (a DNS label: lower-case letters, digits and `-`).
    #[schemars(length(min = 1, max = 63), extend("pattern" = super::common::DNS_1035_LABEL))]
    pub name: String,
    /// Service namespace (a DNS label); defaults to the endpoint's namespace. Another
    /// namespace is refused (`Ready=False`, reason `CrossNamespaceRefDenied`) unless the
    /// operator runs with `--allow-cross-namespace-refs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), extend("pattern" = super::common::DNS_1123_LABEL))]
    pub namespace: Option<String>,
    /// Service port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Request path, starting with `/`; defaults to `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), extend("pattern" = "^/"))]
    pub path: Option<String>,
}

/// How events are delivered.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPolicy {
    /// Timeout of one delivery attempt (Go duration, 100ms to 5m).
    #[serde(default = "default_timeout")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('100ms') && duration(self) <= duration('5m')", "message": "must be between 100ms and 5m"}]
    ))]
    pub timeout: String,
    /// Retries of failed attempts.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// At most this many deliveries to this destination at once.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_in_flight: u32,
    /// Adapt the deliveries in flight to the destination's pace, within maxInFlight:
    /// halved on 429/503 or a latency rise, grown back by one per round of quick answers.
    /// false: always maxInFlight.
    #[serde(default = "default_true")]
    pub adaptive_concurrency: bool,
    /// At most this many delivery attempts per second; 0 means unlimited.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub rate_per_second: u32,
    /// Events whose retries are exhausted are kept as dead letters for replay.
    #[serde(default)]
    pub dead_letter: DeadLetterPolicy,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            retry: RetryPolicy::default(),
            max_in_flight: default_max_in_flight(),
            adaptive_concurrency: true,
            rate_per_second: 0,
            dead_letter: DeadLetterPolicy::default(),
        }
    }
}

/// Retry policy of failed delivery attempts.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 to 100).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,
    /// How the delay grows between attempts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Delay before the first retry (Go duration, 10ms to 1h).
    #[serde(default = "default_initial_delay")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('10ms') && duration(self) <= duration('1h')", "message": "must be between 10ms and 1h"}]
    ))]
    pub initial_delay: String,
    /// Upper bound of any delay (Go duration, 10ms to 24h).
    #[serde(default = "default_max_delay")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('10ms') && duration(self) <= duration('24h')", "message": "must be between 10ms and 24h"}]
    ))]
    pub max_delay: String,
    /// An event older than this is dead-lettered instead of retried (Go duration, 1s to 720h).
    #[serde(default = "default_max_age")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('1s') && duration(self) <= duration('720h')", "message": "must be between 1s and 720h"}]
    ))]
    pub max_age: String,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: Backoff::default(),
            initial_delay: default_initial_delay(),
            max_delay: default_max_delay(),
            max_age: default_max_age(),
        }
    }
}

/// Backoff shape between delivery attempts; jitter is always added.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// initialDelay × 2^(attempt−1), capped at maxDelay.
    #[default]
    Exponential,
    /// initialDelay × attempt, capped at maxDelay.
    Linear,
}

/// Dead-letter retention.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct DeadLetterPolicy {
    /// How long dead letters are kept for replay (Go duration, 1m to 2160h).
    #[serde(default = "default_retention")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('1m') && duration(self) <= duration('2160h')", "message": "must be between 1m and 2160h"}]
    ))]
    pub retention: String,
}

impl Default for DeadLetterPolicy {
    fn default() -> Self {
        Self {
            retention: default_retention(),
        }
    }
}

/// Standard Webhooks signing.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Signing {
    /// Secret key holding the signing secret (`whsec_<base64>` or raw bytes). When absent
    /// the operator generates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// After a rotation, deliveries carry a signature with the old secret too for this
    /// long (Go duration, 0s to 720h), so consumers can switch at their pace. The same
    /// window applies when a provider's signing secret changes.
    #[serde(default = "default_rotation_overlap")]
    #[schemars(extend(
        "pattern" = super::common::DURATION_PATTERN,
        "x-kubernetes-validations" = [{"rule": "duration(self) >= duration('0s') && duration(self) <= duration('720h')", "message": "must be between 0s and 720h"}]
    ))]
    pub rotation_overlap: String,
}

impl Default for Signing {
    fn default() -> Self {
        Self {
            secret_ref: None,
            rotation_overlap: default_rotation_overlap(),
        }
    }
}

/// A header added to every delivery, its value read from a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderFromSecret {
    /// Header name (an RFC 7230 token). The Standard Webhooks headers and hop-by-hop
    /// headers are reserved.
    #[schemars(length(min = 1, max = 128), extend(
        "pattern" = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
        "x-kubernetes-validations" = [{"rule": "!(self.lowerAscii() in ['host', 'content-length', 'content-type', 'connection', 'transfer-encoding', 'webhook-id', 'webhook-timestamp', 'webhook-signature'])", "message": "is a reserved header name"}]
    ))]
    pub name: String,
    /// The Secret key that holds the value.
    pub secret_key_ref: SecretKeyRef,
}

/// Observed state of a WebhookEndpoint.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: ingress URL assigned and destination resolvable; when `False` its reason
    /// says why (`SecretMissing`, `SecretNotReferable`, `SecretNotOwned`,
    /// `CrossNamespaceRefDenied`, `DestinationForbidden`, `DestinationUnresolvable`,
    /// `FilterInvalid`, `HeaderInvalid`, `IngressTokenInUse`, `IngressTokenInvalid`,
    /// `SigningSecretInvalid`, `InvalidSpec`). `Healthy`: recent deliveries succeed.
    /// `Reconciling` / `Stalled` in the kstatus sense.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where providers must send events: the public base URL plus `/hooks/<token>`, or the
    /// path alone when no public base URL is configured. Treat it as a secret.
    #[serde(
        default,
        rename = "ingressURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub ingress_url: Option<String>,
    /// The last `hooks.webhook-operator.dev/rotate-signing-secret` value handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_rotation: Option<String>,
    /// SHA-256 of the signing secret in force (never the secret), to detect rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_hash: Option<String>,
    /// The last `hooks.webhook-operator.dev/requested-at` value handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_requested_at: Option<String>,
    /// The last replay request handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_replay_at: Option<String>,
    /// Delivery statistics since the operator started tracking this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryStats>,
}

/// Delivery statistics.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStats {
    /// Events delivered (2xx from the destination).
    #[serde(default)]
    pub delivered: u64,
    /// Failed attempts.
    #[serde(default)]
    pub failed: u64,
    /// Events waiting for a retry now.
    #[serde(default)]
    pub retrying: u64,
    /// Events moved to the dead-letter store since the operator started (including
    /// `malformed` ones and those `spec.filter` failed on).
    #[serde(default)]
    pub dead_lettered: u64,
    /// Elements of a provider's batch that could not be read (for example an Atlas array
    /// element without `callId`). The valid elements of the batch are delivered; these are
    /// kept as dead letters to inspect, and each is announced by a `MalformedEvents` Event.
    #[serde(default)]
    pub malformed: u64,
    /// Events `spec.filter` failed on (a missing field, a result that is not a bool): kept
    /// as dead letters with the filter's error, each announced by a `FilterFailed` Event.
    #[serde(default)]
    pub filter_errors: u64,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: u64,
    /// Share of failed attempts over the recent window, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<f64>,
    /// When a delivery last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Time>,
    /// When an attempt last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Short reason of the last failure (status code or transport error, no secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Median ingest-to-delivered latency over the recent window, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile ingest-to-delivered latency over the recent window, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
}

fn default_timeout() -> String {
    "10s".into()
}
fn default_max_in_flight() -> u32 {
    16
}
fn default_true() -> bool {
    true
}
fn default_max_attempts() -> i32 {
    8
}
fn default_initial_delay() -> String {
    "1s".into()
}
fn default_max_delay() -> String {
    "5m".into()
}
fn default_max_age() -> String {
    "24h".into()
}
fn default_rotation_overlap() -> String {
    "24h".into()
}
fn default_retention() -> String {
    "168h".into()
}

/// Key of the ingress token's random key in `<endpoint>-ingress`.
pub const INGRESS_SECRET_KEY: &str = "token-key";
/// Key of the generated signing secret in `<endpoint>-signing`.
pub const SIGNING_KEY: &str = "secret";

/// The names of the Secrets the operator generates for an endpoint: one definition each,
/// for the reconciler and the follower's route sync alike.
impl WebhookEndpoint {
    /// The Secret holding the ingress token (`<endpoint>-ingress`).
    pub fn ingress_secret_name(&self) -> String {
        format!("{}-ingress", kube::ResourceExt::name_any(self))
    }

    /// The operator-generated signing secret and its rotation state (`<endpoint>-signing`).
    pub fn signing_secret_name(&self) -> String {
        format!("{}-signing", kube::ResourceExt::name_any(self))
    }
}

#[cfg(test)]
mod names {
    use super::*;

    #[test]
    fn generated_secret_names() {
        let ep: WebhookEndpoint = serde_json::from_value(serde_json::json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
            "metadata": {"name": "orders", "namespace": "a"},
            "spec": {"destination": {"service": {"name": "sink", "port": 8080}}}
        }))
        .unwrap();
        assert_eq!(ep.ingress_secret_name(), "orders-ingress");
        assert_eq!(ep.signing_secret_name(), "orders-signing");
    }
}
