//! The data plane facade: the one type the controller and `main` use. It opens the queue,
//! builds the ingress and ops routers, runs delivery, and takes endpoint and subscription
//! configuration from the controller (in memory; the hot paths never call the API server).
//!
//! ```text
//! controller ──upsert/remove──▶ DataPlane ──▶ RouteTable (ingress) + Dispatcher (delivery)
//! controller ◀──endpoint_health / subscription_counters── HealthRegistry, RouteTable
//! ```

pub mod config;
pub mod delivery;
pub mod health;
pub mod ingress;
pub mod metrics;
mod ops;
pub mod queue;
pub mod server;
pub mod spans;
pub mod trace_context;

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use tokio::task::JoinHandle;

pub use config::{
    DataPlaneConfig, DestinationTls, EndpointConfig, EndpointConfigError, RateLimit,
    SubscriptionRoute,
};

pub use crate::health::EndpointHealth;
pub use crate::queue::{EndpointKey, ReplayFilter};

use crate::delivery::{Dispatcher, DispatcherSettings, EndpointRuntime, Resolver};
use crate::health::HealthRegistry;
use crate::ingress::{ConcurrencyLimit, DiskSpace, Ingress, Limits, RouteTable};
use crate::metrics::Metrics;
use crate::queue::{Queue, RedbQueue, RedbQueueOptions};
use webhook_providers::inbound::InboundParser;

/// Header names a configured header may not take: the signature headers and those the
/// HTTP client owns.
const RESERVED_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "content-type",
    "connection",
    "transfer-encoding",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "upgrade",
];

pub struct DataPlane {
    queue: Arc<dyn Queue>,
    routes: Arc<RouteTable>,
    ingress: Arc<Ingress>,
    dispatcher: Arc<Dispatcher>,
    health: Arc<HealthRegistry>,
    metrics: Arc<Metrics>,
}

impl DataPlane {
    /// Opens the redb queue at `config.queue_path` (creating it) and wires everything.
    /// `parser` verifies and normalises provider requests (the providers' parser).
    pub async fn open(
        config: DataPlaneConfig,
        parser: Arc<dyn InboundParser>,
    ) -> anyhow::Result<Arc<Self>> {
        let path = config.queue_path.clone();
        let options = RedbQueueOptions {
            dedupe_window: config.dedupe_window,
            max_dedupe_keys: config.max_dedupe_keys,
            ..Default::default()
        };
        // Opening scans the file: keep it off the async workers.
        let queue = tokio::task::spawn_blocking(move || RedbQueue::open(&path, options))
            .await?
            .with_context(|| format!("opening the queue at {}", config.queue_path.display()))?;
        let disk = (config.min_free_disk_bytes > 0).then(|| {
            let dir = config
                .queue_path
                .parent()
                .unwrap_or(std::path::Path::new("."));
            DiskSpace::new(dir, config.min_free_disk_bytes)
        });
        Self::build(config, parser, Arc::new(queue), disk)
    }

    /// Wires the data plane on a queue of the caller's choice (JetStream, or a test's).
    /// No disk watermark: the queue's storage is not on this pod.
    pub fn with_queue(
        config: DataPlaneConfig,
        parser: Arc<dyn InboundParser>,
        queue: Arc<dyn Queue>,
    ) -> anyhow::Result<Arc<Self>> {
        Self::build(config, parser, queue, None)
    }

    fn build(
        config: DataPlaneConfig,
        parser: Arc<dyn InboundParser>,
        queue: Arc<dyn Queue>,
        disk: Option<DiskSpace>,
    ) -> anyhow::Result<Arc<Self>> {
        let mut metrics = Metrics::new();
        if let Some(commits) = queue.commit_metrics() {
            metrics.register_queue_commits(commits);
        }
        let metrics = Arc::new(metrics);
        let tracer = match &config.otlp_endpoint {
            Some(endpoint) => crate::spans::Tracer::otlp(endpoint, &metrics)?,
            None => crate::spans::Tracer::disabled(),
        };
        let health = Arc::new(HealthRegistry::new(config.health.clone()));
        let routes = Arc::new(RouteTable::new(metrics.clone()));
        let ingress = Arc::new(Ingress {
            routes: routes.clone(),
            parser,
            queue: queue.clone(),
            metrics: metrics.clone(),
            max_body_bytes: config.max_body_bytes,
            limits: Limits {
                max_queued_events: config.max_queued_events,
                max_endpoint_queued_events: config.max_endpoint_queued_events,
                max_queued_bytes: config.max_queued_bytes,
                max_endpoint_queued_bytes: config.max_endpoint_queued_bytes,
                disk,
                retry_after: config.retry_after,
            },
            health: health.clone(),
            concurrency: ConcurrencyLimit::new(
                config.max_concurrent_requests,
                metrics.clone(),
                config.retry_after,
            ),
            body_read_timeout: config.body_read_timeout,
            tracer: tracer.clone(),
            key_fetch: Default::default(),
        });
        let dispatcher = Arc::new(Dispatcher::new(
            queue.clone(),
            health.clone(),
            DispatcherSettings {
                resolver: Resolver::new(&config.resolve_overrides, config.address_policy),
                proxy_from_env: config.proxy_from_env,
                breaker_threshold: config.breaker_failure_threshold,
                breaker_cooldown: config.breaker_cooldown,
                maintenance_interval: config.maintenance_interval,
                shutdown_grace: config.shutdown_grace,
                tracer,
            },
        )?);
        Ok(Arc::new(Self {
            queue,
            routes,
            ingress,
            dispatcher,
            health,
            metrics,
        }))
    }

    /// `/hooks/{token}/{subscription}` (each provider's parser decides which methods it takes).
    pub fn ingress_router(&self) -> axum::Router {
        self.ingress.clone().router()
    }

    /// `/metrics`, `/healthz`, `/readyz` (ready: the routes are loaded and the queue
    /// commits a write).
    pub fn ops_router(&self) -> axum::Router {
        ops::router(
            self.queue.clone(),
            self.routes.clone(),
            self.metrics.clone(),
        )
    }

    /// Where the ingress fetches a provider's current signing secret when a request's
    /// signature does not verify against the route's keys (see
    /// [`ingress::key_fetch`]); without one, such a request is refused at once.
    pub fn set_key_source(&self, source: Arc<dyn ingress::key_fetch::KeySource>) {
        self.ingress.key_fetch.set_source(source);
    }

    /// The routes of every object that existed at start-up are configured: the ingress
    /// may now answer 404 for an unknown route, and `/readyz` may pass.
    pub fn mark_routes_loaded(&self) {
        self.routes.mark_loaded();
    }

    /// Starts delivery; it stops when `shutdown` resolves (for example
    /// `token.cancelled_owned()` or a signal future) and the handle ends once attempts under
    /// way have finished or the grace period passed.
    pub fn start_delivery(
        &self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        self.dispatcher.start(shutdown)
    }

    /// Adds or replaces an endpoint: its ingress token and event filter, and its delivery.
    /// Events queued before it was configured are delivered from now on.
    pub fn upsert_endpoint(&self, ep: EndpointConfig) -> Result<(), EndpointConfigError> {
        let token_ok = !ep.token.is_empty()
            && ep
                .token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token_ok {
            return Err(EndpointConfigError::InvalidToken);
        }
        if !self.routes.token_available(&ep.key, &ep.token) {
            return Err(EndpointConfigError::TokenInUse);
        }
        if ep.signing_secrets.is_empty() {
            return Err(EndpointConfigError::NoSigningSecret);
        }
        let mut headers = http::HeaderMap::new();
        for (name, value) in &ep.headers {
            let n = http::HeaderName::try_from(name.as_str())
                .ok()
                .filter(|n| !RESERVED_HEADERS.contains(&n.as_str()))
                .ok_or_else(|| EndpointConfigError::InvalidHeaderName(name.clone()))?;
            let mut v = http::HeaderValue::try_from(value.as_str())
                .map_err(|_| EndpointConfigError::InvalidHeaderValue(name.clone()))?;
            v.set_sensitive(true);
            headers.append(n, v);
        }
        let client = match &ep.tls {
            Some(tls) => Some(
                self.dispatcher
                    .tls_client(&ep.key, tls)
                    .map_err(EndpointConfigError::InvalidTls)?,
            ),
            None => {
                self.dispatcher.drop_tls_client(&ep.key);
                None
            }
        };
        let url = ep.destination.url();
        let origin = url
            .as_ref()
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default();
        self.routes.upsert_endpoint(&ep);
        self.dispatcher.upsert(EndpointRuntime {
            key: ep.key.clone(),
            url,
            breaker: self.dispatcher.breaker(&ep.key, &origin),
            policy: ep.policy,
            secrets: ep.signing_secrets,
            format: ep.format,
            filter: ep.filter,
            headers,
            metrics: self.metrics.endpoint(&ep.key),
            client,
        });
        Ok(())
    }

    /// Stops receiving and delivering for the endpoint. Its queued events and dead letters
    /// stay (parked) until it is configured again or [`DataPlane::purge_endpoint`] deletes
    /// them.
    pub fn remove_endpoint(&self, key: &EndpointKey) {
        self.routes.remove_endpoint(key);
        self.dispatcher.remove(key);
        self.health.remove(key);
        self.metrics.remove_endpoint(key);
    }

    pub fn upsert_subscription(&self, sub: SubscriptionRoute) {
        self.routes.upsert_subscription(&sub);
    }

    pub fn remove_subscription(&self, endpoint: &EndpointKey, name: &str) {
        self.routes.remove_subscription(endpoint, name);
        self.metrics
            .set_subscription_synced(&endpoint.namespace, name, None);
    }

    /// Exports whether the subscription is in sync with its provider (for alerts).
    pub fn set_subscription_synced(&self, endpoint: &EndpointKey, name: &str, synced: bool) {
        self.metrics
            .set_subscription_synced(&endpoint.namespace, name, Some(synced));
    }

    /// Delivery stats, the `Healthy` verdict and any destination error; `None` until the
    /// endpoint has had a delivery outcome or a destination check.
    pub fn endpoint_health(&self, key: &EndpointKey) -> Option<EndpointHealth> {
        self.health.snapshot(key)
    }

    /// Cheap change indicator for batched status writes: equal to the last snapshot's
    /// `generation` means nothing changed.
    pub fn endpoint_health_generation(&self, key: &EndpointKey) -> Option<u64> {
        self.health.generation(key)
    }

    /// Verified events received on a subscription: total and last time.
    pub fn subscription_counters(
        &self,
        endpoint: &EndpointKey,
        name: &str,
    ) -> Option<(u64, Option<SystemTime>)> {
        self.routes.counters(endpoint, name).map(|c| c.get())
    }

    /// Requests refused for their signature on a subscription: total and last time.
    pub fn subscription_signature_failures(
        &self,
        endpoint: &EndpointKey,
        name: &str,
    ) -> Option<(u64, Option<SystemTime>)> {
        self.routes
            .counters(endpoint, name)
            .map(|c| c.signature_failures())
    }

    /// Sends matching dead letters of the endpoint back for delivery; returns how many.
    /// Runs a request through the ingress in-process, exactly as if it had arrived on
    /// `/hooks/{token}/{subscription}` (verification, filter, durable enqueue); returns the
    /// status the ingress answered.
    pub async fn inject(
        &self,
        token: &str,
        subscription: &str,
        headers: http::HeaderMap,
        body: Vec<u8>,
    ) -> anyhow::Result<http::StatusCode> {
        use tower::ServiceExt;
        let mut request = http::Request::post(format!("/hooks/{token}/{subscription}"))
            .body(axum::body::Body::from(body))?;
        *request.headers_mut() = headers;
        let response = self.ingress_router().oneshot(request).await?;
        Ok(response.status())
    }

    /// When a test event of the subscription was last dead-lettered, and why.
    pub fn last_test_failure(
        &self,
        endpoint: &EndpointKey,
        subscription: &str,
    ) -> Option<(SystemTime, String)> {
        self.health.last_test_failure(endpoint, subscription)
    }

    /// When a test event of the subscription was last delivered, and its latency.
    pub fn last_test(
        &self,
        endpoint: &EndpointKey,
        subscription: &str,
    ) -> Option<(SystemTime, std::time::Duration)> {
        self.health.last_test(endpoint, subscription)
    }

    /// Deletes the endpoint's waiting events and dead letters (its WebhookEndpoint is gone).
    pub async fn purge_endpoint(&self, key: &EndpointKey) -> anyhow::Result<u64> {
        Ok(self.queue.purge(key).await?)
    }

    pub async fn replay(&self, key: &EndpointKey, filter: ReplayFilter) -> anyhow::Result<u64> {
        Ok(self.queue.replay(key, filter, SystemTime::now()).await?)
    }

    /// The delivery health registry, to merge other replicas' outcomes into
    /// (`health::cluster`).
    pub fn health_registry(&self) -> Arc<HealthRegistry> {
        self.health.clone()
    }

    /// The data plane's metrics (the listeners count their refusals in them).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Queue counts of one endpoint (pending, leased, dead-lettered).
    pub fn queue_depth(&self, key: &EndpointKey) -> crate::queue::QueueDepth {
        self.queue.endpoint_depth(key)
    }
}
