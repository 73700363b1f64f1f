//! Fetch on failure: when a request's signature does not verify against the keys its
//! subscription's route holds (or the route holds none yet), the ingress asks a
//! [`KeySource`] for the secret the provider signs with now, and verifies again before
//! answering. A provider that rotates its secret, or a webhook the operator has just
//! (re)created, is then accepted from its first event, on every replica.
//!
//! Bounded, so that bad signatures (an attacker's) cannot become a flood of provider API
//! calls: per subscription at most one fetch in flight (others wait for its result:
//! single flight), at most [`KeyFetcher::max_per_window`] per minute (after that a failing
//! signature is answered 401 at once), each within [`KeyFetcher::timeout`]. Every fetch is
//! counted in `webhook_operator_key_fetches_total{provider,result}`. A secret is never
//! logged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::queue::EndpointKey;
use webhook_providers::Provider;
use webhook_providers::inbound::VerificationKeys;

/// Fetches at most this many times per subscription per [`WINDOW`].
pub const DEFAULT_MAX_FETCHES_PER_MINUTE: usize = 6;
/// A fetch that takes longer is abandoned (well under Smallest's 30 s delivery timeout).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Secrets of one fetch kept per subscription (newest first), besides the route's own keys
/// (Atomic may list a replacement and the webhook it replaces).
const KEPT: usize = 4;

/// Why the current secret could not be fetched: a short fixed reason (for a log line),
/// never a secret or a URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyFetchError(pub &'static str);

/// Where the current signing secrets of a subscription come from (the operator asks the
/// provider). No Kubernetes here: the subscription is named by its endpoint's key and its
/// name, as in the route.
#[async_trait]
pub trait KeySource: Send + Sync {
    /// The secrets the provider signs `subscription`'s deliveries with now, newest first;
    /// empty when the provider holds none for it.
    async fn current_secrets(
        &self,
        endpoint: &EndpointKey,
        subscription: &str,
    ) -> Result<Vec<Vec<u8>>, KeyFetchError>;
}

/// Whether the provider issues the secret it signs with (so the operator can only fetch
/// it): Atomic and Smallest. Atlas does not sign; Atllas's header value is the operator's.
pub fn fetchable(provider: Provider) -> bool {
    matches!(provider, Provider::Atomic | Provider::Smallest)
}

/// Whose secret: the subscription's provider, the endpoint it receives on, its name.
#[derive(Clone, Copy)]
pub struct Subject<'a> {
    pub provider: Provider,
    pub endpoint: &'a EndpointKey,
    pub subscription: &'a str,
}

/// The ingress's side of fetching: the source (set once the controller exists) and the
/// bounds.
pub struct KeyFetcher {
    source: OnceLock<Arc<dyn KeySource>>,
    pub max_per_window: usize,
    pub timeout: Duration,
}

impl Default for KeyFetcher {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FETCHES_PER_MINUTE, DEFAULT_FETCH_TIMEOUT)
    }
}

impl KeyFetcher {
    pub fn new(max_per_window: usize, timeout: Duration) -> Self {
        KeyFetcher {
            source: OnceLock::new(),
            max_per_window,
            timeout,
        }
    }

    /// Sets where secrets are fetched from; only the first call counts.
    pub fn set_source(&self, source: Arc<dyn KeySource>) {
        let _ = self.source.set(source);
    }

    /// Whether a failed signature of `provider` may be verified again after a fetch.
    pub fn applies(&self, provider: Provider) -> bool {
        fetchable(provider) && self.source.get().is_some()
    }

    /// Verifies with the fetched secrets, fetching the current ones first unless another
    /// request's fetch completed since this one looked (single flight) or the bound is
    /// reached. `verify` is called with the keys to try (fetched ones first, then
    /// `route_keys`) and returns whether they verified; `Ok(T)` is its success.
    pub async fn verify_again<T, E>(
        &self,
        state: &FetchState,
        metrics: &Metrics,
        who: Subject<'_>,
        route_keys: &VerificationKeys,
        mut verify: impl FnMut(&VerificationKeys) -> Result<T, E>,
    ) -> Option<Result<T, E>> {
        let source = self.source.get()?;
        let seen = state.generation();
        // Fetched earlier (by a request to this replica), not yet in the route's keys.
        let mut last = None;
        if let Some(keys) = state.merged(route_keys) {
            match verify(&keys) {
                Ok(t) => return Some(Ok(t)),
                Err(e) => last = Some(Err(e)),
            }
        }
        let fetched = state
            .fetch_after(seen, self, source.as_ref(), metrics, who)
            .await;
        if !fetched {
            return last;
        }
        match state.merged(route_keys) {
            Some(keys) => Some(verify(&keys)),
            None => last,
        }
    }
}

/// One subscription's fetch state; kept across the route's replacements (like its
/// counters), dropped with the subscription.
#[derive(Default)]
pub struct FetchState {
    /// Completed fetch attempts (successful or not). A request that saw generation `n`
    /// and finds it moved on uses that fetch's result instead of fetching again.
    generation: AtomicU64,
    /// Held for the duration of a fetch: the single flight.
    flight: tokio::sync::Mutex<VecDeque<Instant>>,
    /// What the last successful fetch returned, newest first.
    fetched: RwLock<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for FetchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchState")
            .field("generation", &self.generation())
            .field(
                "fetched",
                &format_args!("<{} redacted>", self.fetched.read().expect("keys").len()),
            )
            .finish()
    }
}

impl FetchState {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The fetched secrets first, then the route's own (without repeats); `None` when
    /// nothing was fetched.
    pub fn merged(&self, route_keys: &VerificationKeys) -> Option<VerificationKeys> {
        let fetched = self.fetched.read().expect("keys");
        if fetched.is_empty() {
            return None;
        }
        let mut secrets = fetched.clone();
        for s in &route_keys.secrets {
            if !secrets.contains(s) {
                secrets.push(s.clone());
            }
        }
        Some(VerificationKeys {
            secrets,
            ..route_keys.clone()
        })
    }

    /// Fetches unless a fetch completed after generation `seen` (then its result is
    /// used) or the rate limit is reached. Returns whether some fetch completed since
    /// `seen` (this one or another's), i.e. whether verifying again may help.
    async fn fetch_after(
        &self,
        seen: u64,
        fetcher: &KeyFetcher,
        source: &dyn KeySource,
        metrics: &Metrics,
        who: Subject<'_>,
    ) -> bool {
        let Subject {
            provider,
            endpoint,
            subscription,
        } = who;
        let mut recent = self.flight.lock().await;
        if self.generation() != seen {
            return true;
        }
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() >= fetcher.max_per_window {
            metrics.key_fetch(provider.as_str(), "limited");
            return false;
        }
        recent.push_back(now);
        let answer = tokio::time::timeout(
            fetcher.timeout,
            source.current_secrets(endpoint, subscription),
        )
        .await;
        let result = match answer {
            Ok(Ok(secrets)) if secrets.is_empty() => "none",
            Ok(Ok(secrets)) => {
                // What the provider signs with now replaces what was fetched before: a
                // secret it no longer uses stays accepted only through the route's own
                // keys, for the overlap the leader keeps in the Secret.
                let mut kept = self.fetched.write().expect("keys");
                let new = secrets.iter().any(|s| !kept.contains(s));
                *kept = secrets;
                kept.truncate(KEPT);
                if new { "fetched" } else { "unchanged" }
            }
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %endpoint, subscription, error = %e, "fetching the provider's current signing secret failed");
                "failed"
            }
            Err(_) => {
                tracing::warn!(endpoint = %endpoint, subscription, timeout = ?fetcher.timeout, "fetching the provider's current signing secret timed out");
                "timeout"
            }
        };
        metrics.key_fetch(provider.as_str(), result);
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Answers `secret` after `delay`, counting calls.
    struct Source {
        secret: RwLock<Vec<u8>>,
        delay: Duration,
        calls: AtomicUsize,
    }

    #[async_trait]
    impl KeySource for Source {
        async fn current_secrets(
            &self,
            _: &EndpointKey,
            _: &str,
        ) -> Result<Vec<Vec<u8>>, KeyFetchError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            Ok(vec![self.secret.read().unwrap().clone()])
        }
    }

    fn setup(delay: Duration, max: usize) -> (Arc<KeyFetcher>, Arc<Source>, Arc<FetchState>) {
        let source = Arc::new(Source {
            secret: RwLock::new(b"new".to_vec()),
            delay,
            calls: AtomicUsize::new(0),
        });
        let fetcher = Arc::new(KeyFetcher::new(max, Duration::from_secs(5)));
        fetcher.set_source(source.clone());
        (fetcher, source, Arc::new(FetchState::default()))
    }

    fn old_keys() -> VerificationKeys {
        VerificationKeys {
            secrets: vec![b"old".to_vec()],
            ..Default::default()
        }
    }

    /// Verifies when the keys hold `wanted`.
    fn check(wanted: &'static [u8]) -> impl FnMut(&VerificationKeys) -> Result<(), ()> {
        move |keys| {
            if keys.secrets.iter().any(|s| s == wanted) {
                Ok(())
            } else {
                Err(())
            }
        }
    }

    async fn again(
        fetcher: &KeyFetcher,
        state: &FetchState,
        metrics: &Metrics,
        wanted: &'static [u8],
    ) -> Option<Result<(), ()>> {
        fetcher
            .verify_again(
                state,
                metrics,
                Subject {
                    provider: Provider::Smallest,
                    endpoint: &EndpointKey::new("apps", "orders"),
                    subscription: "calls",
                },
                &old_keys(),
                check(wanted),
            )
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_failures_share_one_fetch_and_all_verify_with_its_secret() {
        let (fetcher, source, state) = setup(Duration::from_millis(500), 6);
        let metrics = Arc::new(Metrics::new());
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (fetcher, state, metrics) = (fetcher.clone(), state.clone(), metrics.clone());
                tokio::spawn(async move { again(&fetcher, &state, &metrics, b"new").await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Some(Ok(())));
        }
        assert_eq!(
            source.calls.load(Ordering::SeqCst),
            1,
            "one fetch in flight"
        );
        assert_eq!(metrics.key_fetches("smallest", "fetched"), 1);
        // The fetched secret is kept: the next event verifies without a fetch, and the
        // route's old key stays accepted (the overlap).
        assert_eq!(
            again(&fetcher, &state, &metrics, b"new").await,
            Some(Ok(()))
        );
        let merged = state.merged(&old_keys()).unwrap();
        assert_eq!(merged.secrets, vec![b"new".to_vec(), b"old".to_vec()]);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_signatures_cause_at_most_the_bounded_fetches_per_minute() {
        let (fetcher, source, state) = setup(Duration::from_millis(10), 6);
        let metrics = Metrics::new();
        // 100 bad signatures, one after the other, within a minute.
        for _ in 0..100 {
            let r = again(&fetcher, &state, &metrics, b"forged").await;
            assert!(matches!(r, Some(Err(())) | None), "{r:?}");
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(source.calls.load(Ordering::SeqCst), 6);
        assert_eq!(metrics.key_fetches("smallest", "limited"), 94);
        // A new window allows fetches again: a real rotation is still picked up.
        tokio::time::advance(WINDOW).await;
        *source.secret.write().unwrap() = b"newer".to_vec();
        assert_eq!(
            again(&fetcher, &state, &metrics, b"newer").await,
            Some(Ok(()))
        );
        assert_eq!(source.calls.load(Ordering::SeqCst), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_secret_the_provider_no_longer_signs_with_is_not_kept_from_a_fetch() {
        let (fetcher, source, state) = setup(Duration::from_millis(10), 6);
        let metrics = Metrics::new();
        assert_eq!(
            again(&fetcher, &state, &metrics, b"new").await,
            Some(Ok(()))
        );
        *source.secret.write().unwrap() = b"newer".to_vec();
        assert_eq!(
            again(&fetcher, &state, &metrics, b"newer").await,
            Some(Ok(()))
        );
        // "new" was only ever fetched: once the provider moved on, it is not accepted.
        let merged = state.merged(&old_keys()).unwrap();
        assert_eq!(merged.secrets, vec![b"newer".to_vec(), b"old".to_vec()]);
        assert_eq!(metrics.key_fetches("smallest", "fetched"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_source_is_cut_off_by_the_timeout_and_waiters_do_not_fetch_again() {
        let (_, source, state) = setup(Duration::from_secs(60), 6);
        let fetcher = Arc::new(KeyFetcher::new(6, Duration::from_secs(5)));
        fetcher.set_source(source.clone());
        let metrics = Arc::new(Metrics::new());
        let started = Instant::now();
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (fetcher, state, metrics) = (fetcher.clone(), state.clone(), metrics.clone());
                tokio::spawn(async move { again(&fetcher, &state, &metrics, b"new").await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), None, "nothing fetched, nothing verified");
        }
        assert!(started.elapsed() < Duration::from_secs(6));
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.key_fetches("smallest", "timeout"), 1);
    }
}
