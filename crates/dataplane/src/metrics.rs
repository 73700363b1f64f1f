//! The operator's Prometheus metrics, one registry (the data plane's, and the
//! controller's reconcile failures). Labels are low-cardinality: an
//! endpoint's namespace and name, a fixed reason, a queue state; never a token, URL or
//! event id. Hot paths hold cloned per-endpoint handles ([`EndpointMetrics`]) so that a
//! count is one atomic add, not a label lookup.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::queue::{CommitMetrics, EndpointKey, QueueDepth};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A subscription: its namespace and name (the endpoint it receives on is not needed,
/// names are unique in a namespace).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabels {
    pub namespace: String,
    pub subscription: String,
}

/// A failed reconcile: the object's kind and the stable reason
/// (`controller::Error::reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileFailureLabels {
    pub kind: String,
    pub reason: &'static str,
}

/// A fetch of a provider's current signing secret: the provider and what came of it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyFetchLabels {
    pub provider: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

type EpCounter = Family<EndpointLabels, Counter>;

fn latency_histogram() -> Histogram {
    // 5 ms .. ~82 s
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    received: EpCounter,
    rejected: Family<ReasonLabels, Counter>,
    signature_mismatches: Family<SubscriptionLabels, Counter>,
    key_fetches: Family<KeyFetchLabels, Counter>,
    queued: EpCounter,
    duplicates: EpCounter,
    filtered: EpCounter,
    filter_errors: EpCounter,
    dedupe_key_errors: EpCounter,
    malformed: EpCounter,
    delivered: EpCounter,
    failed: EpCounter,
    retries: EpCounter,
    dead_lettered: EpCounter,
    in_flight_limit: Family<EndpointLabels, Gauge>,
    queue_depth: Family<StateLabels, Gauge>,
    subscription_synced: Family<SubscriptionLabels, Gauge>,
    dedupe_keys: Gauge,
    dedupe_evicted: Gauge,
    requests_in_flight: Gauge,
    latency: Family<EndpointLabels, Histogram>,
    reconcile_failures: Family<ReconcileFailureLabels, Counter>,
    spans_exported: Counter,
    spans_dropped: Counter,
}

/// Counters of one endpoint, cheap to clone and to bump.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    pub received: Counter,
    pub queued: Counter,
    pub duplicates: Counter,
    pub filtered: Counter,
    /// Events whose `spec.filter` failed (kept as dead letters).
    pub filter_errors: Counter,
    /// Events whose `spec.dedupe` key failed (deduped on the provider's id instead).
    pub dedupe_key_errors: Counter,
    /// Batch elements that could not be read (stored as dead letters, not delivered).
    pub malformed: Counter,
    pub delivered: Counter,
    pub failed: Counter,
    pub retries: Counter,
    pub dead_lettered: Counter,
    /// The adaptive in-flight limit now (see `delivery::pace`).
    pub in_flight_limit: Gauge,
    /// Ingest to delivered, seconds.
    pub latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("webhook_operator");
        let m = Self {
            received: Family::default(),
            rejected: Family::default(),
            signature_mismatches: Family::default(),
            key_fetches: Family::default(),
            queued: Family::default(),
            duplicates: Family::default(),
            filtered: Family::default(),
            filter_errors: Family::default(),
            dedupe_key_errors: Family::default(),
            malformed: Family::default(),
            delivered: Family::default(),
            failed: Family::default(),
            retries: Family::default(),
            dead_lettered: Family::default(),
            in_flight_limit: Family::default(),
            queue_depth: Family::default(),
            subscription_synced: Family::default(),
            dedupe_keys: Gauge::default(),
            dedupe_evicted: Gauge::default(),
            requests_in_flight: Gauge::default(),
            latency: Family::new_with_constructor(latency_histogram),
            reconcile_failures: Family::default(),
            spans_exported: Counter::default(),
            spans_dropped: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "events_received",
            "Events accepted from providers (verified)",
            m.received.clone(),
        );
        r.register(
            "key_fetches",
            "Fetches of a provider's current signing secret after a signature failed to verify, by provider and result (fetched, unchanged, none, failed, timeout, limited)",
            m.key_fetches.clone(),
        );
        r.register(
            "requests_rejected",
            "Ingress requests refused, by reason",
            m.rejected.clone(),
        );
        r.register(
            "signature_mismatches",
            "Requests refused for a missing or wrong signature or header secret, by subscription",
            m.signature_mismatches.clone(),
        );
        r.register("events_queued", "Events stored durably", m.queued.clone());
        r.register(
            "events_duplicate",
            "Events dropped as duplicates at ingest",
            m.duplicates.clone(),
        );
        r.register(
            "events_filtered",
            "Events acknowledged and not delivered: not in eventTypes, or spec.filter false",
            m.filtered.clone(),
        );
        r.register(
            "filter_errors",
            "Events whose spec.filter failed to evaluate (kept as dead letters)",
            m.filter_errors.clone(),
        );
        r.register(
            "dedupe_key_errors",
            "Events whose spec.dedupe key failed to evaluate (deduped on the provider's id instead)",
            m.dedupe_key_errors.clone(),
        );
        r.register(
            "events_malformed",
            "Elements of a provider batch that could not be read, kept as dead letters",
            m.malformed.clone(),
        );
        r.register(
            "events_delivered",
            "Events delivered (2xx from the destination)",
            m.delivered.clone(),
        );
        r.register(
            "delivery_attempts_failed",
            "Failed delivery attempts",
            m.failed.clone(),
        );
        r.register(
            "delivery_retries_scheduled",
            "Retries scheduled after a failed attempt",
            m.retries.clone(),
        );
        r.register(
            "events_dead_lettered",
            "Events moved to the dead-letter store",
            m.dead_lettered.clone(),
        );
        r.register(
            "delivery_in_flight_limit",
            "Deliveries the endpoint may have in flight now: maxInFlight, or less while adaptive concurrency holds back",
            m.in_flight_limit.clone(),
        );
        r.register(
            "queue_depth",
            "Events in the queue, by state",
            m.queue_depth.clone(),
        );
        r.register(
            "subscription_synced",
            "1 while the subscription's Synced condition is True, else 0 (set where reconcilers run)",
            m.subscription_synced.clone(),
        );
        r.register(
            "dedupe_keys",
            "Dedupe keys the embedded queue remembers",
            m.dedupe_keys.clone(),
        );
        r.register(
            "dedupe_evicted_keys",
            "Dedupe keys forgotten before their window ended (--max-dedupe-keys), since start",
            m.dedupe_evicted.clone(),
        );
        r.register(
            "ingress_requests_in_flight",
            "Ingress requests being handled now (bounded by --max-concurrent-requests)",
            m.requests_in_flight.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Ingest to delivered latency",
            m.latency.clone(),
        );
        r.register(
            "reconcile_failures",
            "Failed reconciles, by object kind and reason",
            m.reconcile_failures.clone(),
        );
        r.register(
            "trace_spans_exported",
            "Spans accepted by the OTLP endpoint (--otlp-endpoint)",
            m.spans_exported.clone(),
        );
        r.register(
            "trace_spans_dropped",
            "Spans not exported: the export buffer was full or the OTLP endpoint failed",
            m.spans_dropped.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts spans the OTLP endpoint accepted.
    pub fn spans_exported(&self) -> Counter {
        self.spans_exported.clone()
    }

    /// Counts spans dropped on the way to the OTLP endpoint.
    pub fn spans_dropped(&self) -> Counter {
        self.spans_dropped.clone()
    }

    pub fn endpoint(&self, key: &EndpointKey) -> EndpointMetrics {
        let l = EndpointLabels {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        EndpointMetrics {
            received: self.received.get_or_create(&l).clone(),
            queued: self.queued.get_or_create(&l).clone(),
            duplicates: self.duplicates.get_or_create(&l).clone(),
            filtered: self.filtered.get_or_create(&l).clone(),
            filter_errors: self.filter_errors.get_or_create(&l).clone(),
            dedupe_key_errors: self.dedupe_key_errors.get_or_create(&l).clone(),
            malformed: self.malformed.get_or_create(&l).clone(),
            delivered: self.delivered.get_or_create(&l).clone(),
            failed: self.failed.get_or_create(&l).clone(),
            retries: self.retries.get_or_create(&l).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&l).clone(),
            in_flight_limit: self.in_flight_limit.get_or_create(&l).clone(),
            latency: self.latency.get_or_create(&l).clone(),
        }
    }

    /// Drops the series of a removed endpoint.
    pub fn remove_endpoint(&self, key: &EndpointKey) {
        let l = EndpointLabels {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        for f in [
            &self.received,
            &self.queued,
            &self.duplicates,
            &self.filtered,
            &self.filter_errors,
            &self.dedupe_key_errors,
            &self.malformed,
            &self.delivered,
            &self.failed,
            &self.retries,
            &self.dead_lettered,
        ] {
            f.remove(&l);
        }
        self.latency.remove(&l);
        self.in_flight_limit.remove(&l);
    }

    /// Ingress requests being handled now.
    pub fn requests_in_flight(&self) -> Gauge {
        self.requests_in_flight.clone()
    }

    /// `reason` must be a fixed string (see `inbound::Rejection::label`).
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// A fetch of `provider`'s current signing secret ended in `result` (a fixed string).
    pub fn key_fetch(&self, provider: &'static str, result: &'static str) {
        self.key_fetches
            .get_or_create(&KeyFetchLabels { provider, result })
            .inc();
    }

    /// Fetches of `provider`'s secret that ended in `result` so far.
    pub fn key_fetches(&self, provider: &'static str, result: &'static str) -> u64 {
        self.key_fetches
            .get(&KeyFetchLabels { provider, result })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// A delivery for `subscription` (receiving on `endpoint`) failed signature checks.
    pub fn signature_mismatch(&self, endpoint: &EndpointKey, subscription: &str) {
        self.signature_mismatches
            .get_or_create(&SubscriptionLabels {
                namespace: endpoint.namespace.clone(),
                subscription: subscription.to_string(),
            })
            .inc();
    }

    /// A reconcile of a `kind` object failed; `reason` must be a fixed string.
    pub fn reconcile_failed(&self, kind: String, reason: &'static str) {
        self.reconcile_failures
            .get_or_create(&ReconcileFailureLabels { kind, reason })
            .inc();
    }

    /// Whether `subscription`'s `Synced` condition is `True`; `None` drops the series.
    pub fn set_subscription_synced(
        &self,
        namespace: &str,
        subscription: &str,
        synced: Option<bool>,
    ) {
        let l = SubscriptionLabels {
            namespace: namespace.to_string(),
            subscription: subscription.to_string(),
        };
        match synced {
            Some(s) => {
                self.subscription_synced.get_or_create(&l).set(i64::from(s));
            }
            None => {
                self.subscription_synced.remove(&l);
            }
        }
    }

    pub fn set_dedupe(&self, keys: u64, evicted: u64) {
        self.dedupe_keys.set(keys as i64);
        self.dedupe_evicted.set(evicted as i64);
    }

    /// Exports the embedded queue's commit histograms (the queue observes them itself).
    pub fn register_queue_commits(&mut self, commits: CommitMetrics) {
        self.registry.register(
            "queue_commit_duration_seconds",
            "Time each group commit of the embedded queue took: applying its operations, writing and syncing the file",
            commits.duration,
        );
        self.registry.register(
            "queue_commit_operations",
            "Operations (enqueues, acks, retries, ...) each group commit of the embedded queue carried",
            commits.operations,
        );
    }

    pub fn set_queue_depth(&self, d: QueueDepth) {
        for (state, v) in [
            ("pending", d.pending),
            ("leased", d.leased),
            ("dead_lettered", d.dead_lettered),
        ] {
            self.queue_depth
                .get_or_create(&StateLabels { state })
                .set(v as i64);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_failures_are_counted_by_kind_and_reason() {
        let m = Metrics::new();
        m.reconcile_failed("WebhookSubscription".into(), "Unauthorized");
        m.reconcile_failed("WebhookSubscription".into(), "Unauthorized");
        m.reconcile_failed("WebhookEndpoint".into(), "cleanup_purge_events");
        let text = m.encode();
        assert!(
            text.contains(
                "webhook_operator_reconcile_failures_total{kind=\"WebhookSubscription\",reason=\"Unauthorized\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "webhook_operator_reconcile_failures_total{kind=\"WebhookEndpoint\",reason=\"cleanup_purge_events\"} 1"
            ),
            "{text}"
        );
    }
}
