//! The operator's [`KeySource`]: what the ingress asks when a request's signature does not
//! verify against its route's keys (see `dataplane::ingress::key_fetch`, which bounds the
//! calls). From the route's endpoint and subscription name it finds the
//! WebhookSubscription (the controllers' cache, or a GET on a follower), its credentials
//! (through the [`super::secrets::SecretStore`]) and the URL the provider calls, and asks
//! the provider, read-only, for the secrets it signs that URL's deliveries with now
//! ([`crate::providers::ProviderApi::signing_secrets`]). Any replica may do this: it never
//! writes (the leader's pass stores the secret in `<sub>-provider-signing` as before).
//! Errors are fixed reasons, never a secret or a URL.

use std::sync::{Arc, Weak};

use async_trait::async_trait;

use super::Context;
use super::subscription::{read_credentials, resolve_target, translate};
use crate::api::Provider;
use crate::dataplane::EndpointKey;
use crate::ingress::key_fetch::{KeyFetchError, KeySource};

/// Fetches through the providers' management clients of `ctx`.
pub struct ProviderKeys {
    /// Weak: the data plane holds this, and the context holds the data plane.
    ctx: Weak<Context>,
}

impl ProviderKeys {
    pub fn new(ctx: &Arc<Context>) -> Self {
        ProviderKeys {
            ctx: Arc::downgrade(ctx),
        }
    }
}

#[async_trait]
impl KeySource for ProviderKeys {
    async fn current_secrets(
        &self,
        endpoint: &EndpointKey,
        subscription: &str,
    ) -> Result<Vec<Vec<u8>>, KeyFetchError> {
        let ctx = self.ctx.upgrade().ok_or(KeyFetchError("stopping"))?;
        let ns = endpoint.namespace.as_str();
        let sub = ctx
            .subscription(ns, subscription)
            .await
            .map_err(|_| KeyFetchError("subscription_unreadable"))?
            .ok_or(KeyFetchError("subscription_not_found"))?;
        // The route's subscription is this object only if it receives on that endpoint.
        if sub.spec.endpoint_ref.as_ref().map(|r| r.name.as_str()) != Some(endpoint.name.as_str()) {
            return Err(KeyFetchError("not_this_endpoint"));
        }
        if !matches!(sub.spec.provider, Provider::Atomic | Provider::Smallest) {
            return Ok(Vec::new());
        }
        let hook_url = resolve_target(&sub, &ctx)
            .await
            .map_err(|_| KeyFetchError("endpoint_unreadable"))?
            .map_err(|e| KeyFetchError(e.reason()))?;
        let (creds, _) = read_credentials(&ctx, ns, &sub.spec)
            .await
            .map_err(|e| KeyFetchError(e.reason()))?;
        let desired = translate(ns, subscription, &sub.spec, hook_url);
        let provider = ctx
            .providers
            .get(crate::controller::to_dataplane::provider(sub.spec.provider));
        let secrets = provider
            .signing_secrets(&creds, &desired)
            .await
            .map_err(|e| KeyFetchError(e.reason()))?;
        Ok(secrets.into_iter().map(String::into_bytes).collect())
    }
}
