//! Reconcilers for both kinds, and the wiring that runs them.
//!
//! `endpoint` and `subscription` hold the reconcilers; `conditions`, `status` and
//! `secrets` are the shared ways to build conditions, write status and touch Secrets;
//! `routes` is what the reconcilers tell the data plane.

/// The `reconcile` of a kind's module (which has `FINALIZER`, `apply` and `cleanup`): a
/// pass under the kind's finalizer, see [`finalized`].
macro_rules! reconcile_under_finalizer {
    ($kind:ty) => {
        pub async fn reconcile(obj: Arc<$kind>, ctx: Arc<Context>) -> Result<Action, Error> {
            use futures::FutureExt;
            super::finalized(
                obj,
                ctx,
                FINALIZER,
                |o, c, a| apply(o, c, a).boxed(),
                |o, c| cleanup(o, c).boxed(),
            )
            .await
        }
    };
}

pub mod backoff;
pub mod build;
pub mod conditions;
pub mod dataplane_routes;
pub mod endpoint;
pub mod event_recorder;
pub mod isolation;
pub mod key_fetch;
pub mod memo;
pub mod replicas;
pub mod rotation;
pub mod route_sync;
pub mod routes;
pub mod secrets;
pub mod signature_check;
pub mod status;
pub mod subscription;
pub mod test_event;
pub mod to_dataplane;
pub mod watches;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, finalizer, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::{WebhookEndpoint, WebhookSubscription};
use crate::config::OperatorConfig;
use crate::providers::{ProviderClients, ProviderError};
use routes::Routes;

/// What the passes use. The flags are read once, here: the passes see what they decide
/// with (where endpoints may deliver, the public base URL), the wiring what it starts
/// with ([`Watched`]).
pub struct Context {
    /// The API server: the passes' own objects (finalizer, status) and the watches.
    pub client: Client,
    pub providers: ProviderClients,
    pub recorder: event_recorder::EventRecorder,
    pub routes: Routes,
    /// Secret reads, validated against the shared Secret watch once [`run`] starts it.
    pub secrets: secrets::SecretStore,
    /// Where endpoints may deliver, for reconcile-time destination checks.
    pub destinations: isolation::Destinations,
    /// The public base of `status.ingressURL` (`--public-base-url`).
    pub public_base_url: Option<String>,
    /// What the passes of each kind remember between passes.
    pub memos: Memos,
    /// What the watches cover and the caches they fill.
    watched: Watched,
}

/// What the passes of each kind remember between passes.
#[derive(Default)]
pub struct Memos {
    /// Endpoint passes: the last replay handled, the status last written.
    pub endpoints: memo::EndpointMemo,
    /// Subscription passes: schedule, test events, the status last written.
    pub subscriptions: memo::SubscriptionMemo,
}

/// The namespace the watches cover, how many passes of a kind run at once, and the
/// caches of the controllers [`run`] started last (read by the passes), the replica
/// Leases among them.
struct Watched {
    /// `--namespace`: `None` watches all.
    namespace: Option<String>,
    max_concurrent_reconciles: u16,
    endpoints: Mutex<Option<watches::Cache<WebhookEndpoint>>>,
    subscriptions: Mutex<Option<watches::Cache<WebhookSubscription>>>,
    /// With leader election: where the replica Leases of the route handshake live.
    replica_config: Option<replicas::ReplicaConfig>,
    /// The replica Leases, as the controllers [`run`] started last watch them.
    replicas: Mutex<Option<Arc<replicas::Replicas>>>,
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        routes: Arc<dyn routes::IngressRoutes>,
    ) -> Self {
        Context {
            recorder: event_recorder::EventRecorder::new(
                client.clone(),
                "webhook-operator",
                std::env::var("POD_NAME").ok(),
            ),
            providers: ProviderClients::new(config.providers.endpoints()),
            destinations: isolation::Destinations {
                allow_cross_namespace_refs: config.allow_cross_namespace_refs,
                resolver: crate::delivery::Resolver::new(
                    &config.resolve_overrides,
                    config.address_policy(),
                ),
            },
            secrets: secrets::SecretStore::new(client.clone(), config.require_secret_label),
            client,
            routes: Routes(routes),
            public_base_url: config.public_base_url,
            memos: Memos::default(),
            watched: Watched {
                namespace: config.namespace,
                max_concurrent_reconciles: config.max_concurrent_reconciles,
                endpoints: Mutex::default(),
                subscriptions: Mutex::default(),
                replica_config: None,
                replicas: Mutex::default(),
            },
        }
    }

    /// Runs the route handshake with the other replicas (leader election on).
    pub fn with_replicas(mut self, config: replicas::ReplicaConfig) -> Self {
        self.watched.replica_config = Some(config);
        self
    }

    /// Where the replica Leases live; `None` with a single replica.
    pub fn replica_config(&self) -> Option<&replicas::ReplicaConfig> {
        self.watched.replica_config.as_ref()
    }

    /// The replica Leases the leader waits on; `None` with a single replica.
    pub fn replicas(&self) -> Option<Arc<replicas::Replicas>> {
        self.watched.replicas.lock().expect("replicas lock").clone()
    }

    /// A WebhookEndpoint as the controllers' cache holds it (no API request; the cache is
    /// updated before an endpoint change re-runs its subscribers), or from the API server
    /// while no controller runs.
    pub async fn endpoint(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<WebhookEndpoint>>, kube::Error> {
        // Until the first list is in, a GET answers.
        if let Some(found) = cached(&self.watched.endpoints, namespace, name) {
            return Ok(found);
        }
        let api: Api<WebhookEndpoint> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(Arc::new))
    }

    /// A WebhookSubscription as the controllers' cache holds it, or from the API server
    /// while no controller runs (a follower).
    pub async fn subscription(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<WebhookSubscription>>, kube::Error> {
        if let Some(found) = cached(&self.watched.subscriptions, namespace, name) {
            return Ok(found);
        }
        let api: Api<WebhookSubscription> = Api::namespaced(self.client.clone(), namespace);
        Ok(api.get_opt(name).await?.map(Arc::new))
    }
}

/// `namespace/name` as `cache` holds it: `None` while no controller runs or the cache's
/// first list is not in, `Some(None)` when it holds no such object.
fn cached<K>(
    cache: &Mutex<Option<watches::Cache<K>>>,
    namespace: &str,
    name: &str,
) -> Option<Option<Arc<K>>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    cache
        .lock()
        .expect("cache lock")
        .clone()?
        .get(namespace, name)
}

/// The newest version of `obj` that `cache` holds, if it holds one.
fn newest<K>(cache: &Mutex<Option<watches::Cache<K>>>, obj: &K) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    cached(cache, &obj.namespace()?, &obj.name_any()).flatten()
}

/// Reconcile errors. `reason()` is stable and low-cardinality.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    #[error("cannot remove the upstream subscription: {0}")]
    Cleanup(CleanupError),
    #[error("{0}")]
    SecretNotOwned(String),
}

impl From<secrets::OwnedSecretError> for Error {
    fn from(e: secrets::OwnedSecretError) -> Self {
        match e {
            secrets::OwnedSecretError::Kube(e) => Error::Kube(e),
            not_owned => Error::SecretNotOwned(not_owned.to_string()),
        }
    }
}

/// Why a deleted object's finalizer cannot be removed yet.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The upstream subscription cannot be deleted without its credentials.
    #[error(transparent)]
    Credentials(subscription::CredentialsError),
    /// The endpoint's waiting events and dead letters could not be deleted.
    #[error("deleting queued events: {0}")]
    PurgeEvents(anyhow::Error),
}

impl CleanupError {
    /// Stable and low-cardinality, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CleanupError::Credentials(_) => "cleanup_credentials",
            CleanupError::PurgeEvents(_) => "cleanup_purge_events",
        }
    }
}

impl Error {
    /// The failure's reason in the reconcile-failure metric: the step that failed, not the
    /// finalizer wrapper every pass runs in.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(e) => match &**e {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "finalizer",
            },
            Error::Provider(e) => e.reason(),
            Error::Cleanup(e) => e.reason(),
            Error::SecretNotOwned(_) => "secret_not_owned",
        }
    }
}

/// A pass of one object of a namespaced kind under the kind's finalizer: `apply` while it
/// exists, `cleanup` once it is being deleted (the finalizer goes when cleanup succeeds).
pub async fn finalized<K>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    finalizer_name: &str,
    apply: impl for<'a> Fn(&'a K, &'a Context, &'a Api<K>) -> BoxFuture<'a, Result<Action, Error>>,
    cleanup: impl for<'a> Fn(&'a K, &'a Context) -> BoxFuture<'a, Result<Action, Error>>,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    finalizer(&api, finalizer_name, obj, |event| async {
        match event {
            finalizer::Event::Apply(obj) => apply(&obj, &ctx, &api).await,
            finalizer::Event::Cleanup(obj) => cleanup(&obj, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Publishes a Kubernetes Event about `obj`; failures are logged, never fatal.
pub async fn publish<K>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `shutdown` is cancelled.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    // One watch per kind for everything below; every trigger subscribes before it starts.
    let mut watches = watches::Watches::new();
    let endpoint_changes = noted_changes(watches.endpoints.subscribe(), &ctx, note_endpoint);
    let subscription_changes =
        noted_changes(watches.subscriptions.subscribe(), &ctx, note_subscription);
    // The cache subscriptions read their endpoint from is the one the watch fills before
    // it triggers them, so a pass an endpoint change starts sees that change. Only what
    // a subscription reads of its endpoint triggers it: an endpoint's delivery figures
    // move every few seconds under load, and thousands of subscriptions may share it.
    let endpoints_for_subscriptions = changes(
        watches.endpoints.subscribe(),
        endpoint::what_subscribers_read,
    );
    let secrets_for_subscriptions = watches.secrets.subscribe();
    let secrets_for_endpoints = watches.secrets.subscribe();
    let generated_secrets = watches
        .secrets
        .subscribe()
        .filter(|s| std::future::ready(generated_by_us(s)));
    watches.start(&ctx, &shutdown);
    let watched = &ctx.watched;
    *watched.endpoints.lock().expect("endpoints lock") = Some(watches.endpoints.cache());
    *watched.subscriptions.lock().expect("subscriptions lock") =
        Some(watches.subscriptions.cache());
    ctx.secrets.watch(watches.secrets.cache());
    if let Some(config) = &watched.replica_config {
        let replicas = replicas::Replicas::start(ctx.client.clone(), config, &shutdown);
        *watched.replicas.lock().expect("replicas lock") = Some(Arc::new(replicas));
    }
    route_sync::prime(&ctx, &watches, &shutdown).await;
    let ep_store = watches.endpoints.store.clone();
    let sub_store = watches.subscriptions.store.clone();

    // Health and counter changes trigger a pass; the passes write status (batched).
    let (ep_tx, ep_rx) = futures::channel::mpsc::unbounded::<ObjectRef<WebhookEndpoint>>();
    let (sub_tx, sub_rx) = futures::channel::mpsc::unbounded::<ObjectRef<WebhookSubscription>>();

    // An endpoint re-checks when a Secret it generated or reads (signing secret, header
    // values) changes.
    let store = ep_store.clone();
    let limits = kube::runtime::controller::Config::default()
        .concurrency(ctx.watched.max_concurrent_reconciles);
    let endpoints = Controller::for_shared_stream(endpoint_changes, ep_store.clone())
        .with_config(limits.clone())
        .owns_shared_stream(generated_secrets)
        .watches_shared_stream(secrets_for_endpoints, move |secret| {
            readers_of(&store, &secret, endpoint::reads_secret)
        })
        .reconcile_on(ep_rx)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());

    // A subscription re-checks when its credentials Secret or its endpoint changes.
    let store = sub_store.clone();
    let subscriptions = Controller::for_shared_stream(subscription_changes, sub_store.clone())
        .with_config(limits)
        .watches_shared_stream(secrets_for_subscriptions, move |secret| {
            readers_of(&store, &secret, reads_credentials)
        });
    let store = sub_store.clone();
    let subscriptions = subscriptions
        .watches_shared_stream(endpoints_for_subscriptions, move |ep| {
            subscribers_of(&store, &ep)
        })
        .reconcile_on(sub_rx)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());

    let refresher = refresh_status(
        ctx.clone(),
        ep_store,
        sub_store,
        ep_tx,
        sub_tx,
        shutdown.clone(),
    );
    let endpoints = endpoints
        .run(endpoint::reconcile, error_policy, ctx.clone())
        .for_each(|r| async move { log_result(r) });
    let subscriptions = subscriptions
        .run(subscription::reconcile, error_policy, ctx.clone())
        .for_each(|r| async move { log_result(r) });
    tokio::join!(endpoints, subscriptions, refresher);
}

/// The objects of `store` in the Secret's namespace that `reads` it (by name).
fn readers_of<K>(
    store: &kube::runtime::reflector::Store<K>,
    secret: &PartialObjectMeta<Secret>,
    reads: impl Fn(&K, &str) -> bool,
) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (ns, name) = (secret.namespace(), secret.name_any());
    store
        .state()
        .into_iter()
        .filter(|o| o.namespace() == ns && reads(o, &name))
        .map(|o| ObjectRef::from_obj(&*o))
        .collect()
}

/// What the user changes (the spec, which moves the generation, and deletion), the
/// request annotations and the finalizers; never the controller's own status writes. A
/// status write that re-triggered its own pass would write again whenever delivery
/// numbers move, once per pass instead of once per refresh period ([`refresh_status`]
/// asks for those).
fn user_changes<K: Resource>(obj: &K) -> Option<u64> {
    use kube::runtime::{Predicate, predicates};
    predicates::generation
        .combine(predicates::annotations)
        .combine(predicates::finalizers)
        .hash_property(obj)
}

/// [`changes`] of `objects`, after every version the watch shows has reached the memo
/// through `note`, so that a kept copy of our own status write is dropped once the cache
/// holds it.
fn noted_changes<K>(
    objects: impl futures::Stream<Item = Arc<K>> + Send + 'static,
    ctx: &Arc<Context>,
    note: fn(&Context, &K),
) -> impl futures::Stream<Item = Arc<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let ctx = ctx.clone();
    changes(objects.inspect(move |obj| note(&ctx, obj)), user_changes)
}

/// Notes in the endpoint memo the version of `ep` the watch shows.
fn note_endpoint(ctx: &Context, ep: &WebhookEndpoint) {
    let version = ep.meta().resource_version.as_deref();
    let key = routes::key_of(ep);
    ctx.memos
        .endpoints
        .update_existing(&key, |m| m.status.observe(version));
}

/// Notes in the subscription memo the version of `sub` the watch shows.
fn note_subscription(ctx: &Context, sub: &WebhookSubscription) {
    let version = sub.meta().resource_version.as_deref();
    ctx.memos
        .subscriptions
        .update_existing(&ObjectRef::from_obj(sub), |m| m.status.observe(version));
}

/// A Secret the operator generated (and owns).
fn generated_by_us(secret: &PartialObjectMeta<Secret>) -> bool {
    secret
        .labels()
        .get("app.kubernetes.io/managed-by")
        .map(String::as_str)
        == Some("webhook-operator")
}

/// Whether `sub` reads its credentials from the Secret `name`.
fn reads_credentials(sub: &WebhookSubscription, name: &str) -> bool {
    sub.spec
        .credentials_ref
        .as_ref()
        .is_some_and(|c| c.name == name)
}

/// The subscriptions that deliver through `ep`.
fn subscribers_of(
    store: &kube::runtime::reflector::Store<WebhookSubscription>,
    ep: &WebhookEndpoint,
) -> Vec<ObjectRef<WebhookSubscription>> {
    let subs = store.state();
    endpoint::subscribers(&ep.namespace().unwrap_or_default(), &ep.name_any(), &subs)
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

/// A kind's objects as a trigger: only those whose `predicate` value moved.
fn changes<K>(
    objects: impl futures::Stream<Item = Arc<K>> + Send + 'static,
    predicate: fn(&K) -> Option<u64>,
) -> impl futures::Stream<Item = Arc<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    objects
        .map(|obj| Ok::<K, watcher::Error>((*obj).clone()))
        .predicate_filter(predicate, Default::default())
        .filter_map(|obj| std::future::ready(obj.ok().map(Arc::new)))
}

fn log_result<K: Resource, E: std::fmt::Display>(r: Result<(ObjectRef<K>, Action), E>) {
    match r {
        Ok((obj, _)) => {
            tracing::info!(namespace = obj.namespace.as_deref(), name = %obj.name, kind = %std::any::type_name::<K>().rsplit("::").next().unwrap_or_default(), "reconciled")
        }
        Err(e) => tracing::debug!(error = %e, "reconcile loop"),
    }
}

/// Every two seconds, asks for a status pass of each endpoint whose delivery numbers and
/// each subscription whose counters changed: at most one status write per object per
/// period, none when nothing changed.
async fn refresh_status(
    ctx: Arc<Context>,
    endpoints: kube::runtime::reflector::Store<WebhookEndpoint>,
    subscriptions: kube::runtime::reflector::Store<WebhookSubscription>,
    ep_tx: futures::channel::mpsc::UnboundedSender<ObjectRef<WebhookEndpoint>>,
    sub_tx: futures::channel::mpsc::UnboundedSender<ObjectRef<WebhookSubscription>>,
    shutdown: CancellationToken,
) {
    let mut last_health: HashMap<ObjectRef<WebhookEndpoint>, routes::EndpointHealthView> =
        HashMap::new();
    let mut last_counters: HashMap<ObjectRef<WebhookSubscription>, u64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for ep in endpoints.state() {
            let Some(health) = ctx.routes.0.endpoint_health(routes::key_of(&ep)) else {
                continue;
            };
            let r = ObjectRef::from_obj(&*ep);
            if last_health.get(&r) != Some(&health) {
                last_health.insert(r.clone(), health);
                let _ = ep_tx.unbounded_send(r);
            }
        }
        for sub in subscriptions.state() {
            let Some((received, _)) = ctx.routes.counters(&sub) else {
                continue;
            };
            let r = ObjectRef::from_obj(&*sub);
            if last_counters.get(&r) != Some(&received) {
                last_counters.insert(r.clone(), received);
                let _ = sub_tx.unbounded_send(r);
            }
        }
    }
}

fn error_policy<K: Resource<DynamicType = ()>>(
    _obj: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    tracing::warn!(error = %err, label = err.reason(), "reconcile failed");
    ctx.routes
        .0
        .reconcile_failed(K::kind(&()).into_owned(), err.reason());
    Action::requeue(Duration::from_secs(5) + Duration::from_millis(rand::random::<u64>() % 5000))
}

/// A [`Context`] that reaches no API server and no data plane, for testing the steps that
/// touch neither (cleanup's memory, pure decisions behind a `ctx`).
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use clap::Parser;
    use futures::future::BoxFuture;

    use super::Context;
    use super::routes::{
        EndpointDelivery, EndpointHealthView, EndpointKey, IngressRoutes, TestInjection,
    };
    use crate::config::OperatorConfig;
    use crate::inbound::VerificationKeys;

    struct NoDataPlane;

    impl TestInjection for NoDataPlane {
        fn inject(
            &self,
            _: String,
            _: String,
            _: http::HeaderMap,
            _: Vec<u8>,
        ) -> BoxFuture<'static, anyhow::Result<u16>> {
            Box::pin(async { anyhow::bail!("no ingress") })
        }
        fn last_test(&self, _: EndpointKey, _: String) -> Option<(SystemTime, Duration)> {
            None
        }
    }

    impl IngressRoutes for NoDataPlane {
        fn upsert_subscription(
            &self,
            _: EndpointKey,
            _: String,
            _: crate::api::Provider,
            _: VerificationKeys,
        ) {
        }
        fn remove_subscription(&self, _: EndpointKey, _: String) {}
        fn subscription_counters(
            &self,
            _: EndpointKey,
            _: String,
        ) -> Option<(u64, Option<SystemTime>)> {
            None
        }
        fn configure_endpoint(&self, _: &EndpointDelivery) -> Result<(), super::routes::Refusal> {
            Ok(())
        }
        fn remove_endpoint(&self, _: EndpointKey) {}
        fn endpoint_health(&self, _: EndpointKey) -> Option<EndpointHealthView> {
            None
        }
        fn mark_loaded(&self) {}
        fn purge_endpoint(&self, _: EndpointKey) -> BoxFuture<'static, anyhow::Result<u64>> {
            Box::pin(async { Ok(0) })
        }
        fn replay(
            &self,
            _: EndpointKey,
            _: crate::queue::ReplayFilter,
        ) -> BoxFuture<'static, anyhow::Result<u64>> {
            Box::pin(async { Ok(0) })
        }
    }

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        config: OperatorConfig,
    }

    /// A `kind` object `namespace/name` (uid `<name>-uid`) with `spec`, as the API server
    /// would hand it over.
    pub(crate) fn object<K: serde::de::DeserializeOwned>(
        kind: &str,
        namespace: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> K {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "uid": format!("{name}-uid")},
            "spec": spec,
        }))
        .expect("a valid object")
    }

    /// Needs a Tokio runtime (the client's buffer task); nothing listens on its address.
    pub(crate) fn offline_context() -> Context {
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("a URI"),
        ))
        .expect("a client");
        let config = Args::parse_from(["test"]).config;
        Context::new(client, config, Arc::new(NoDataPlane))
    }
}

#[cfg(test)]
mod tests {
    use super::subscription::{CredentialsError, TargetError};
    use super::*;

    #[test]
    fn failure_labels_name_the_step_not_the_finalizer_wrapper() {
        let wrapped = |e: Error| Error::Finalizer(Box::new(finalizer::Error::ApplyFailed(e)));
        let cases = [
            (
                wrapped(Error::Provider(ProviderError::Unauthorized("x".into()))),
                "Unauthorized",
            ),
            (
                Error::Finalizer(Box::new(finalizer::Error::CleanupFailed(Error::Cleanup(
                    CleanupError::Credentials(CredentialsError::NotSet),
                )))),
                "cleanup_credentials",
            ),
            (
                wrapped(Error::Cleanup(CleanupError::PurgeEvents(anyhow::anyhow!(
                    "store closed"
                )))),
                "cleanup_purge_events",
            ),
            (
                wrapped(Error::SecretNotOwned("s".into())),
                "secret_not_owned",
            ),
            (
                Error::Finalizer(Box::new(finalizer::Error::UnnamedObject)),
                "finalizer",
            ),
        ];
        for (err, label) in cases {
            assert_eq!(err.reason(), label, "{err}");
        }
    }

    #[test]
    fn step_errors_have_stable_reasons_and_keep_their_messages() {
        let target = |e: TargetError| (e.reason(), e.to_string());
        let credentials = |e: CredentialsError| (e.reason(), e.to_string());
        let missing_key = secrets::SecretError::MissingKey("c".into(), "k".into());
        let cases = [
            (
                target(TargetError::NoTarget),
                "no_target",
                "neither endpointRef nor url is set",
            ),
            (
                target(TargetError::EndpointMissing("ep".into())),
                "endpoint_missing",
                "WebhookEndpoint ep does not exist",
            ),
            (
                target(TargetError::IngressPathOnly("ep".into())),
                "ingress_path_only",
                "WebhookEndpoint ep has only an ingress path: configure the operator's public base URL",
            ),
            (
                target(TargetError::EndpointNotReady("ep".into())),
                "endpoint_not_ready",
                "WebhookEndpoint ep is not Ready yet",
            ),
            (
                credentials(CredentialsError::NotSet),
                "credentials_not_set",
                "credentialsRef is not set",
            ),
            (
                credentials(missing_key.into()),
                "secret_missing_key",
                "Secret c has no key k",
            ),
            (
                credentials(secrets::SecretError::NotFound("c".into()).into()),
                "secret_not_found",
                "Secret c not found",
            ),
        ];
        for ((reason, message), want_reason, want_message) in cases {
            assert_eq!(reason, want_reason);
            assert_eq!(message, want_message);
        }
    }
}
