//! Route sync: how a replica that does not hold the Lease keeps its ingress and delivery
//! configured.
//!
//! With leader election only the leader runs the reconcilers, yet every replica serves
//! the ingress and delivers. Everything the reconcilers hand the data plane is derivable
//! from objects the leader already writes: the endpoint's token key (`<ep>-ingress`), its
//! signing secret (`<ep>-signing` or `spec.signing.secretRef`), header Secrets, the
//! subscription's provider signing secret (`<sub>-provider-signing`) or Atllas header
//! value (`<sub>-atllas-header`), and `status.upstream` saying a subscription was synced.
//! So a follower watches WebhookEndpoints, WebhookSubscriptions and Secrets through
//! reflectors and, once a second, rebuilds the same [`EndpointDelivery`] and verification
//! keys the reconcilers would, with no provider call and no write of any kind. A
//! fingerprint per object means the data plane is only touched when something changed.
//!
//! Must not: call a provider, write status, create Secrets (a missing Secret means the
//! leader has not got there yet; the route waits for it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::routes::{EndpointDelivery, EndpointKey, IngressRoutes};
use super::{Context, api, endpoint, subscription};
use crate::api::{Provider, WebhookEndpoint, WebhookSubscription};
use crate::inbound::VerificationKeys;

use super::endpoint::{INGRESS_SECRET_KEY, SIGNING_KEY};
use super::rotation;

/// The secrets in force, newest first: `current` plus, inside the overlap window the
/// leader recorded in the owned Secret, the one it replaced. Read-only.
fn with_rotation(secrets: &Store<Secret>, ns: &str, owned: &str, current: Vec<u8>) -> Vec<Vec<u8>> {
    let stored = secrets
        .get(&reflector::ObjectRef::new(owned).within(ns))
        .and_then(|s| s.data.clone())
        .map(|d| d.into_iter().map(|(k, v)| (k, v.0)).collect())
        .unwrap_or_default();
    // The window's end is stored, so the overlap length does not matter here.
    rotation::decide(&stored, &current, jiff::Timestamp::now(), Duration::ZERO).secrets
}

fn reflect<K>(api: kube::Api<K>, shutdown: &CancellationToken) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                next = stream.next() => if next.is_none() { return },
            }
        }
    });
    store
}

/// What the follower applied last, per object: a hash of the inputs.
#[derive(Default)]
struct Applied {
    endpoints: HashMap<EndpointKey, [u8; 32]>,
    subscriptions: HashMap<(EndpointKey, String), [u8; 32]>,
}

/// The three caches route sync reads, filled by their own watches.
struct Caches {
    endpoints: Store<WebhookEndpoint>,
    subscriptions: Store<WebhookSubscription>,
    secrets: Store<Secret>,
}

impl Caches {
    /// Starts the watches (they stop with `shutdown`) and waits for their first lists;
    /// `None` when `shutdown` came first.
    async fn start(ctx: &Context, shutdown: &CancellationToken) -> Option<Caches> {
        let ns = ctx.config.namespace.clone();
        let caches = Caches {
            endpoints: reflect(api(&ctx.client, ns.as_deref()), shutdown),
            subscriptions: reflect(api(&ctx.client, ns.as_deref()), shutdown),
            secrets: reflect(api(&ctx.client, ns.as_deref()), shutdown),
        };
        tokio::select! {
            _ = shutdown.cancelled() => None,
            _ = async {
                let _ = caches.endpoints.wait_until_ready().await;
                let _ = caches.subscriptions.wait_until_ready().await;
                let _ = caches.secrets.wait_until_ready().await;
            } => Some(caches),
        }
    }

    fn sync(&self, routes: &dyn IngressRoutes, applied: &mut Applied) {
        sync_once(
            routes,
            &self.endpoints.state(),
            &self.subscriptions.state(),
            &self.secrets,
            applied,
        );
    }
}

/// Loads the routes of every object that exists now from what the cluster already holds
/// (the same build as the follower's, no provider call), then tells the ingress its
/// routes are loaded. The leader runs this before its reconcilers: their first passes
/// can take long (a provider that is down, a backlog of objects), and until a route is
/// loaded its events would be refused.
pub async fn prime(ctx: &Context, shutdown: &CancellationToken) {
    let watches = shutdown.child_token();
    if let Some(caches) = Caches::start(ctx, &watches).await {
        caches.sync(ctx.routes.0.as_ref(), &mut Applied::default());
        ctx.routes.0.mark_loaded();
    }
    watches.cancel();
}

/// Keeps the data plane's routes in step with the cluster, read-only, until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let Some(caches) = Caches::start(&ctx, &shutdown).await else {
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
        caches.sync(ctx.routes.0.as_ref(), &mut applied);
        ctx.routes.0.mark_loaded();
    }
    tracing::info!("route sync stopped");
}

fn secret_value(secrets: &Store<Secret>, ns: &str, name: &str, key: &str) -> Option<Vec<u8>> {
    let s = secrets.get(&reflector::ObjectRef::new(name).within(ns))?;
    s.data.as_ref()?.get(key).map(|v| v.0.clone())
}

fn fingerprint(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The endpoint's delivery configuration, if every Secret it needs exists.
pub fn endpoint_delivery(
    ep: &WebhookEndpoint,
    secrets: &Store<Secret>,
) -> Option<EndpointDelivery> {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let token_key = secret_value(
        secrets,
        &ns,
        &endpoint::ingress_secret_name(&name),
        INGRESS_SECRET_KEY,
    )?;
    let signing = match ep.spec.signing.as_ref().and_then(|s| s.secret_ref.as_ref()) {
        Some(r) => secret_value(secrets, &ns, &r.name, &r.key)?,
        None => secret_value(
            secrets,
            &ns,
            &endpoint::signing_secret_name(&name),
            SIGNING_KEY,
        )?,
    };
    let mut headers = Vec::new();
    for h in &ep.spec.headers {
        let r = &h.secret_key_ref;
        let v = secret_value(secrets, &ns, &r.name, &r.key)?;
        headers.push((
            h.name.clone(),
            String::from_utf8_lossy(&v).trim().to_string(),
        ));
    }
    let signing_secrets =
        with_rotation(secrets, &ns, &endpoint::signing_secret_name(&name), signing);
    Some(EndpointDelivery {
        key: (ns, name),
        token: endpoint::ingress_token(&token_key),
        spec: ep.spec.clone(),
        signing_secrets,
        headers,
    })
}

/// The subscription's verification keys, once the leader has set it up.
pub fn subscription_keys(
    sub: &WebhookSubscription,
    secrets: &Store<Secret>,
) -> Option<VerificationKeys> {
    let ns = sub.namespace().unwrap_or_default();
    let name = sub.name_any();
    if sub.spec.provider == Provider::Atllas {
        let value = secret_value(
            secrets,
            &ns,
            &subscription::atllas_header_secret_name(&name),
            subscription::HEADER_VALUE_KEY,
        )?;
        let header = sub
            .spec
            .atllas
            .as_ref()
            .map(|a| a.header_name.clone())
            .unwrap_or_else(|| subscription::DEFAULT_ATLLAS_HEADER.into());
        return Some(VerificationKeys {
            secrets: vec![value],
            header_name: Some(header),
            ..Default::default()
        });
    }
    // Synced at least once: the provider's signing secret (if it has one) is stored.
    sub.status.as_ref()?.upstream.as_ref()?;
    let owned = subscription::signing_secret_name(&name);
    let keys = secret_value(secrets, &ns, &owned, subscription::SIGNING_SECRET_KEY)
        .map(|current| with_rotation(secrets, &ns, &owned, current))
        .unwrap_or_default();
    let (header_name, signature_encoding) = sub.spec.signature_scheme();
    Some(VerificationKeys {
        secrets: keys,
        header_name,
        signature_encoding,
    })
}

fn sync_once(
    routes: &dyn IngressRoutes,
    endpoints: &[Arc<WebhookEndpoint>],
    subscriptions: &[Arc<WebhookSubscription>],
    secrets: &Store<Secret>,
    applied: &mut Applied,
) {
    let mut seen_eps = HashMap::new();
    for ep in endpoints {
        if ep.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(d) = endpoint_delivery(ep, secrets) else {
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
                Err(reason) => {
                    tracing::warn!(namespace = %d.key.0, name = %d.key.1, %reason, "route sync: endpoint refused")
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
