//! The ingress route table: token → endpoint, subscription name → provider and keys.
//! Updated by the controller (through the facade) and read per request without any API
//! call. Readers take a read lock for one map lookup and leave with an `Arc`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use super::Bucket;
use super::key_fetch::FetchState;
use crate::config::{EndpointConfig, SubscriptionRoute};
use crate::metrics::{EndpointMetrics, Metrics};
use crate::queue::{EndpointKey, from_millis, to_millis};
use webhook_providers::Provider;
use webhook_providers::inbound::VerificationKeys;

/// Events received on one subscription (verified ones, whatever became of them), and
/// requests refused for a missing or wrong signature.
#[derive(Debug, Default)]
pub struct SubscriptionCounters {
    total: AtomicU64,
    /// Milliseconds since the epoch; 0: never.
    last_ms: AtomicU64,
    signature_failures: AtomicU64,
    last_signature_failure_ms: AtomicU64,
}

impl SubscriptionCounters {
    pub fn add(&self, n: u64, at: SystemTime) {
        self.total.fetch_add(n, Ordering::Relaxed);
        self.last_ms.fetch_max(to_millis(at), Ordering::Relaxed);
    }

    pub fn get(&self) -> (u64, Option<SystemTime>) {
        let last = self.last_ms.load(Ordering::Relaxed);
        (
            self.total.load(Ordering::Relaxed),
            (last > 0).then(|| from_millis(last)),
        )
    }

    pub fn signature_failure(&self, at: SystemTime) {
        self.signature_failures.fetch_add(1, Ordering::Relaxed);
        self.last_signature_failure_ms
            .fetch_max(to_millis(at), Ordering::Relaxed);
    }

    /// Requests refused for their signature: total and last time.
    pub fn signature_failures(&self) -> (u64, Option<SystemTime>) {
        let last = self.last_signature_failure_ms.load(Ordering::Relaxed);
        (
            self.signature_failures.load(Ordering::Relaxed),
            (last > 0).then(|| from_millis(last)),
        )
    }
}

pub struct SubscriptionEntry {
    pub provider: Provider,
    pub keys: VerificationKeys,
    pub counters: Arc<SubscriptionCounters>,
    /// Secrets fetched from the provider after a signature failed (see [`super::key_fetch`]).
    pub fetch: Arc<FetchState>,
}

/// One endpoint's subscriptions by name, shared by every version of the endpoint's route:
/// adding or removing a subscription changes this map only, so its cost does not grow
/// with the number of subscriptions the endpoint has.
pub type SubscriptionEntries = RwLock<foldhash::HashMap<String, Arc<SubscriptionEntry>>>;

/// Everything a request to one token needs.
pub struct EndpointRoute {
    pub key: EndpointKey,
    /// Empty: every type is delivered.
    pub event_types: HashSet<String>,
    subscriptions: Arc<SubscriptionEntries>,
    pub metrics: EndpointMetrics,
    /// The endpoint's own bound on waiting events, if it sets one.
    pub max_queued_events: Option<u64>,
    /// Keep the provider's headers with events (the endpoint has a `spec.filter`).
    pub keep_headers: bool,
    /// The endpoint's own bound on waiting bytes, if it sets one.
    pub max_queued_bytes: Option<u64>,
    /// The endpoint's ingress rate limit, if it sets one.
    pub rate_limit: Option<Arc<Bucket>>,
    /// `spec.dedupe`: the endpoint's own dedupe key, if it sets one.
    pub dedupe: Option<super::DedupeKey>,
}

impl EndpointRoute {
    /// The subscription a request names, if the endpoint has it.
    pub fn subscription(&self, name: &str) -> Option<Arc<SubscriptionEntry>> {
        self.subscriptions
            .read()
            .expect("routes lock")
            .get(name)
            .cloned()
    }
}

/// Token, event types, own bounds on waiting events and bytes, whether headers are kept,
/// the dedupe key.
type DesiredEndpoint = (
    String,
    Vec<String>,
    Option<u64>,
    Option<u64>,
    bool,
    Option<super::DedupeKey>,
);

#[derive(Default)]
struct Desired {
    endpoints: HashMap<EndpointKey, DesiredEndpoint>,
    subscriptions: HashMap<EndpointKey, Arc<SubscriptionEntries>>,
    /// Kept across route rebuilds so that a spec change elsewhere does not refill it.
    buckets: HashMap<EndpointKey, Arc<Bucket>>,
}

pub struct RouteTable {
    by_token: RwLock<foldhash::HashMap<String, Arc<EndpointRoute>>>,
    /// Set once the routes of every object that existed at start-up are in the table
    /// (see [`RouteTable::mark_loaded`]). Until then an unknown token may be one not
    /// loaded yet, so the ingress cannot answer 404 for it.
    loaded: AtomicBool,
    /// Source of the table, so an endpoint's change rebuilds that endpoint's route (its
    /// subscriptions are shared, not rebuilt). Writers only.
    desired: Mutex<Desired>,
    metrics: Arc<Metrics>,
}

impl RouteTable {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            by_token: RwLock::default(),
            loaded: AtomicBool::new(false),
            desired: Mutex::default(),
            metrics,
        }
    }

    pub fn lookup(&self, token: &str) -> Option<Arc<EndpointRoute>> {
        self.by_token
            .read()
            .expect("routes lock")
            .get(token)
            .cloned()
    }

    /// Every object that existed at start-up has its route: from now on an unknown token
    /// or subscription really is unknown.
    pub fn mark_loaded(&self) {
        if !self.loaded.swap(true, Ordering::Release) {
            tracing::info!("ingress routes loaded");
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Whether `token` is free for `key`.
    pub fn token_available(&self, key: &EndpointKey, token: &str) -> bool {
        let d = self.desired.lock().expect("routes lock");
        !d.endpoints
            .iter()
            .any(|(k, (t, ..))| t == token && k != key)
    }

    pub fn upsert_endpoint(&self, ep: &EndpointConfig) {
        let mut d = self.desired.lock().expect("routes lock");
        d.endpoints.insert(
            ep.key.clone(),
            (
                ep.token.clone(),
                ep.event_types.clone(),
                ep.max_queued_events,
                ep.max_queued_bytes,
                ep.filter.is_some(),
                ep.dedupe.clone(),
            ),
        );
        match ep.ingress_rate_limit {
            Some(l) if d.buckets.get(&ep.key).is_some_and(|b| b.limit() == l) => {}
            Some(l) => {
                d.buckets.insert(ep.key.clone(), Arc::new(Bucket::new(l)));
            }
            None => {
                d.buckets.remove(&ep.key);
            }
        }
        self.rebuild(&mut d, &ep.key);
    }

    pub fn remove_endpoint(&self, key: &EndpointKey) {
        let mut d = self.desired.lock().expect("routes lock");
        d.buckets.remove(key);
        if let Some((token, ..)) = d.endpoints.remove(key) {
            self.by_token.write().expect("routes lock").remove(&token);
        }
    }

    /// Adds or replaces one subscription; its counters and the secrets fetched for it
    /// carry over a replacement.
    pub fn upsert_subscription(&self, sub: &SubscriptionRoute) {
        let entries = self.entries(&sub.endpoint);
        let mut entries = entries.write().expect("routes lock");
        let (counters, fetch) = entries
            .get(&sub.name)
            .map(|e| (e.counters.clone(), e.fetch.clone()))
            .unwrap_or_default();
        entries.insert(
            sub.name.clone(),
            Arc::new(SubscriptionEntry {
                provider: sub.provider,
                keys: sub.keys.clone(),
                counters,
                fetch,
            }),
        );
    }

    /// Removes one subscription, and its counters with it.
    pub fn remove_subscription(&self, endpoint: &EndpointKey, name: &str) {
        self.entries(endpoint)
            .write()
            .expect("routes lock")
            .remove(name);
    }

    pub fn counters(
        &self,
        endpoint: &EndpointKey,
        name: &str,
    ) -> Option<Arc<SubscriptionCounters>> {
        // A lookup only: an endpoint nobody configured gets no map.
        let entries = self
            .desired
            .lock()
            .expect("routes lock")
            .subscriptions
            .get(endpoint)?
            .clone();
        let entries = entries.read().expect("routes lock");
        entries.get(name).map(|e| e.counters.clone())
    }

    /// The endpoint's subscriptions, the same map its route (now or later) reads.
    fn entries(&self, endpoint: &EndpointKey) -> Arc<SubscriptionEntries> {
        let mut d = self.desired.lock().expect("routes lock");
        d.subscriptions.entry(endpoint.clone()).or_default().clone()
    }

    fn rebuild(&self, d: &mut Desired, key: &EndpointKey) {
        let Some((token, types, max_queued_events, max_queued_bytes, keep_headers, dedupe)) =
            d.endpoints.get(key).cloned()
        else {
            return;
        };
        let subscriptions = d.subscriptions.entry(key.clone()).or_default().clone();
        let route = Arc::new(EndpointRoute {
            key: key.clone(),
            event_types: types.into_iter().collect(),
            subscriptions,
            metrics: self.metrics.endpoint(key),
            max_queued_events,
            keep_headers,
            max_queued_bytes,
            rate_limit: d.buckets.get(key).cloned(),
            dedupe,
        });
        let mut table = self.by_token.write().expect("routes lock");
        // A token change leaves the old one unroutable.
        table.retain(|t, r| r.key != *key || *t == token);
        table.insert(token, route);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{Destination, Policy};

    fn endpoint(token: &str) -> EndpointConfig {
        EndpointConfig {
            key: EndpointKey::new("apps", "orders"),
            token: token.into(),
            destination: Destination::Service {
                name: "sink".into(),
                namespace: "apps".into(),
                port: 8080,
                path: "/".into(),
            },
            policy: Policy::default(),
            signing_secrets: vec![],
            headers: vec![],
            event_types: vec![],
            max_queued_events: None,
            max_queued_bytes: None,
            ingress_rate_limit: None,
            format: Default::default(),
            filter: None,
            dedupe: None,
            tls: None,
        }
    }

    fn subscription(name: &str, provider: Provider) -> SubscriptionRoute {
        SubscriptionRoute {
            endpoint: EndpointKey::new("apps", "orders"),
            name: name.into(),
            provider,
            keys: VerificationKeys::default(),
        }
    }

    fn provider_of(table: &RouteTable, token: &str, name: &str) -> Option<Provider> {
        table
            .lookup(token)
            .and_then(|route| route.subscription(name))
            .map(|s| s.provider)
    }

    #[test]
    fn subscriptions_added_before_or_after_the_endpoint_are_routed_through_its_token_changes() {
        let table = RouteTable::new(Arc::new(Metrics::new()));
        let key = EndpointKey::new("apps", "orders");
        table.upsert_subscription(&subscription("early", Provider::Atlas));
        table.upsert_endpoint(&endpoint("t1"));
        // A route handed out before a subscription was added sees it too.
        let held = table.lookup("t1").expect("routed");
        table.upsert_subscription(&subscription("late", Provider::Atomic));
        assert_eq!(provider_of(&table, "t1", "early"), Some(Provider::Atlas));
        assert_eq!(
            held.subscription("late").map(|s| s.provider),
            Some(Provider::Atomic)
        );

        table.upsert_endpoint(&endpoint("t2"));
        assert!(table.lookup("t1").is_none(), "the old token is unroutable");
        assert_eq!(provider_of(&table, "t2", "late"), Some(Provider::Atomic));

        table.remove_subscription(&key, "early");
        assert_eq!(provider_of(&table, "t2", "early"), None);
        assert!(table.counters(&key, "early").is_none());
    }

    #[test]
    fn counters_survive_a_subscriptions_replacement_and_go_with_its_removal() {
        let table = RouteTable::new(Arc::new(Metrics::new()));
        let key = EndpointKey::new("apps", "orders");
        table.upsert_endpoint(&endpoint("t1"));
        table.upsert_subscription(&subscription("calls", Provider::Atlas));
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        table.counters(&key, "calls").expect("counters").add(3, at);

        table.upsert_subscription(&subscription("calls", Provider::Smallest));
        assert_eq!(provider_of(&table, "t1", "calls"), Some(Provider::Smallest));
        assert_eq!(table.counters(&key, "calls").map(|c| c.get().0), Some(3));

        table.remove_subscription(&key, "calls");
        table.upsert_subscription(&subscription("calls", Provider::Atlas));
        assert_eq!(table.counters(&key, "calls").map(|c| c.get().0), Some(0));
    }

    #[test]
    fn fetched_secrets_survive_a_subscriptions_replacement() {
        let table = RouteTable::new(Arc::new(Metrics::new()));
        table.upsert_endpoint(&endpoint("t1"));
        table.upsert_subscription(&subscription("calls", Provider::Smallest));
        let before = table.lookup("t1").unwrap().subscription("calls").unwrap();
        table.upsert_subscription(&subscription("calls", Provider::Smallest));
        let after = table.lookup("t1").unwrap().subscription("calls").unwrap();
        assert!(Arc::ptr_eq(&before.fetch, &after.fetch));
    }
}
