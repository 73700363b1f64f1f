//! Route sync: how a replica that does not hold the Lease keeps its ingress and delivery
//! configured.
//!
//! With leader election only the leader runs the reconcilers, yet every replica serves
//! the ingress and delivers. Everything the reconcilers hand the data plane is derivable
//! from objects the leader already writes: the endpoint's token key (`<ep>-ingress`), its
//! signing secret (`<ep>-signing` or `spec.signing.secretRef`), header Secrets, the
//! subscription's provider signing secret (`<sub>-provider-signing`) or Atllas header
//! value (`<sub>-atllas-header`), and `status.upstream` saying a subscription was synced.
//! So a follower watches WebhookEndpoints and WebhookSubscriptions through reflectors and,
//! once a second, rebuilds the same [`EndpointDelivery`] and verification keys the
//! reconcilers would, with no provider call and no write of any kind, under the same
//! isolation rules (destination checks, owned generated Secrets, the opt-in label). A
//! fingerprint per object means the data plane is only touched when something changed.
//!
//! Secrets: only their metadata is watched; the data of exactly the Secrets some endpoint
//! or subscription needs is read with a GET when its resourceVersion changes, so a
//! follower never holds the cluster's other Secrets.
//!
//! Must not: call a provider, write status, create Secrets (a missing Secret means the
//! leader has not got there yet; the route waits for it).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::build::{self, SecretRead};
use super::routes::{EndpointKey, IngressRoutes};
use super::secrets::{OwnedSecretError, SecretData, SecretError, SecretStore};
use super::watches::Watches;
use super::{Context, isolation, secrets as secret_rules};
use crate::api::{Provider, WebhookEndpoint, WebhookSubscription};
use crate::inbound::VerificationKeys;

/// The Secrets route sync reads: metadata of all (a watch), data of the needed ones only.
pub struct SecretCache {
    meta: Store<PartialObjectMeta<Secret>>,
    data: HashMap<(String, String), Arc<Secret>>,
    require_label: bool,
}

impl SecretCache {
    /// Drops what is no longer `needed`, and what the watch says is gone; reads a needed
    /// Secret through `store`, which GETs it only when its resourceVersion moved.
    async fn refresh(
        &mut self,
        store: &SecretStore,
        needed: &std::collections::HashSet<(String, String)>,
    ) {
        self.data.retain(|k, _| needed.contains(k));
        for (ns, name) in needed {
            let key = (ns.clone(), name.clone());
            if self
                .meta
                .get(&reflector::ObjectRef::new(name).within(ns))
                .is_none()
            {
                self.data.remove(&key);
                continue;
            }
            match store.get(ns, name).await {
                Ok(Some(s)) => {
                    self.data.insert(key, s);
                }
                Ok(None) => {
                    self.data.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, name = %name, error = %e, "route sync: reading a Secret failed")
                }
            }
        }
    }

    fn get(&self, ns: &str, name: &str) -> Option<&Secret> {
        self.data
            .get(&(ns.to_string(), name.to_string()))
            .map(|s| &**s)
    }
}

impl SecretRead for SecretCache {
    fn owned(
        &self,
        owner: &ObjectMeta,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, OwnedSecretError> {
        let Some(s) = self.get(owner.namespace.as_deref().unwrap_or_default(), name) else {
            return Ok(None);
        };
        if !secret_rules::is_owned_by(&s.metadata, owner.uid.as_deref()) {
            return Err(OwnedSecretError::NotOwned(name.to_string()));
        }
        Ok(Some(SecretData::of(s).all()))
    }

    fn referenced(&self, namespace: &str, name: &str) -> Result<SecretData, SecretError> {
        match self.get(namespace, name) {
            None => Err(SecretError::NotFound(name.to_string())),
            Some(s) if !secret_rules::is_referable(&s.metadata, self.require_label) => {
                Err(SecretError::NotReferable(name.to_string()))
            }
            Some(s) => Ok(SecretData::of(s)),
        }
    }
}

/// The Secrets (namespace, name) the endpoints and subscriptions read.
fn needed_secrets(
    endpoints: &[Arc<WebhookEndpoint>],
    subscriptions: &[Arc<WebhookSubscription>],
) -> std::collections::HashSet<(String, String)> {
    let mut needed = std::collections::HashSet::new();
    for ep in endpoints {
        let ns = ep.namespace().unwrap_or_default();
        needed.insert((ns.clone(), ep.ingress_secret_name()));
        needed.insert((ns.clone(), ep.signing_secret_name()));
        if let Some(r) = ep.spec.signing.as_ref().and_then(|s| s.secret_ref.as_ref()) {
            needed.insert((ns.clone(), r.name.clone()));
        }
        for h in &ep.spec.headers {
            needed.insert((ns.clone(), h.secret_key_ref.name.clone()));
        }
        for name in ep.spec.tls_secret_names() {
            needed.insert((ns.clone(), name.clone()));
        }
    }
    for sub in subscriptions {
        let ns = sub.namespace().unwrap_or_default();
        needed.insert((ns.clone(), sub.atllas_header_secret_name()));
        needed.insert((ns, sub.provider_signing_secret_name()));
    }
    needed
}

/// What the follower applied last, per object: a hash of the inputs.
#[derive(Default)]
struct Applied {
    endpoints: HashMap<EndpointKey, [u8; 32]>,
    subscriptions: HashMap<(EndpointKey, String), [u8; 32]>,
}

/// The caches route sync reads: the role's shared watches.
struct Caches {
    endpoints: Store<WebhookEndpoint>,
    subscriptions: Store<WebhookSubscription>,
    secrets: SecretCache,
}

impl Caches {
    /// Once the watches' first lists are in; `None` when `shutdown` came first.
    async fn ready(
        ctx: &Context,
        watches: &Watches,
        shutdown: &CancellationToken,
    ) -> Option<Caches> {
        if !watches.ready(shutdown).await {
            return None;
        }
        Some(Caches {
            endpoints: watches.endpoints.store.clone(),
            subscriptions: watches.subscriptions.store.clone(),
            secrets: SecretCache {
                meta: watches.secrets.store.clone(),
                data: HashMap::new(),
                require_label: ctx.secrets.require_label(),
            },
        })
    }

    /// Reads the Secrets the objects need now and brings the data plane in step.
    async fn sync(&mut self, ctx: &Context, applied: &mut Applied) {
        let (eps, subs) = (self.endpoints.state(), self.subscriptions.state());
        self.secrets
            .refresh(&ctx.secrets, &needed_secrets(&eps, &subs))
            .await;
        sync_once(ctx, &eps, &subs, &self.secrets, applied);
    }
}

/// Loads the routes of every object that exists now from what the cluster already holds
/// (the same build as the follower's, no provider call), then tells the ingress its
/// routes are loaded. The leader runs this before its reconcilers: their first passes
/// can take long (a provider that is down, a backlog of objects), and until a route is
/// loaded its events would be refused.
pub async fn prime(ctx: &Context, watches: &Watches, shutdown: &CancellationToken) {
    if let Some(mut caches) = Caches::ready(ctx, watches, shutdown).await {
        caches.sync(ctx, &mut Applied::default()).await;
        ctx.routes.0.mark_loaded();
    }
}

/// Keeps the data plane's routes in step with the cluster, read-only, until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut watches = Watches::new();
    watches.start(&ctx, &shutdown);
    ctx.secrets.watch(watches.secrets.cache());
    let Some(mut caches) = Caches::ready(&ctx, &watches, &shutdown).await else {
        return;
    };
    tracing::info!("following: route sync started");
    let mut applied = Applied::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        caches.sync(&ctx, &mut applied).await;
        ctx.routes.0.mark_loaded();
    }
    tracing::info!("route sync stopped");
}

fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The subscription's verification keys, once the leader has set it up (for all but
/// Atllas: synced at least once, so the provider's signing secret, if any, is stored).
fn subscription_keys(sub: &WebhookSubscription, secrets: &SecretCache) -> Option<VerificationKeys> {
    if sub.spec.provider != Provider::Atllas {
        sub.status.as_ref()?.upstream.as_ref()?;
    }
    build::verification_keys(sub, secrets)
}

/// Brings the data plane's endpoints, then its subscriptions, in step with the objects.
fn sync_once(
    ctx: &Context,
    endpoints: &[Arc<WebhookEndpoint>],
    subscriptions: &[Arc<WebhookSubscription>],
    secrets: &SecretCache,
    applied: &mut Applied,
) {
    sync_endpoints(ctx, endpoints, secrets, applied);
    sync_subscriptions(ctx.routes.0.as_ref(), subscriptions, secrets, applied);
}

/// Configures each endpoint whose inputs changed and removes those gone.
fn sync_endpoints(
    ctx: &Context,
    endpoints: &[Arc<WebhookEndpoint>],
    secrets: &SecretCache,
    applied: &mut Applied,
) {
    let routes: &dyn IngressRoutes = ctx.routes.0.as_ref();
    let mut seen_eps = HashMap::new();
    for ep in endpoints {
        if ep.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // A refused destination gets no route here either (the leader reports why).
        if isolation::check_destination(
            &ep.spec.destination,
            &ep.namespace().unwrap_or_default(),
            ctx.config.allow_cross_namespace_refs,
            &ctx.destinations,
        )
        .is_err()
        {
            continue;
        }
        let Ok(d) = build::endpoint_delivery(ep, secrets) else {
            continue;
        };
        let spec = serde_json::to_vec(&d.spec).unwrap_or_default();
        let mut parts: Vec<&[u8]> = vec![d.token.as_bytes(), &spec];
        parts.extend(d.signing_secrets.iter().map(Vec::as_slice));
        for (n, v) in &d.headers {
            parts.push(n.as_bytes());
            parts.push(v.as_bytes());
        }
        let fp = fingerprint(&parts);
        if applied.endpoints.get(&d.key) != Some(&fp) {
            match routes.configure_endpoint(&d) {
                Ok(()) => {
                    tracing::info!(namespace = %d.key.0, name = %d.key.1, "route sync: endpoint configured")
                }
                Err((reason, message)) => {
                    tracing::warn!(namespace = %d.key.0, name = %d.key.1, reason, %message, "route sync: endpoint refused")
                }
            }
        }
        seen_eps.insert(d.key.clone(), fp);
    }
    for key in applied.endpoints.keys() {
        if !seen_eps.contains_key(key) {
            routes.remove_endpoint(key.clone());
        }
    }
    applied.endpoints = seen_eps;
}

/// Registers the keys of each subscription whose inputs changed and removes those gone.
fn sync_subscriptions(
    routes: &dyn IngressRoutes,
    subscriptions: &[Arc<WebhookSubscription>],
    secrets: &SecretCache,
    applied: &mut Applied,
) {
    let mut seen_subs = HashMap::new();
    for sub in subscriptions {
        if sub.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(ep) = super::routes::endpoint_of(sub) else {
            continue;
        };
        let Some(keys) = subscription_keys(sub, secrets) else {
            continue;
        };
        let provider = serde_json::to_vec(&sub.spec.provider).unwrap_or_default();
        let mut parts: Vec<&[u8]> = vec![&provider];
        parts.extend(keys.secrets.iter().map(Vec::as_slice));
        let header = keys.header_name.clone().unwrap_or_default();
        parts.push(header.as_bytes());
        let fp = fingerprint(&parts);
        let id = (ep.clone(), sub.name_any());
        if applied.subscriptions.get(&id) != Some(&fp) {
            routes.upsert_subscription(ep, sub.name_any(), sub.spec.provider, keys);
        }
        seen_subs.insert(id, fp);
    }
    for (ep, name) in applied.subscriptions.keys() {
        if !seen_subs.contains_key(&(ep.clone(), name.clone())) {
            routes.remove_subscription(ep.clone(), name.clone());
        }
    }
    applied.subscriptions = seen_subs;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_needs_only_the_secrets_its_objects_name() {
        let spec = serde_json::from_value(serde_json::json!({
            "destination": {"service": {"name": "sink", "port": 8080}},
            "signing": {"secretRef": {"name": "my-signing", "key": "k"}},
            "headers": [{"name": "X-Token", "secretKeyRef": {"name": "auth", "key": "t"}}],
        }))
        .expect("a spec");
        let mut ep = WebhookEndpoint::new("orders", spec);
        ep.metadata.namespace = Some("a".into());
        let sub: WebhookSubscription = serde_json::from_value(serde_json::json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
            "metadata": {"name": "calls", "namespace": "b"},
            "spec": {"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}}
        }))
        .unwrap();
        let mut got: Vec<(String, String)> = needed_secrets(&[Arc::new(ep)], &[Arc::new(sub)])
            .into_iter()
            .collect();
        got.sort();
        let want: Vec<(String, String)> = [
            ("a", "auth"),
            ("a", "my-signing"),
            ("a", "orders-ingress"),
            ("a", "orders-signing"),
            ("b", "calls-atllas-header"),
            ("b", "calls-provider-signing"),
        ]
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
        assert_eq!(got, want);
    }
}
