//! The delivery supervisor: keeps one worker per configured endpoint, hands workers their
//! configuration changes, owns the HTTP client and the endpoints' breakers, and prunes
//! dead letters past their retention.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::client::{DeliveryClient, client_tls_config};
use super::worker::{self, EndpointRuntime, Shared};
use super::{Breaker, Resolver};
use crate::config::DestinationTls;
use crate::health::HealthRegistry;
use crate::queue::{EndpointKey, Queue};

type ConfigTx = watch::Sender<Option<Arc<EndpointRuntime>>>;

pub(crate) struct Dispatcher {
    shared: Arc<Shared>,
    endpoints: Mutex<HashMap<EndpointKey, ConfigTx>>,
    /// Per endpoint and destination origin: one endpoint's failures never stop another's
    /// deliveries, even behind the same gateway; a new destination starts closed.
    breakers: Mutex<HashMap<EndpointKey, (String, Arc<Breaker>)>>,
    /// The clients of endpoints with their own TLS settings, by the settings they use.
    tls_clients: Mutex<HashMap<EndpointKey, (DestinationTls, DeliveryClient)>>,
    proxy_from_env: bool,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    changed: Notify,
    maintenance_interval: Duration,
}

pub(crate) struct DispatcherSettings {
    pub resolver: Resolver,
    /// Use `HTTP(S)_PROXY` from the environment. Off by default: a proxy connects for us,
    /// past the address policy.
    pub proxy_from_env: bool,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
    pub maintenance_interval: Duration,
    pub shutdown_grace: Duration,
    pub tracer: crate::spans::Tracer,
}

impl Dispatcher {
    pub fn new(
        queue: Arc<dyn Queue>,
        health: Arc<HealthRegistry>,
        s: DispatcherSettings,
    ) -> anyhow::Result<Self> {
        let client = DeliveryClient::new(
            s.resolver.policy(),
            s.resolver.https_overrides(),
            s.proxy_from_env
                .then(hyper_util::client::proxy::matcher::Matcher::from_env),
            None,
        )?;
        Ok(Self {
            shared: Arc::new(Shared {
                queue,
                health,
                client,
                resolver: s.resolver,
                shutdown_grace: s.shutdown_grace,
                tracer: s.tracer,
            }),
            endpoints: Mutex::default(),
            breakers: Mutex::default(),
            tls_clients: Mutex::default(),
            proxy_from_env: s.proxy_from_env,
            breaker_threshold: s.breaker_threshold,
            breaker_cooldown: s.breaker_cooldown,
            changed: Notify::new(),
            maintenance_interval: s.maintenance_interval,
        })
    }

    /// The breaker of `endpoint` while it sends to `origin` (scheme, host and port): kept
    /// across configuration changes that keep the origin, new when the origin changes.
    pub fn breaker(&self, endpoint: &EndpointKey, origin: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().expect("breakers lock");
        match breakers.get(endpoint) {
            Some((o, b)) if o == origin => b.clone(),
            _ => {
                let b = Arc::new(Breaker::new(self.breaker_threshold, self.breaker_cooldown));
                breakers.insert(endpoint.clone(), (origin.to_owned(), b.clone()));
                b
            }
        }
    }

    /// The client of `endpoint` with its own TLS settings: kept (with its pooled
    /// connections) while they stay the same, new when they change (a Secret rotated).
    /// The error names what is wrong with the settings, never the material.
    pub fn tls_client(
        &self,
        endpoint: &EndpointKey,
        tls: &DestinationTls,
    ) -> Result<DeliveryClient, String> {
        let mut clients = self.tls_clients.lock().expect("tls clients lock");
        if let Some((used, client)) = clients.get(endpoint)
            && used == tls
        {
            return Ok(client.clone());
        }
        let client = DeliveryClient::new(
            self.shared.resolver.policy(),
            self.shared.resolver.https_overrides(),
            self.proxy_from_env
                .then(hyper_util::client::proxy::matcher::Matcher::from_env),
            Some(client_tls_config(tls)?),
        )
        .map_err(|e| e.to_string())?;
        clients.insert(endpoint.clone(), (tls.clone(), client.clone()));
        Ok(client)
    }

    /// Forgets the TLS client of an endpoint that no longer has TLS settings.
    pub fn drop_tls_client(&self, endpoint: &EndpointKey) {
        self.tls_clients
            .lock()
            .expect("tls clients lock")
            .remove(endpoint);
    }

    pub fn upsert(&self, rt: EndpointRuntime) {
        let key = rt.key.clone();
        let rt = Arc::new(rt);
        let mut map = self.endpoints.lock().expect("endpoints lock");
        match map.get(&key) {
            Some(tx) => {
                tx.send_replace(Some(rt));
            }
            None => {
                map.insert(key, watch::channel(Some(rt)).0);
                self.changed.notify_one();
            }
        }
    }

    pub fn remove(&self, key: &EndpointKey) {
        self.breakers.lock().expect("breakers lock").remove(key);
        self.drop_tls_client(key);
        if let Some(tx) = self.endpoints.lock().expect("endpoints lock").remove(key) {
            tx.send_replace(None);
        }
    }

    fn retention(&self, key: &EndpointKey) -> Option<Duration> {
        let map = self.endpoints.lock().expect("endpoints lock");
        let rt = map.get(key)?.borrow().clone()?;
        Some(rt.policy.dead_letter_retention)
    }

    /// Runs until `shutdown` resolves, then waits for the workers to finish.
    pub fn start(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut workers: HashMap<EndpointKey, JoinHandle<()>> = HashMap::new();
            let mut maintenance = tokio::time::interval(this.maintenance_interval);
            tokio::pin!(shutdown);
            loop {
                {
                    let map = this.endpoints.lock().expect("endpoints lock");
                    workers.retain(|_, h| !h.is_finished());
                    for (key, tx) in map.iter() {
                        if !workers.contains_key(key) {
                            let h = tokio::spawn(worker::run(
                                this.shared.clone(),
                                key.clone(),
                                tx.subscribe(),
                                stop_rx.clone(),
                            ));
                            workers.insert(key.clone(), h);
                        }
                    }
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = this.changed.notified() => {}
                    // Also notices workers that ended after a remove followed by a re-add.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = maintenance.tick() => this.prune_dead_letters().await,
                }
            }
            let _ = stop_tx.send(true);
            for (_, h) in workers {
                let _ = h.await;
            }
            this.shared.queue.return_prefetched().await;
            // The spans of the last attempts, before the process ends.
            let _ =
                tokio::time::timeout(this.shared.shutdown_grace, this.shared.tracer.flush()).await;
        })
    }

    async fn prune_dead_letters(&self) {
        for key in self.shared.queue.endpoints() {
            let Some(retention) = self.retention(&key) else {
                continue; // unknown endpoint: keep its dead letters until it is configured
            };
            let before = SystemTime::now() - retention;
            match self.shared.queue.prune_dead_letters(&key, before).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(endpoint = %key, pruned = n, "dead letters past retention pruned")
                }
                Err(e) => tracing::warn!(endpoint = %key, error = %e, "dead-letter pruning failed"),
            }
        }
    }
}
