//! Route sync: how a replica that does not hold the Lease keeps its ingress and delivery
//! configured.
//!
//! With leader election only the leader runs the reconcilers, yet every replica serves
//! the ingress and delivers. Everything the reconcilers hand the data plane is derivable
//! from objects the leader already writes: the endpoint's token key (`<ep>-ingress`), its
//! signing secret (`<ep>-signing` or `spec.signing.secretRef`), header Secrets, the
//! subscription's provider signing secret (`<sub>-provider-signing`) or Atllas header
//! value (`<sub>-atllas-header`). So a follower watches WebhookEndpoints,
//! WebhookSubscriptions and Secret metadata and, whenever a watch delivers a change (a
//! burst coalesced for a few milliseconds; a slow periodic resync as a safety net),
//! rebuilds the same [`EndpointDelivery`] and verification keys the reconcilers would,
//! with no provider call and no write but its replica Lease, under the same isolation
//! rules (destination checks, owned generated Secrets, the opt-in label). A fingerprint
//! per object means the data plane is only touched when something changed.
//!
//! A subscription routes as soon as it and its endpoint's Secrets exist, before any
//! registration: the URL (token + name) is known before the provider is called. Its
//! verification keys are whatever is known then, possibly none yet (Smallest and Atomic
//! issue their secret with the registration).
//!
//! Secrets: only their metadata is watched; the data of exactly the Secrets some endpoint
//! or subscription needs is read with a GET when its resourceVersion changes, so a
//! follower never holds the cluster's other Secrets. The metadata watch may lag the
//! subscription watch: when a subscription changes, a Secret it needs that the metadata
//! cache lacks, and every Secret a subscription waiting for the route handshake needs, is
//! read with a GET at once rather than awaited.
//!
//! The route handshake (see [`super::replicas`]): after each sync in which every
//! subscription that must route did route, the replica reports the highest subscription
//! resourceVersion in its cache in its replica Lease. A subscription must route once the
//! leader has put the `Routed` condition on it (it registers, or is about to register, the
//! URL), except Atllas (nothing is registered; the user copies the URL).
//!
//! Must not: call a provider, write status, create Secrets (a missing Secret means the
//! leader has not got there yet; the route waits for it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ObjectMeta};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::build::{self, SecretRead};
use super::replicas::{self, OwnLease};
use super::routes::{EndpointKey, IngressRoutes};
use super::secrets::{OwnedSecretError, SecretData, SecretError, SecretStore};
use super::watches::Watches;
use super::{Context, isolation, secrets as secret_rules};
use crate::api::conditions::{reasons, types};
use crate::api::{Provider, WebhookEndpoint, WebhookSubscription};
use crate::inbound::VerificationKeys;

/// A burst of watch changes is gathered this long before one sync.
const COALESCE: Duration = Duration::from_millis(5);
/// A full sync this often, whatever the watches say.
const RESYNC: Duration = Duration::from_secs(30);

type SecretKey = (String, String);

/// The Secrets route sync reads: metadata of all (a watch), data of the needed ones only.
pub struct SecretCache {
    meta: Store<PartialObjectMeta<Secret>>,
    data: HashMap<SecretKey, Arc<Secret>>,
    /// Secrets read by a forced GET at this resourceVersion, which the metadata watch has
    /// not shown yet: kept as read until it does.
    ahead: HashMap<SecretKey, u64>,
    client: Option<Client>,
    require_label: bool,
}

impl SecretCache {
    /// The metadata cache's resourceVersion of a Secret, `None` when it holds none.
    fn watched(&self, (ns, name): &SecretKey) -> Option<u64> {
        self.meta
            .get(&reflector::ObjectRef::new(name).within(ns))
            .map(|m| replicas::version(m.metadata.resource_version.as_deref()).unwrap_or(u64::MAX))
    }

    /// Drops what is no longer `needed`, and what the watch says is gone; reads a needed
    /// Secret through `store`, which GETs it only when its resourceVersion moved; GETs
    /// the `forced` ones whatever the metadata cache says.
    async fn refresh(
        &mut self,
        store: &SecretStore,
        needed: &HashSet<SecretKey>,
        forced: &HashSet<SecretKey>,
    ) {
        self.data.retain(|k, _| needed.contains(k));
        self.ahead.retain(|k, _| needed.contains(k));
        for key in needed {
            let (ns, name) = key;
            let watched = self.watched(key);
            if forced.contains(key) {
                self.get_now(key).await;
                continue;
            }
            if let Some(&read) = self.ahead.get(key) {
                if watched.is_none_or(|w| w < read) {
                    continue;
                }
                self.ahead.remove(key);
            }
            if watched.is_none() {
                self.data.remove(key);
                continue;
            }
            match store.get(ns, name).await {
                Ok(Some(s)) => {
                    self.data.insert(key.clone(), s);
                }
                Ok(None) => {
                    self.data.remove(key);
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, name = %name, error = %e, "route sync: reading a Secret failed")
                }
            }
        }
    }

    /// A GET of the Secret, newer than or as new as anything the watch may show.
    async fn get_now(&mut self, key: &SecretKey) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let (ns, name) = key;
        match Api::<Secret>::namespaced(client, ns).get_opt(name).await {
            Ok(Some(mut s)) => {
                // Neither is read; `last-applied-configuration` may hold the values again.
                s.metadata.annotations = None;
                s.metadata.managed_fields = None;
                if let Some(rv) = replicas::version(s.metadata.resource_version.as_deref()) {
                    self.ahead.insert(key.clone(), rv);
                }
                self.data.insert(key.clone(), Arc::new(s));
            }
            Ok(None) => {
                self.data.remove(key);
                self.ahead.remove(key);
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, name = %name, error = %e, "route sync: reading a Secret failed")
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

/// The Secrets (namespace, name) one endpoint reads.
fn endpoint_secrets(ep: &WebhookEndpoint) -> Vec<SecretKey> {
    let ns = ep.namespace().unwrap_or_default();
    let mut names = vec![ep.ingress_secret_name(), ep.signing_secret_name()];
    if let Some(r) = ep.spec.signing.as_ref().and_then(|s| s.secret_ref.as_ref()) {
        names.push(r.name.clone());
    }
    names.extend(
        ep.spec
            .headers
            .iter()
            .map(|h| h.secret_key_ref.name.clone()),
    );
    names.extend(ep.spec.tls_secret_names().cloned());
    names.into_iter().map(|n| (ns.clone(), n)).collect()
}

/// The Secrets (namespace, name) the endpoints and subscriptions read.
fn needed_secrets(
    endpoints: &[Arc<WebhookEndpoint>],
    subscriptions: &[Arc<WebhookSubscription>],
) -> HashSet<SecretKey> {
    let mut needed: HashSet<SecretKey> =
        endpoints.iter().flat_map(|e| endpoint_secrets(e)).collect();
    for sub in subscriptions {
        let ns = sub.namespace().unwrap_or_default();
        needed.insert((ns.clone(), sub.atllas_header_secret_name()));
        needed.insert((ns, sub.provider_signing_secret_name()));
    }
    needed
}

/// The `Routed` condition the leader puts on a subscription it registers (or is about to).
fn routed_condition(sub: &WebhookSubscription) -> Option<&Condition> {
    sub.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == types::ROUTED)
}

/// Whether this replica must route `sub` before it may report the handshake done.
fn must_route(sub: &WebhookSubscription) -> bool {
    sub.metadata.deletion_timestamp.is_none()
        && sub.spec.provider != Provider::Atllas
        && sub.spec.endpoint_ref.is_some()
        && routed_condition(sub).is_some()
}

/// Whether the leader waits for the replicas to route `sub`.
fn handshake_pending(sub: &WebhookSubscription) -> bool {
    routed_condition(sub).is_some_and(|c| c.reason == reasons::ROUTES_PENDING)
}

/// The Secrets to GET now for objects that changed: those the metadata cache lacks, and
/// all of those a subscription waiting for the handshake reads (its endpoint's included).
fn forced_secrets(
    changed: &Changed,
    endpoints: &Store<WebhookEndpoint>,
    secrets: &SecretCache,
) -> HashSet<SecretKey> {
    let mut forced = HashSet::new();
    let mut consider = |key: SecretKey, all: bool| {
        if all || secrets.watched(&key).is_none() {
            forced.insert(key);
        }
    };
    for ep in changed.endpoints.values() {
        for key in endpoint_secrets(ep) {
            consider(key, false);
        }
    }
    for sub in changed.subscriptions.values() {
        if sub.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let all = handshake_pending(sub);
        let ns = sub.namespace().unwrap_or_default();
        match sub.spec.provider {
            Provider::Atllas => consider((ns.clone(), sub.atllas_header_secret_name()), all),
            Provider::Atomic | Provider::Smallest => {
                consider((ns.clone(), sub.provider_signing_secret_name()), all)
            }
            Provider::Atlas => {}
        }
        if let Some(r) = &sub.spec.endpoint_ref {
            let ep = endpoints.get(&reflector::ObjectRef::new(&r.name).within(&ns));
            match ep {
                Some(ep) => {
                    for key in endpoint_secrets(&ep) {
                        consider(key, all);
                    }
                }
                // Not in the endpoint cache yet: its generated Secrets at least.
                None => {
                    for suffix in ["ingress", "signing"] {
                        consider((ns.clone(), format!("{}-{suffix}", r.name)), all);
                    }
                }
            }
        }
    }
    forced
}

/// What the follower applied last, per object: a hash of the inputs (and, for an
/// endpoint, whether the data plane took it).
#[derive(Default)]
struct Applied {
    endpoints: HashMap<EndpointKey, ([u8; 32], bool)>,
    subscriptions: HashMap<(EndpointKey, String), [u8; 32]>,
    /// The subscription resourceVersion through which every route that must be there is.
    routed_through: Option<u64>,
}

/// The objects a burst of watch changes touched (newest version each).
#[derive(Default)]
struct Changed {
    endpoints: HashMap<(String, String), Arc<WebhookEndpoint>>,
    subscriptions: HashMap<(String, String), Arc<WebhookSubscription>>,
}

enum Change {
    Endpoint(Arc<WebhookEndpoint>),
    Subscription(Arc<WebhookSubscription>),
    Secret,
}

impl Changed {
    fn add(&mut self, change: Change) {
        let id = |m: &ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        match change {
            Change::Endpoint(e) => {
                self.endpoints.insert(id(&e.metadata), e);
            }
            Change::Subscription(s) => {
                self.subscriptions.insert(id(&s.metadata), s);
            }
            Change::Secret => {}
        }
    }
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
                ahead: HashMap::new(),
                client: Some(ctx.client.clone()),
                require_label: ctx.secrets.require_label(),
            },
        })
    }

    /// Reads the Secrets the objects need now (GETs those `changed` needs at once) and
    /// brings the data plane in step; then records how far the routes are applied.
    async fn sync(&mut self, ctx: &Context, applied: &mut Applied, changed: &Changed) {
        let (eps, subs) = (self.endpoints.state(), self.subscriptions.state());
        let forced = forced_secrets(changed, &self.endpoints, &self.secrets);
        self.secrets
            .refresh(&ctx.secrets, &needed_secrets(&eps, &subs), &forced)
            .await;
        sync_once(ctx, &eps, &subs, &self.secrets, applied);
        let through = subs
            .iter()
            .filter_map(|s| replicas::version(s.metadata.resource_version.as_deref()))
            .max()
            .unwrap_or(0);
        let missing: Vec<String> = subs
            .iter()
            .filter(|s| must_route(s) && !routed(s, applied))
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        if missing.is_empty() {
            applied.routed_through = applied.routed_through.max(Some(through));
        } else {
            tracing::debug!(
                ?missing,
                "route sync: subscriptions that must route do not yet"
            );
        }
    }
}

/// Whether the data plane routes `sub`: its endpoint was taken and it is registered.
fn routed(sub: &WebhookSubscription, applied: &Applied) -> bool {
    let Some(ep) = super::routes::endpoint_of(sub) else {
        return false;
    };
    applied.endpoints.get(&ep).is_some_and(|(_, ok)| *ok)
        && applied.subscriptions.contains_key(&(ep, sub.name_any()))
}

/// Loads the routes of every object that exists now from what the cluster already holds
/// (the same build as the follower's, no provider call), then tells the ingress its
/// routes are loaded. The leader runs this before its reconcilers: their first passes
/// can take long (a provider that is down, a backlog of objects), and until a route is
/// loaded its events would be refused.
pub async fn prime(ctx: &Context, watches: &Watches, shutdown: &CancellationToken) {
    if let Some(mut caches) = Caches::ready(ctx, watches, shutdown).await {
        caches
            .sync(ctx, &mut Applied::default(), &Changed::default())
            .await;
        ctx.routes.0.mark_loaded();
    }
}

/// The three watches' changes as one stream.
fn changes(watches: &Watches) -> impl Stream<Item = Change> + Send + Unpin + 'static {
    futures::stream::select_all([
        watches.endpoints.subscribe().map(Change::Endpoint).boxed(),
        watches
            .subscriptions
            .subscribe()
            .map(Change::Subscription)
            .boxed(),
        watches.secrets.subscribe().map(|_| Change::Secret).boxed(),
    ])
}

/// A burst of changes: `first`, and whatever follows within [`COALESCE`]. Not awaited
/// inside a `select!`: a cancelled burst would lose the changes it had taken.
async fn burst(first: Change, changes: &mut (impl Stream<Item = Change> + Unpin)) -> Changed {
    let mut changed = Changed::default();
    changed.add(first);
    let until = tokio::time::Instant::now() + COALESCE;
    while let Ok(Some(next)) = tokio::time::timeout_at(until, changes.next()).await {
        changed.add(next);
    }
    changed
}

/// Keeps the data plane's routes in step with the cluster, read-only, until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut watches = Watches::new();
    let mut changes = changes(&watches);
    watches.start(&ctx, &shutdown);
    ctx.secrets.watch(watches.secrets.cache());
    let Some(mut caches) = Caches::ready(&ctx, &watches, &shutdown).await else {
        return;
    };
    tracing::info!("following: route sync started");
    let mut applied = Applied::default();
    caches.sync(&ctx, &mut applied, &Changed::default()).await;
    ctx.routes.0.mark_loaded();
    // Created only now: the routes are loaded.
    let mut lease = ctx
        .replica_config()
        .cloned()
        .map(|c| OwnLease::new(ctx.client.clone(), c));
    let mut renew = tokio::time::interval(replicas::RENEW);
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    loop {
        if let (Some(lease), Some(through)) = (lease.as_mut(), applied.routed_through) {
            lease.report(through).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // `next()` loses nothing when another branch wins; the burst runs unraced.
            first = changes.next() => match first {
                Some(first) => {
                    let changed = burst(first, &mut changes).await;
                    caches.sync(&ctx, &mut applied, &changed).await;
                }
                None => break,
            },
            _ = resync.tick() => caches.sync(&ctx, &mut applied, &Changed::default()).await,
            _ = renew.tick() => {
                if let Some(lease) = lease.as_mut() {
                    lease.renew().await;
                }
            }
        }
    }
    if let Some(lease) = lease.as_ref() {
        lease.remove().await;
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

/// The subscription's verification keys, known or not: routes do not wait for the
/// registration (an empty key set means "not known yet"). `None` only while a generated
/// Secret it needs (the Atllas header value) is missing or someone else's.
fn subscription_keys(sub: &WebhookSubscription, secrets: &SecretCache) -> Option<VerificationKeys> {
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
            ctx.destinations.allow_cross_namespace_refs,
            &ctx.destinations.resolver,
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
        let taken = match applied.endpoints.get(&d.key) {
            Some((before, taken)) if *before == fp => *taken,
            _ => match routes.configure_endpoint(&d) {
                Ok(()) => {
                    tracing::info!(namespace = %d.key.namespace, name = %d.key.name, "route sync: endpoint configured");
                    true
                }
                Err((reason, message)) => {
                    tracing::warn!(namespace = %d.key.namespace, name = %d.key.name, reason, %message, "route sync: endpoint refused");
                    false
                }
            },
        };
        seen_eps.insert(d.key.clone(), (fp, taken));
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

#[cfg(test)]
mod handshake_tests {
    use super::*;
    use kube::runtime::watcher;

    fn sub(name: &str, provider: &str, routed: Option<(&str, &str)>) -> Arc<WebhookSubscription> {
        let mut s: WebhookSubscription = serde_json::from_value(serde_json::json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
            "metadata": {"name": name, "namespace": "a", "resourceVersion": "7"},
            "spec": {"provider": provider, "events": ["x"], "endpointRef": {"name": "orders"}}
        }))
        .unwrap();
        if let Some((status, reason)) = routed {
            s.status = Some(
                serde_json::from_value(serde_json::json!({"conditions": [{
                "type": "Routed", "status": status, "reason": reason, "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}))
                .unwrap(),
            );
        }
        Arc::new(s)
    }

    fn cache(present: &[&str]) -> SecretCache {
        let (meta, mut writer) = reflector::store::<PartialObjectMeta<Secret>>();
        for name in present {
            let m = PartialObjectMeta::<Secret> {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some("a".into()),
                    resource_version: Some("3".into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            writer.apply_watcher_event(&watcher::Event::Apply(m));
        }
        SecretCache {
            meta,
            data: HashMap::new(),
            ahead: HashMap::new(),
            client: None,
            require_label: false,
        }
    }

    fn names(set: HashSet<SecretKey>) -> Vec<String> {
        let mut v: Vec<String> = set.into_iter().map(|(_, n)| n).collect();
        v.sort();
        v
    }

    #[test]
    fn a_changed_subscription_gets_what_the_metadata_watch_lacks_and_all_while_the_leader_waits() {
        let (endpoints, _) = reflector::store::<WebhookEndpoint>();
        let secrets = cache(&["orders-ingress", "orders-signing", "s-provider-signing"]);
        let mut changed = Changed::default();
        changed.add(Change::Subscription(sub("s", "smallest", None)));
        changed.add(Change::Subscription(sub(
            "t",
            "smallest",
            Some(("True", reasons::ROUTES_LOADED)),
        )));
        assert_eq!(
            names(forced_secrets(&changed, &endpoints, &secrets)),
            vec!["t-provider-signing"],
            "only what the watch does not show yet"
        );
        let mut changed = Changed::default();
        changed.add(Change::Subscription(sub(
            "s",
            "smallest",
            Some(("False", reasons::ROUTES_PENDING)),
        )));
        assert_eq!(
            names(forced_secrets(&changed, &endpoints, &secrets)),
            vec!["orders-ingress", "orders-signing", "s-provider-signing"],
            "the leader waits: everything it routes with, read now"
        );
    }

    #[test]
    fn only_what_the_leader_registers_must_route() {
        assert!(!must_route(&sub("s", "smallest", None)));
        assert!(must_route(&sub(
            "s",
            "smallest",
            Some(("False", reasons::ROUTES_PENDING))
        )));
        assert!(must_route(&sub(
            "s",
            "atlas",
            Some(("True", reasons::ROUTES_LOADED))
        )));
        assert!(!must_route(&sub(
            "s",
            "atllas",
            Some(("True", reasons::ROUTES_LOADED))
        )));
    }
}
