//! The data plane as the reconcilers see it: [`IngressRoutes`] for [`DataPlane`].

use std::time::SystemTime;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::routes::{
    EndpointDelivery, EndpointHealthView, EndpointKey, IngressRoutes, Refusal, TestInjection,
};
use crate::api::Provider;
use crate::api::conditions::reasons;
use crate::dataplane::{
    DataPlane, EndpointConfig, EndpointConfigError, ReplayFilter, SubscriptionRoute,
};
use crate::delivery::SigningSecret;
use crate::inbound::VerificationKeys;

/// Each refusal of the data plane under its own condition reason.
fn refusal(e: EndpointConfigError) -> Refusal {
    let reason = match &e {
        EndpointConfigError::InvalidToken => reasons::INGRESS_TOKEN_INVALID,
        EndpointConfigError::TokenInUse => reasons::INGRESS_TOKEN_IN_USE,
        EndpointConfigError::InvalidHeaderName(_) | EndpointConfigError::InvalidHeaderValue(_) => {
            reasons::HEADER_INVALID
        }
        EndpointConfigError::NoSigningSecret => reasons::SECRET_MISSING,
        EndpointConfigError::InvalidTls(_) => reasons::TLS_CONFIG_INVALID,
    };
    (reason, e.to_string())
}

impl IngressRoutes for std::sync::Arc<DataPlane> {
    fn upsert_subscription(
        &self,
        endpoint: EndpointKey,
        subscription: String,
        provider: Provider,
        keys: VerificationKeys,
    ) {
        DataPlane::upsert_subscription(
            self,
            SubscriptionRoute {
                endpoint,
                name: subscription,
                provider: super::to_dataplane::provider(provider),
                keys,
            },
        );
    }

    fn reconcile_failed(&self, kind: String, reason: &'static str) {
        self.metrics().reconcile_failed(kind, reason);
    }

    fn remove_subscription(&self, endpoint: EndpointKey, subscription: String) {
        DataPlane::remove_subscription(self, &endpoint, &subscription);
    }

    fn subscription_synced(&self, endpoint: EndpointKey, subscription: String, synced: bool) {
        DataPlane::set_subscription_synced(self, &endpoint, &subscription, synced);
    }

    fn subscription_counters(
        &self,
        endpoint: EndpointKey,
        subscription: String,
    ) -> Option<(u64, Option<SystemTime>)> {
        DataPlane::subscription_counters(self, &endpoint, &subscription)
    }

    fn subscription_signature_failures(
        &self,
        endpoint: EndpointKey,
        subscription: String,
    ) -> Option<(u64, Option<SystemTime>)> {
        DataPlane::subscription_signature_failures(self, &endpoint, &subscription)
    }

    fn configure_endpoint(&self, ep: &EndpointDelivery) -> Result<(), Refusal> {
        let destination = super::isolation::destination(&ep.spec.destination, &ep.key.namespace)
            .ok_or_else(|| {
                (
                    reasons::INVALID_SPEC,
                    "exactly one of destination.service or destination.url must be set".into(),
                )
            })?;
        let policy = super::to_dataplane::policy(&ep.spec.delivery)
            .map_err(|e| (reasons::INVALID_SPEC, format!("spec.delivery: {e}")))?;
        let signing_secrets = ep
            .signing_secrets
            .iter()
            .map(|s| {
                SigningSecret::parse(s).map_err(|e| {
                    (
                        reasons::SIGNING_SECRET_INVALID,
                        format!("signing secret: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        DataPlane::upsert_endpoint(
            self,
            EndpointConfig {
                key: ep.key.clone(),
                token: ep.token.clone(),
                destination,
                policy,
                signing_secrets,
                headers: ep.headers.clone(),
                event_types: ep.spec.event_types.iter().map(|e| e.0.clone()).collect(),
                max_queued_events: ep.spec.max_queued_events,
                max_queued_bytes: ep.spec.max_queued_bytes,
                ingress_rate_limit: ep
                    .spec
                    .ingress_rate_limit
                    .map(|l| crate::ingress::RateLimit {
                        per_second: l.requests_per_second,
                        burst: l.burst.unwrap_or(l.requests_per_second),
                    }),
                format: super::to_dataplane::format(ep.spec.format),
                filter: ep
                    .filter
                    .clone()
                    .map_err(|e| (reasons::FILTER_INVALID, format!("spec.filter: {e}")))?,
                dedupe: ep
                    .dedupe
                    .clone()
                    .map_err(|e| (reasons::DEDUPE_INVALID, format!("spec.dedupe: {e}")))?,
                tls: ep.tls.clone(),
            },
        )
        .map_err(refusal)
    }

    fn remove_endpoint(&self, endpoint: EndpointKey) {
        DataPlane::remove_endpoint(self, &endpoint);
    }

    fn endpoint_health(&self, endpoint: EndpointKey) -> Option<EndpointHealthView> {
        DataPlane::endpoint_health(self, &endpoint).map(|h| EndpointHealthView {
            stats: super::to_dataplane::delivery_stats(h.stats),
            healthy: h.verdict.healthy,
            reason: h.verdict.reason,
            message: h.verdict.message,
            destination_error: h.destination_error.map(|e| (e.reason(), e.to_string())),
        })
    }

    fn mark_loaded(&self) {
        DataPlane::mark_routes_loaded(self);
    }

    fn purge_endpoint(&self, endpoint: EndpointKey) -> BoxFuture<'static, anyhow::Result<u64>> {
        let dp = self.clone();
        async move { DataPlane::purge_endpoint(&dp, &endpoint).await }.boxed()
    }

    fn replay(
        &self,
        endpoint: EndpointKey,
        filter: ReplayFilter,
    ) -> BoxFuture<'static, anyhow::Result<u64>> {
        let dp = self.clone();
        async move { DataPlane::replay(&dp, &endpoint, filter).await }.boxed()
    }
}

impl TestInjection for std::sync::Arc<DataPlane> {
    fn inject(
        &self,
        token: String,
        subscription: String,
        headers: http::HeaderMap,
        body: Vec<u8>,
    ) -> BoxFuture<'static, anyhow::Result<u16>> {
        let dp = self.clone();
        async move {
            Ok(DataPlane::inject(&dp, &token, &subscription, headers, body)
                .await?
                .as_u16())
        }
        .boxed()
    }

    fn last_test(
        &self,
        endpoint: EndpointKey,
        subscription: String,
    ) -> Option<(SystemTime, std::time::Duration)> {
        DataPlane::last_test(self, &endpoint, &subscription)
    }

    fn last_test_failure(
        &self,
        endpoint: EndpointKey,
        subscription: String,
    ) -> Option<(SystemTime, String)> {
        DataPlane::last_test_failure(self, &endpoint, &subscription)
    }
}
