//! What the controller tells the data plane: configuration of the data plane itself, of
//! each endpoint and of each subscription route. Secrets inside are redacted in `Debug`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::delivery::filter::Filter;
use crate::delivery::{AddressPolicy, DeliveryFormat, Destination, Policy, SigningSecret};
use crate::health::HealthConfig;
use crate::queue::EndpointKey;
use webhook_providers::Provider;
use webhook_providers::inbound::VerificationKeys;

/// Data plane settings. `Default` gives production values; tests shorten the timings.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// The redb queue file (on the pod's volume).
    pub queue_path: PathBuf,
    /// Larger ingress bodies get 413.
    pub max_body_bytes: usize,
    /// Same endpoint + dedupe key within this window is a duplicate.
    pub dedupe_window: Duration,
    /// Which address classes destinations may reach (default: none of the refused ones).
    pub address_policy: AddressPolicy,
    /// Let the delivery client use `HTTP(S)_PROXY` from the environment (off).
    pub proxy_from_env: bool,
    /// `host:port` → address, for `*.svc` names in tests and the local demo.
    pub resolve_overrides: Vec<(String, SocketAddr)>,
    /// Consecutive failures that open a destination's circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker sends nothing before one probe.
    pub breaker_cooldown: Duration,
    /// Health window and thresholds.
    pub health: HealthConfig,
    /// How often dead letters past retention are pruned.
    pub maintenance_interval: Duration,
    /// How long shutdown waits for attempts under way.
    pub shutdown_grace: Duration,
    /// Events that may wait across all endpoints; at the bound the ingress answers 503.
    /// Zero: unbounded.
    pub max_queued_events: u64,
    /// Events that may wait for one endpoint unless its spec says otherwise. Zero: unbounded.
    pub max_endpoint_queued_events: u64,
    /// Stored bytes that may wait across all endpoints (embedded queue). Zero: unbounded.
    pub max_queued_bytes: u64,
    /// Stored bytes that may wait for one endpoint unless its spec says otherwise. Zero:
    /// unbounded.
    pub max_endpoint_queued_bytes: u64,
    /// Free space the embedded queue's filesystem keeps; below it the ingress answers 503.
    /// Zero: not checked.
    pub min_free_disk_bytes: u64,
    /// Ingress requests handled at once; more are answered 503.
    pub max_concurrent_requests: usize,
    /// A request body not fully received within this (after its headers) is answered 408.
    pub body_read_timeout: Duration,
    /// The `Retry-After` of the ingress's 503 answers.
    pub retry_after: Duration,
    /// Most dedupe keys the embedded queue keeps; past it the oldest are forgotten early.
    pub max_dedupe_keys: u64,
    /// Where spans are exported (OTLP/HTTP); `None`: no spans are recorded.
    pub otlp_endpoint: Option<url::Url>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            queue_path: PathBuf::from("/var/lib/webhook-operator/queue.redb"),
            max_body_bytes: 1024 * 1024,
            dedupe_window: Duration::from_secs(24 * 3600),
            address_policy: AddressPolicy::default(),
            proxy_from_env: false,
            resolve_overrides: Vec::new(),
            breaker_failure_threshold: 10,
            breaker_cooldown: Duration::from_secs(30),
            health: HealthConfig::default(),
            maintenance_interval: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            max_queued_events: 1_000_000,
            max_endpoint_queued_events: 100_000,
            max_queued_bytes: 512 * 1024 * 1024,
            max_endpoint_queued_bytes: 128 * 1024 * 1024,
            min_free_disk_bytes: 64 * 1024 * 1024,
            max_concurrent_requests: 1024,
            body_read_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(5),
            max_dedupe_keys: 2_000_000,
            otlp_endpoint: None,
        }
    }
}

/// Sustained requests per second and how many may come at once above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// One `WebhookEndpoint` as the data plane needs it.
#[derive(Clone)]
pub struct EndpointConfig {
    pub key: EndpointKey,
    /// The unguessable path segment of `/hooks/{token}/...`.
    pub token: String,
    pub destination: Destination,
    pub policy: Policy,
    /// Newest first; more than one during a rotation overlap.
    pub signing_secrets: Vec<SigningSecret>,
    /// Extra delivery headers (name, value); values are secrets.
    pub headers: Vec<(String, String)>,
    /// Event types to deliver; empty delivers all.
    pub event_types: Vec<String>,
    /// Most events that may wait for this endpoint; `None`: the data plane's default.
    pub max_queued_events: Option<u64>,
    /// Most stored bytes that may wait for this endpoint; `None`: the data plane's default.
    pub max_queued_bytes: Option<u64>,
    /// Requests per second the ingress takes for this endpoint (`spec.ingressRateLimit`).
    pub ingress_rate_limit: Option<RateLimit>,
    /// How deliveries are shaped (`spec.format`).
    pub format: DeliveryFormat,
    /// `spec.filter`, compiled.
    pub filter: Option<Filter>,
    /// `spec.dedupe`, compiled: the key that replaces the provider's id at ingress.
    pub dedupe: Option<crate::ingress::dedupe::DedupeKey>,
    /// `spec.destination.tls`, Secrets resolved; `None`: the platform's trust store and
    /// no client certificate.
    pub tls: Option<DestinationTls>,
}

/// TLS to an `https` destination, as PEM. Secret: redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct DestinationTls {
    /// CA certificates that verify the destination, instead of the platform's trust store.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate chain and its private key, presented when the destination asks.
    pub client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for DestinationTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish()
    }
}

impl std::fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("key", &self.key)
            .field("token", &"<redacted>")
            .field("destination", &self.destination)
            .field("policy", &self.policy)
            .field("signing_secrets", &self.signing_secrets.len())
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("event_types", &self.event_types)
            .field("max_queued_events", &self.max_queued_events)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("ingress_rate_limit", &self.ingress_rate_limit)
            .field("format", &self.format)
            .field("filter", &self.filter)
            .field("dedupe", &self.dedupe)
            .field("tls", &self.tls)
            .finish()
    }
}

/// One `WebhookSubscription`'s route: where its provider's POSTs land and how to verify them.
#[derive(Clone, Debug)]
pub struct SubscriptionRoute {
    pub endpoint: EndpointKey,
    /// The `{subscription}` path segment: the subscription's name.
    pub name: String,
    pub provider: Provider,
    pub keys: VerificationKeys,
}

/// Why an endpoint configuration was refused; the controller reports it as `InvalidSpec`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointConfigError {
    #[error("token must be non-empty URL-safe text")]
    InvalidToken,
    #[error("token already used by another endpoint")]
    TokenInUse,
    #[error("header {0:?} is reserved or not a valid header name")]
    InvalidHeaderName(String),
    #[error("value of header {0:?} is not a valid header value")]
    InvalidHeaderValue(String),
    #[error("at least one signing secret is required")]
    NoSigningSecret,
    /// The message names what is wrong, never the material.
    #[error("destination.tls: {0}")]
    InvalidTls(String),
}
