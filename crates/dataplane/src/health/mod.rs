//! Delivery health per endpoint: counters, a sliding failure window, latency percentiles
//! and the `Healthy` verdict, fed by delivery outcomes and read by the controller.
//!
//! Recording is cheap (one short per-endpoint lock); snapshots compute percentiles and the
//! verdict. A generation number per endpoint tells the controller whether anything changed
//! since the status it last wrote, so unchanged endpoints cost no API write.

pub mod cluster;
mod verdict;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use verdict::{HealthThresholds, TLS_FAILURE, Verdict, VerdictInput, reasons, verdict};

use crate::queue::EndpointKey;

/// Why events of an endpoint cannot leave. The controller turns it into a condition
/// (`reason()` is a condition reason); the events stay parked until it is fixed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// Resolves to an address the delivery's address policy refuses.
    #[error("destination resolves to a forbidden address ({0})")]
    Forbidden(&'static str),
    /// The URL is malformed or the host does not resolve.
    #[error("destination unresolvable: {0}")]
    Unresolvable(&'static str),
}

impl DestinationError {
    pub fn reason(&self) -> &'static str {
        match self {
            DestinationError::Forbidden(_) => reasons::DESTINATION_FORBIDDEN,
            DestinationError::Unresolvable(_) => reasons::DESTINATION_UNRESOLVABLE,
        }
    }
}

/// An endpoint's delivery figures (the controller writes them to `status.delivery`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeliveryStats {
    /// Events delivered (2xx from the destination).
    pub delivered: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Events waiting for a retry now.
    pub retrying: u64,
    /// Events moved to the dead-letter store (including `malformed`).
    pub dead_lettered: u64,
    /// Elements of a provider's batch that could not be read.
    pub malformed: u64,
    /// Events the endpoint's filter failed on (dead-lettered).
    pub filter_errors: u64,
    /// Failed attempts since the last success.
    pub consecutive_failures: u64,
    /// Share of failed attempts over the recent window, 0 to 1.
    pub failure_ratio: Option<f64>,
    pub last_success_time: Option<jiff::Timestamp>,
    pub last_failure_time: Option<jiff::Timestamp>,
    /// Short reason of the last failure (status code or transport error, no secrets).
    pub last_error: Option<String>,
    /// Ingest-to-delivered latency percentiles over the recent window, milliseconds.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// Window and thresholds of the health computation.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Attempts older than this leave the failure window.
    pub window: Duration,
    /// At most this many recent attempts are in the window.
    pub window_attempts: usize,
    pub thresholds: HealthThresholds,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(300),
            window_attempts: 100,
            thresholds: HealthThresholds::default(),
        }
    }
}

/// One delivery attempt's result, as delivery reports it.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    Delivered {
        /// Ingest to delivered.
        latency: Duration,
        /// Failed attempts the event had before this one.
        prior_attempts: u32,
    },
    Failed {
        /// Short and secret-free ("HTTP 503", "timeout").
        error: &'a str,
        prior_attempts: u32,
        dead_lettered: bool,
    },
    /// An element of a provider's batch that could not be read went straight to the
    /// dead-letter store (never an attempt: the destination's health is not touched).
    Malformed,
    /// `spec.filter` failed on an event, which went to the dead-letter store (never an
    /// attempt either). `error` is the filter's, shown as the last error.
    FilterError { error: &'a str },
}

/// How a filter error starts in `status.delivery.lastError`.
pub const FILTER_ERROR_PREFIX: &str = "spec.filter: ";

/// What the controller reads for `status.delivery` and the `Healthy` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointHealth {
    pub stats: DeliveryStats,
    pub verdict: Verdict,
    /// Events are parked because of the destination (`DestinationForbidden`, ...).
    pub destination_error: Option<DestinationError>,
    pub breaker_open: bool,
    /// Grows on every change; equal generations mean equal snapshots.
    pub generation: u64,
}

const LATENCY_SAMPLES: usize = 1024;
const MAX_ERROR_LEN: usize = 160;

#[derive(Default)]
struct Tracker {
    delivered: u64,
    failed: u64,
    retrying: u64,
    dead_lettered: u64,
    malformed: u64,
    filter_errors: u64,
    consecutive_failures: u64,
    last_success: Option<SystemTime>,
    last_failure: Option<SystemTime>,
    last_error: Option<String>,
    window: VecDeque<(Instant, bool)>,
    latencies_ms: VecDeque<f64>,
    breaker_open: bool,
    destination_error: Option<DestinationError>,
    /// Set by the ingress while it refuses events at a bound; cleared on the next accept.
    backlog: Option<String>,
    generation: u64,
}

/// Gets every outcome this replica records, to share it with other replicas.
pub type OutcomeSink = Arc<dyn Fn(&EndpointKey, &Outcome<'_>) + Send + Sync>;

/// Health of every endpoint delivery knows.
pub struct HealthRegistry {
    config: HealthConfig,
    endpoints: RwLock<foldhash::HashMap<EndpointKey, Arc<Mutex<Tracker>>>>,
    sink: std::sync::OnceLock<OutcomeSink>,
    /// The last test event delivered per (endpoint, subscription): when, and its
    /// ingest-to-delivered latency.
    tests: Mutex<HashMap<(EndpointKey, String), (SystemTime, Duration)>>,
    /// The last test event dead-lettered per (endpoint, subscription): when, and why.
    test_failures: Mutex<HashMap<(EndpointKey, String), (SystemTime, String)>>,
}

impl HealthRegistry {
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            endpoints: RwLock::default(),
            sink: std::sync::OnceLock::new(),
            tests: Mutex::default(),
            test_failures: Mutex::default(),
        }
    }

    fn tracker(&self, key: &EndpointKey) -> Arc<Mutex<Tracker>> {
        crate::queue::per_endpoint(&self.endpoints, key, Mutex::default)
    }

    /// Also hands every later local outcome to `sink` (set once; see [`cluster`]).
    pub fn set_sink(&self, sink: OutcomeSink) {
        let _ = self.sink.set(sink);
    }

    /// An outcome of this replica's delivery.
    /// A test event of `subscription` was delivered (this replica only).
    pub fn record_test(&self, key: &EndpointKey, subscription: &str, latency: Duration) {
        self.tests.lock().expect("tests lock").insert(
            (key.clone(), subscription.to_owned()),
            (SystemTime::now(), latency),
        );
    }

    /// A test event of `subscription` was dead-lettered (refused by the destination, or
    /// out of attempts) for `reason` (this replica only).
    pub fn record_test_failure(&self, key: &EndpointKey, subscription: &str, reason: &str) {
        self.test_failures.lock().expect("tests lock").insert(
            (key.clone(), subscription.to_owned()),
            (SystemTime::now(), reason.to_owned()),
        );
    }

    /// When a test event of `subscription` was last dead-lettered, and why.
    pub fn last_test_failure(
        &self,
        key: &EndpointKey,
        subscription: &str,
    ) -> Option<(SystemTime, String)> {
        last_of(&self.test_failures, key, subscription)
    }

    /// When a test event of `subscription` was last delivered, and its latency.
    pub fn last_test(
        &self,
        key: &EndpointKey,
        subscription: &str,
    ) -> Option<(SystemTime, Duration)> {
        last_of(&self.tests, key, subscription)
    }

    pub fn record(&self, key: &EndpointKey, outcome: Outcome<'_>) {
        self.record_remote(key, outcome);
        if let Some(sink) = self.sink.get() {
            sink(key, &outcome);
        }
    }

    /// An outcome another replica's delivery reported: counted, not passed on again.
    pub fn record_remote(&self, key: &EndpointKey, outcome: Outcome<'_>) {
        let tracker = self.tracker(key);
        let mut t = tracker.lock().expect("tracker lock");
        let now = Instant::now();
        match outcome {
            Outcome::Delivered {
                latency,
                prior_attempts,
            } => {
                t.delivered += 1;
                t.consecutive_failures = 0;
                t.last_success = Some(SystemTime::now());
                if prior_attempts > 0 {
                    t.retrying = t.retrying.saturating_sub(1);
                }
                if t.latencies_ms.len() == LATENCY_SAMPLES {
                    t.latencies_ms.pop_front();
                }
                t.latencies_ms.push_back(latency.as_secs_f64() * 1000.0);
                t.window.push_back((now, true));
            }
            Outcome::Failed {
                error,
                prior_attempts,
                dead_lettered,
            } => {
                t.failed += 1;
                t.consecutive_failures += 1;
                t.last_failure = Some(SystemTime::now());
                t.last_error = Some(error.chars().take(MAX_ERROR_LEN).collect());
                match (dead_lettered, prior_attempts > 0) {
                    (true, true) => t.retrying = t.retrying.saturating_sub(1),
                    (false, false) => t.retrying += 1,
                    _ => {}
                }
                if dead_lettered {
                    t.dead_lettered += 1;
                }
                t.window.push_back((now, false));
            }
            Outcome::Malformed => {
                t.malformed += 1;
                t.dead_lettered += 1;
            }
            Outcome::FilterError { error } => {
                t.filter_errors += 1;
                t.dead_lettered += 1;
                let shown = format!("{FILTER_ERROR_PREFIX}{error}");
                t.last_error = Some(shown.chars().take(MAX_ERROR_LEN).collect());
            }
        }
        while t.window.len() > self.config.window_attempts {
            t.window.pop_front();
        }
        t.generation += 1;
    }

    pub fn set_breaker_open(&self, key: &EndpointKey, open: bool) {
        let tracker = self.tracker(key);
        set_field(&tracker, |t| &mut t.breaker_open, open);
    }

    pub fn set_destination_error(&self, key: &EndpointKey, error: Option<DestinationError>) {
        let tracker = self.tracker(key);
        set_field(&tracker, |t| &mut t.destination_error, error);
    }

    /// The ingress refuses this endpoint's events at a bound (`Some(why)`), or accepts them
    /// again (`None`). Cheap when nothing changes: the accept path calls it per request.
    pub fn set_backlog(&self, key: &EndpointKey, backlog: Option<String>) {
        let existing = self
            .endpoints
            .read()
            .expect("health lock")
            .get(key)
            .cloned();
        let tracker = match existing {
            Some(t) => t,
            None if backlog.is_none() => return,
            None => self.tracker(key),
        };
        set_field(&tracker, |t| &mut t.backlog, backlog);
    }

    /// Cheap change indicator: compare with the generation of the last snapshot written.
    pub fn generation(&self, key: &EndpointKey) -> Option<u64> {
        let tracker = self
            .endpoints
            .read()
            .expect("health lock")
            .get(key)
            .cloned()?;
        let g = tracker.lock().expect("tracker lock").generation;
        Some(g)
    }

    pub fn remove(&self, key: &EndpointKey) {
        self.endpoints.write().expect("health lock").remove(key);
    }

    pub fn snapshot(&self, key: &EndpointKey) -> Option<EndpointHealth> {
        let tracker = self
            .endpoints
            .read()
            .expect("health lock")
            .get(key)
            .cloned()?;
        let mut t = tracker.lock().expect("tracker lock");
        let now = Instant::now();
        let window = self.config.window;
        let before = t.window.len();
        while t
            .window
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            t.window.pop_front();
        }
        if t.window.len() != before {
            // The window moved: the verdict may have changed.
            t.generation += 1;
        }
        let window_attempts = t.window.len();
        let failures = t.window.iter().filter(|(_, ok)| !ok).count();
        let failure_ratio = (window_attempts > 0).then(|| failures as f64 / window_attempts as f64);
        let (p50, p99) = percentiles(&t.latencies_ms);
        let input = VerdictInput {
            delivered: t.delivered,
            failed: t.failed,
            consecutive_failures: t.consecutive_failures,
            window_attempts,
            failure_ratio,
            breaker_open: t.breaker_open,
            last_error: t.last_error.clone(),
            backlog: t.backlog.clone(),
        };
        let verdict = verdict(&input, &self.config.thresholds);
        Some(EndpointHealth {
            stats: DeliveryStats {
                delivered: t.delivered,
                failed: t.failed,
                retrying: t.retrying,
                dead_lettered: t.dead_lettered,
                malformed: t.malformed,
                filter_errors: t.filter_errors,
                consecutive_failures: t.consecutive_failures,
                failure_ratio,
                last_success_time: t.last_success.and_then(to_time),
                last_failure_time: t.last_failure.and_then(to_time),
                last_error: t.last_error.clone(),
                latency_p50_ms: p50,
                latency_p99_ms: p99,
            },
            verdict,
            destination_error: t.destination_error.clone(),
            breaker_open: t.breaker_open,
            generation: t.generation,
        })
    }
}

/// What `map` last noted for a test event of `subscription`.
fn last_of<V: Clone>(
    map: &Mutex<HashMap<(EndpointKey, String), V>>,
    key: &EndpointKey,
    subscription: &str,
) -> Option<V> {
    map.lock()
        .expect("tests lock")
        .get(&(key.clone(), subscription.to_owned()))
        .cloned()
}

/// Sets one of the tracker's fields, a new generation when it changes.
fn set_field<T: PartialEq>(
    tracker: &Mutex<Tracker>,
    field: impl FnOnce(&mut Tracker) -> &mut T,
    value: T,
) {
    let mut t = tracker.lock().expect("tracker lock");
    let slot = field(&mut t);
    if *slot != value {
        *slot = value;
        t.generation += 1;
    }
}

fn to_time(t: SystemTime) -> Option<jiff::Timestamp> {
    jiff::Timestamp::try_from(t).ok()
}

fn percentiles(samples: &VecDeque<f64>) -> (Option<f64>, Option<f64>) {
    if samples.is_empty() {
        return (None, None);
    }
    let mut v: Vec<f64> = samples.iter().copied().collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (Some(at(0.5)), Some(at(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_retrying_window_and_latency() {
        let reg = HealthRegistry::new(HealthConfig {
            window: Duration::from_secs(60),
            window_attempts: 4,
            thresholds: HealthThresholds {
                failing_after: 3,
                degraded_ratio: 0.3,
                min_window_attempts: 4,
            },
        });
        let k = EndpointKey::new("ns", "a");
        assert!(reg.snapshot(&k).is_none());
        let fail = |prior, dead| Outcome::Failed {
            error: "HTTP 500",
            prior_attempts: prior,
            dead_lettered: dead,
        };
        reg.record(&k, fail(0, false));
        reg.record(&k, fail(1, false));
        let s = reg.snapshot(&k).unwrap();
        assert_eq!(
            (
                s.stats.failed,
                s.stats.retrying,
                s.stats.consecutive_failures
            ),
            (2, 1, 2)
        );
        assert!(
            s.verdict.healthy,
            "two failures, below thresholds: {:?}",
            s.verdict
        );
        reg.record(&k, fail(2, true));
        let s = reg.snapshot(&k).unwrap();
        assert_eq!((s.stats.retrying, s.stats.dead_lettered), (0, 1));
        assert_eq!(s.verdict.reason, "DeliveryFailing");
        let g = reg.generation(&k).unwrap();
        assert_eq!(reg.generation(&k), Some(g), "no change, same generation");
        for ms in [10, 20, 30] {
            reg.record(
                &k,
                Outcome::Delivered {
                    latency: Duration::from_millis(ms),
                    prior_attempts: 0,
                },
            );
        }
        assert!(reg.generation(&k).unwrap() > g);
        let s = reg.snapshot(&k).unwrap();
        // window: last 4 attempts = 1 failure, 3 successes
        assert_eq!(s.stats.failure_ratio, Some(0.25));
        assert_eq!((s.verdict.healthy, s.verdict.reason), (true, "Delivering"));
        assert_eq!(s.stats.latency_p50_ms, Some(20.0));
        assert_eq!(s.stats.latency_p99_ms, Some(30.0));
        assert!(s.stats.last_success_time.is_some() && s.stats.last_failure_time.is_some());
        reg.set_destination_error(&k, Some(DestinationError::Forbidden("x")));
        assert_eq!(
            reg.snapshot(&k)
                .unwrap()
                .destination_error
                .unwrap()
                .reason(),
            "DestinationForbidden"
        );
    }
}
