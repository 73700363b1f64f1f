//! What the reconcilers tell the data plane (ingress routes, verification keys, delivery
//! targets) and what they read back from it (counters, health). A trait, so reconcilers
//! are written against what they need and the data plane stays free of Kubernetes types.

use std::time::SystemTime;

use kube::ResourceExt;

use crate::api::{WebhookEndpoint, WebhookSubscription};
use crate::inbound::VerificationKeys;
/// Namespace and name of a WebhookEndpoint: the data plane's key, the one type for it.
pub use crate::queue::EndpointKey;

/// The key of `ep`.
pub fn key_of(ep: &WebhookEndpoint) -> EndpointKey {
    EndpointKey::new(ep.namespace().unwrap_or_default(), ep.name_any())
}

/// Why the data plane refused an endpoint's configuration: the `Ready` condition's reason
/// (one of [`crate::api::conditions::reasons`]) and its message.
pub type Refusal = (&'static str, String);

pub trait IngressRoutes: TestInjection + Send + Sync {
    /// The ingress accepts requests for `subscription` on `endpoint`'s token path and
    /// verifies them with `keys`.
    fn upsert_subscription(
        &self,
        endpoint: EndpointKey,
        subscription: String,
        provider: crate::api::Provider,
        keys: VerificationKeys,
    );
    fn remove_subscription(&self, endpoint: EndpointKey, subscription: String);
    /// The subscription's `Synced` condition, exported as a metric for alerts.
    fn subscription_synced(&self, _endpoint: EndpointKey, _subscription: String, _synced: bool) {}
    /// Events received for the subscription, and when the last one arrived.
    fn subscription_counters(
        &self,
        endpoint: EndpointKey,
        subscription: String,
    ) -> Option<(u64, Option<SystemTime>)>;
    /// Requests refused for a missing or wrong signature, and when the last one came.
    fn subscription_signature_failures(
        &self,
        _endpoint: EndpointKey,
        _subscription: String,
    ) -> Option<(u64, Option<SystemTime>)> {
        None
    }
    /// Deliver `endpoint`'s events as configured. `Err` is why the configuration is
    /// refused: a condition reason and a user-facing message.
    fn configure_endpoint(&self, endpoint: &EndpointDelivery) -> Result<(), Refusal>;
    fn remove_endpoint(&self, endpoint: EndpointKey);
    /// Delivery statistics and the health verdict, if the endpoint is known.
    fn endpoint_health(&self, endpoint: EndpointKey) -> Option<EndpointHealthView>;
    /// The routes of every object that existed at start-up are configured (see
    /// [`crate::controller::route_sync::prime`]).
    fn mark_loaded(&self);
    /// Deletes the endpoint's waiting events and dead letters: the WebhookEndpoint was
    /// deleted. Returns how many.
    fn purge_endpoint(
        &self,
        endpoint: EndpointKey,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<u64>>;
    /// A reconcile of a `kind` object failed for `reason` (a stable label, see
    /// [`super::Error::reason`]): counted in the operator's metrics.
    fn reconcile_failed(&self, _kind: String, _reason: &'static str) {}
    /// Re-queues the endpoint's dead letters that `filter` selects.
    fn replay(
        &self,
        endpoint: EndpointKey,
        filter: crate::queue::ReplayFilter,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<u64>>;
}

/// The ingress in-process, for test events: `(headers, body)` as the provider would
/// send them to `/hooks/{token}/{subscription}`.
pub trait TestInjection: Send + Sync {
    fn inject(
        &self,
        token: String,
        subscription: String,
        headers: http::HeaderMap,
        body: Vec<u8>,
    ) -> futures::future::BoxFuture<'static, anyhow::Result<u16>>;
    /// When a test event of the subscription was last delivered, and its latency.
    fn last_test(
        &self,
        endpoint: EndpointKey,
        subscription: String,
    ) -> Option<(SystemTime, std::time::Duration)>;
    /// When a test event of the subscription was last dead-lettered, and why.
    fn last_test_failure(
        &self,
        _endpoint: EndpointKey,
        _subscription: String,
    ) -> Option<(SystemTime, String)> {
        None
    }
}

/// Everything delivery needs about one endpoint, secrets resolved.
pub struct EndpointDelivery {
    pub key: EndpointKey,
    /// The unguessable path token.
    pub token: String,
    pub spec: crate::api::WebhookEndpointSpec,
    /// Standard Webhooks secrets, newest first.
    pub signing_secrets: Vec<Vec<u8>>,
    /// Extra headers, values resolved from Secrets.
    pub headers: Vec<(String, String)>,
    /// `spec.filter`, compiled once by the build: `Err` is why it does not compile (the
    /// endpoint is then not configured).
    pub filter: Result<Option<crate::delivery::filter::Filter>, String>,
    /// `spec.dedupe`, compiled once by the build: `Err` names the field at fault.
    pub dedupe: Result<Option<crate::ingress::DedupeKey>, String>,
    /// `spec.destination.tls`, its Secrets read.
    pub tls: Option<crate::dataplane::DestinationTls>,
}

/// Delivery health as the status needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointHealthView {
    pub stats: crate::api::endpoint::DeliveryStats,
    pub healthy: bool,
    pub reason: &'static str,
    pub message: String,
    /// Why events cannot leave at all (condition reason, message), e.g. a forbidden address.
    pub destination_error: Option<(&'static str, String)>,
}

/// The endpoint a subscription receives on, when it uses one.
pub fn endpoint_of(sub: &WebhookSubscription) -> Option<EndpointKey> {
    sub.spec
        .endpoint_ref
        .as_ref()
        .map(|r| EndpointKey::new(sub.namespace().unwrap_or_default(), r.name.clone()))
}

/// Convenience calls in the reconcilers' terms.
pub struct Routes(pub std::sync::Arc<dyn IngressRoutes>);

impl Routes {
    /// The ingress verifies `sub`'s requests with `keys` (see
    /// [`super::build::verification_keys`]); without keys it stays as it is.
    pub fn subscription_keys(&self, sub: &WebhookSubscription, keys: Option<VerificationKeys>) {
        if let (Some(ep), Some(keys)) = (endpoint_of(sub), keys) {
            self.0
                .upsert_subscription(ep, sub.name_any(), sub.spec.provider, keys);
        }
    }

    pub fn remove_subscription(&self, sub: &WebhookSubscription) {
        if let Some(ep) = endpoint_of(sub) {
            self.0.remove_subscription(ep, sub.name_any());
        }
    }

    pub fn synced(&self, sub: &WebhookSubscription, synced: bool) {
        if let Some(ep) = endpoint_of(sub) {
            self.0.subscription_synced(ep, sub.name_any(), synced);
        }
    }

    pub fn counters(&self, sub: &WebhookSubscription) -> Option<(u64, Option<SystemTime>)> {
        endpoint_of(sub).and_then(|ep| self.0.subscription_counters(ep, sub.name_any()))
    }

    pub fn signature_failures(
        &self,
        sub: &WebhookSubscription,
    ) -> Option<(u64, Option<SystemTime>)> {
        endpoint_of(sub).and_then(|ep| self.0.subscription_signature_failures(ep, sub.name_any()))
    }
}
