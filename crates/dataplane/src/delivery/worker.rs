//! One worker task per configured endpoint: decides how many events may go now (destination
//! allowed, breaker, the consumer's pace within `maxInFlight`, `ratePerSecond`), leases that
//! many and runs one attempt task per event. Attempt outcomes go to the queue (ack / retry /
//! dead letter), the breaker, the pace, health and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, Uri};
use tokio::sync::{Notify, watch};
use url::Url;

use super::envelope::DeliveryFormat;
use super::pace::{Pace, Signal};
use super::{Admission, Breaker, DestinationError, Policy, SigningSecret};
use crate::health::Outcome;
use crate::metrics::EndpointMetrics;
use crate::queue::{EndpointKey, EventKind, QueuedEvent};

/// What workers and attempts share (the dispatcher builds it once).
pub(crate) struct Shared {
    pub queue: Arc<dyn crate::queue::Queue>,
    pub health: Arc<crate::health::HealthRegistry>,
    pub client: super::client::DeliveryClient,
    pub resolver: super::Resolver,
    pub shutdown_grace: Duration,
    pub tracer: crate::spans::Tracer,
}

/// An endpoint's configuration in the form delivery uses, rebuilt on each upsert.
pub(crate) struct EndpointRuntime {
    pub key: EndpointKey,
    pub url: Result<Url, DestinationError>,
    pub policy: Policy,
    pub secrets: Vec<SigningSecret>,
    pub headers: HeaderMap,
    pub format: DeliveryFormat,
    pub filter: Option<super::filter::Filter>,
    pub metrics: EndpointMetrics,
    pub breaker: Arc<Breaker>,
    /// The endpoint's own client when it has TLS settings; `None`: the shared one.
    pub client: Option<super::client::DeliveryClient>,
}

/// How often an allowed destination is resolved and checked again.
const RECHECK: Duration = Duration::from_secs(30);
/// How often a refused destination is looked at again (it may have been fixed in DNS).
const PARKED_RECHECK: Duration = Duration::from_secs(2);

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Whole tokens available at `rate` per second (burst: one second's worth).
    fn available(&mut self, rate: u32, now: Instant) -> usize {
        if rate == 0 {
            return usize::MAX;
        }
        let rate = f64::from(rate);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        self.tokens.floor() as usize
    }

    fn take(&mut self, rate: u32, n: usize) {
        if rate > 0 {
            self.tokens -= n as f64;
        }
    }

    fn until_next(&self, rate: u32) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / f64::from(rate.max(1))).max(0.001))
    }
}

/// Counts what a worker has under way and wakes it when that changes.
#[derive(Default)]
struct Attempts {
    /// Requests to the destination not yet answered: what `maxInFlight` limits.
    requests: AtomicUsize,
    /// Attempts not yet finished, outcome stored included: what shutdown waits for.
    unfinished: AtomicUsize,
    changed: Notify,
}

/// One attempt's hold on [`Attempts`]. The request slot is freed as soon as the
/// destination has answered ([`InFlight::answered`]), so storing the outcome (a queue
/// commit) does not keep the destination's concurrency from being used; dropping the
/// guard ends the attempt however it ends.
struct InFlight {
    attempts: Arc<Attempts>,
    holds_request: bool,
}

impl InFlight {
    fn start(attempts: &Arc<Attempts>) -> Self {
        attempts.requests.fetch_add(1, Ordering::AcqRel);
        attempts.unfinished.fetch_add(1, Ordering::AcqRel);
        Self {
            attempts: attempts.clone(),
            holds_request: true,
        }
    }

    fn answered(&mut self) {
        if std::mem::take(&mut self.holds_request) {
            self.attempts.requests.fetch_sub(1, Ordering::AcqRel);
            self.attempts.changed.notify_one();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.answered();
        self.attempts.unfinished.fetch_sub(1, Ordering::AcqRel);
        self.attempts.changed.notify_one();
    }
}

pub(crate) async fn run(
    shared: Arc<Shared>,
    key: EndpointKey,
    mut config: watch::Receiver<Option<Arc<EndpointRuntime>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let attempts = Arc::new(Attempts::default());
    let mut checked: Checked = None;
    let mut pace: Option<Arc<Pace>> = None;
    let mut bucket = Bucket {
        tokens: 0.0,
        last: Instant::now(),
    };

    // Sleeps up to `d`, waking early on a config change, shutdown or a finished attempt.
    // Returns false when the worker must stop.
    macro_rules! idle {
        ($d:expr) => {{
            tokio::select! {
                _ = tokio::time::sleep($d) => true,
                r = config.changed() => r.is_ok(),
                _ = shutdown.changed() => false,
                _ = attempts.changed.notified() => true,
            }
        }};
    }

    loop {
        if *shutdown.borrow() {
            break;
        }
        let Some(rt) = config.borrow_and_update().clone() else {
            break; // endpoint removed: its events stay parked
        };

        check_destination(&shared, &key, &rt, &mut checked).await;
        let Some((_, _, Ok(url))) = checked.as_ref() else {
            if !idle!(PARKED_RECHECK) {
                break;
            }
            continue;
        };
        let url = url.clone();

        shared.health.set_breaker_open(&key, rt.breaker.is_open());
        let pace = pace_for(&mut pace, &rt.policy);
        let limit = pace.limit();
        rt.metrics.in_flight_limit.set(limit as i64);
        let busy = attempts.requests.load(Ordering::Acquire);
        let (room, probe) = match lease_room(&rt, limit, busy, &mut bucket) {
            Ok(room) => room,
            Err(wait) => {
                if !idle!(wait) {
                    break;
                }
                continue;
            }
        };

        let events = lease(&shared, &key, room).await;
        if events.is_empty() {
            if probe {
                rt.breaker.abandon_probe();
            }
            let stop = tokio::select! {
                _ = shared.queue.wait_due(&key, Duration::from_secs(1)) => false,
                r = config.changed() => r.is_err(),
                _ = shutdown.changed() => true,
            };
            if stop {
                break;
            }
            continue;
        }
        bucket.take(rt.policy.rate_per_second, events.len());
        for ev in events {
            let guard = InFlight::start(&attempts);
            let run = (rt.clone(), pace.clone());
            tokio::spawn(attempt(shared.clone(), run, url.clone(), ev, guard));
        }
    }

    drain(&shared, &attempts).await;
}

/// The endpoint's pace: kept across configuration changes that keep `maxInFlight` and
/// `adaptiveConcurrency`, new otherwise.
fn pace_for(pace: &mut Option<Arc<Pace>>, policy: &Policy) -> Arc<Pace> {
    let fits = pace
        .as_ref()
        .is_some_and(|p| p.fits(policy.max_in_flight, policy.adaptive_concurrency));
    if !fits {
        *pace = Some(Arc::new(Pace::new(
            policy.max_in_flight,
            policy.adaptive_concurrency,
        )));
    }
    pace.clone().expect("set above")
}

/// Lets attempts under way finish (their outcome is stored); anything else is safe in
/// the queue and due again on the next start.
async fn drain(shared: &Shared, attempts: &Attempts) {
    let deadline = Instant::now() + shared.shutdown_grace;
    while attempts.unfinished.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(50), attempts.changed.notified()).await;
    }
}

/// How many events to lease now, and whether the lease is the breaker's probe; or how
/// long to wait before there is room (the breaker, the in-flight `limit`, the rate).
fn lease_room(
    rt: &EndpointRuntime,
    limit: usize,
    busy: usize,
    bucket: &mut Bucket,
) -> Result<(usize, bool), Duration> {
    let (room, probe) = breaker_room(rt, limit, busy)?;
    if room == 0 {
        return Err(Duration::from_secs(1));
    }
    let rate = rt.policy.rate_per_second;
    let room = room.min(bucket.available(rate, Instant::now()));
    if room == 0 {
        if probe {
            rt.breaker.abandon_probe();
        }
        return Err(bucket.until_next(rate));
    }
    Ok((room, probe))
}

/// Leases up to `room` due events; none when the lease fails (logged).
async fn lease(shared: &Shared, key: &EndpointKey, room: usize) -> Vec<QueuedEvent> {
    match shared.queue.lease(key, room, SystemTime::now()).await {
        Ok(events) => events,
        Err(e) => {
            tracing::error!(endpoint = %key, error = %e, "lease failed");
            Vec::new()
        }
    }
}

/// The configuration the destination was last checked for, when, and what it gave.
type Checked = Option<(Arc<EndpointRuntime>, Instant, Result<Uri, DestinationError>)>;

/// Checks the destination again when the configuration changed or the last check is
/// old (sooner while it is refused), and tells health.
async fn check_destination(
    shared: &Shared,
    key: &EndpointKey,
    rt: &Arc<EndpointRuntime>,
    checked: &mut Checked,
) {
    let stale = checked.as_ref().is_none_or(|(seen, at, r)| {
        !Arc::ptr_eq(seen, rt) || at.elapsed() > if r.is_ok() { RECHECK } else { PARKED_RECHECK }
    });
    if !stale {
        return;
    }
    let target = match &rt.url {
        Ok(u) => shared.resolver.target(u).await.and_then(|u| {
            Uri::try_from(u.as_str()).map_err(|_| DestinationError::Unresolvable("not a valid URL"))
        }),
        Err(e) => Err(e.clone()),
    };
    if let Err(e) = &target {
        tracing::warn!(endpoint = %key, reason = e.reason(), "destination refused; events parked");
    }
    shared
        .health
        .set_destination_error(key, target.as_ref().err().cloned());
    *checked = Some((rt.clone(), Instant::now(), target));
}

/// How many events the breaker lets out now, and whether as its one probe; or how long
/// to wait.
fn breaker_room(
    rt: &EndpointRuntime,
    limit: usize,
    busy: usize,
) -> Result<(usize, bool), Duration> {
    match rt.breaker.admit(Instant::now()) {
        Admission::Open => Ok((limit.saturating_sub(busy), false)),
        Admission::Probe if busy == 0 => Ok((1, true)),
        Admission::Probe => {
            rt.breaker.abandon_probe();
            Ok((0, false))
        }
        Admission::Wait(d) => Err(d),
    }
}

/// A failed attempt.
struct Failure {
    error: String,
    /// The destination's `Retry-After`, on a `429` or `503` only.
    retry_after: Option<Duration>,
    /// The destination refused this event itself (see [`refuses_this_event`]).
    permanent: bool,
}

/// Answers that ask for fewer requests: they lower the pace, and their `Retry-After` sets
/// the next attempt.
fn asks_to_slow_down(status: http::StatusCode) -> bool {
    status == http::StatusCode::TOO_MANY_REQUESTS || status == http::StatusCode::SERVICE_UNAVAILABLE
}

/// Answers that refuse the event, not the moment: sending the same bytes again gets the
/// same answer, so the event goes to the dead-letter store at once (a replay can send it
/// again after the consumer is fixed) and the breaker does not count it, so one bad event
/// does not hold back the rest. Everything else (5xx, 408, 429, and 401/403/404, which
/// usually mean a misconfiguration every event shares) is retried.
fn refuses_this_event(status: http::StatusCode) -> bool {
    use http::StatusCode as S;
    matches!(
        status,
        S::BAD_REQUEST
            | S::GONE
            | S::PAYLOAD_TOO_LARGE
            | S::UNSUPPORTED_MEDIA_TYPE
            | S::UNPROCESSABLE_ENTITY
    )
}

async fn attempt(
    shared: Arc<Shared>,
    (rt, pace): (Arc<EndpointRuntime>, Arc<Pace>),
    url: Uri,
    ev: QueuedEvent,
    mut in_flight: InFlight,
) {
    let span = shared.tracer.deliver(&ev);
    if let Some(end) = unsent(&rt, &ev) {
        in_flight.answered();
        settle_unsent(&shared, &rt, &ev, span, end).await;
        return;
    }
    let ts = jiff::Timestamp::now().as_second();
    // The span this attempt is made in: the destination's `traceparent` names it.
    let attempt_span = crate::trace_context::new_span_id();
    let traceparent =
        crate::trace_context::event_trace(ev.traceparent.as_deref(), &ev.id).header(attempt_span);
    let sent_at = span.as_ref().map(|_| SystemTime::now());
    let headers =
        super::envelope::headers(rt.format, &rt.headers, &rt.secrets, &ev, ts, &traceparent);
    let sent = Instant::now();
    let response = rt
        .client
        .as_ref()
        .unwrap_or(&shared.client)
        .post(url, headers, ev.payload.clone(), rt.policy.timeout)
        .await;
    let answered = Instant::now();
    let status = response.as_ref().ok().map(|r| r.status.as_u16());
    let signal = match &response {
        Ok(r) if asks_to_slow_down(r.status) => Signal::Overloaded,
        Ok(_) => Signal::Answered(answered - sent),
        Err(_) => Signal::Nothing,
    };
    if pace.on_answer(sent, signal, answered) {
        tracing::debug!(endpoint = %rt.key, limit = pace.limit(), "in-flight limit lowered");
    }
    let failure = match response {
        Ok(answer) => failure_of(answer.status, &answer.headers),
        Err(e) => Some(Failure {
            error: e.reason().to_owned(),
            retry_after: None,
            permanent: false,
        }),
    };
    in_flight.answered();
    let now = SystemTime::now();
    // The destination is up when it answers, even when it refuses this one event or asks
    // for a slower pace (the pace and `Retry-After` answer that): no reason to hold back
    // the others.
    let throttled = status == Some(http::StatusCode::TOO_MANY_REQUESTS.as_u16());
    match &failure {
        Some(f) if !f.permanent && !throttled => {
            rt.breaker.on_failure(Instant::now());
        }
        _ => rt.breaker.on_success(),
    }
    let age = now.duration_since(ev.received).unwrap_or_default();
    let end = disposition(failure, ev.attempts, age, &rt.policy, &mut rand::rng());
    let sent = Sent {
        span: span.zip(sent_at),
        attempt_span,
        status,
        now,
        age,
    };
    settle(&shared, &rt, &ev, sent, end).await;
}

/// What an answer other than an error of transport says: `None` for a 2xx.
fn failure_of(status: http::StatusCode, headers: &HeaderMap) -> Option<Failure> {
    if status.is_success() {
        return None;
    }
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .filter(|_| asks_to_slow_down(status))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| super::parse_retry_after(v, jiff::Timestamp::now()));
    Some(Failure {
        error: format!("HTTP {}", status.as_u16()),
        retry_after,
        permanent: refuses_this_event(status),
    })
}

/// An event that ends without being sent.
enum Unsent {
    /// An element the provider sent that could not be read: kept for inspection in the
    /// dead-letter store, never sent.
    Malformed(String),
    /// The endpoint's filter skips it.
    Filtered,
    /// The endpoint's filter failed on it.
    FilterError(String),
}

fn unsent(rt: &EndpointRuntime, ev: &QueuedEvent) -> Option<Unsent> {
    if let EventKind::Malformed { reason } = &ev.kind {
        return Some(Unsent::Malformed(format!(
            "malformed provider event: {reason}"
        )));
    }
    use super::filter::Verdict;
    match rt
        .filter
        .as_ref()?
        .evaluate(&ev.payload, &ev.event_type, &ev.subscription, &ev.headers)
    {
        Verdict::Deliver => None,
        Verdict::Skip => Some(Unsent::Filtered),
        Verdict::Error(reason) => {
            rt.metrics.filter_errors.inc();
            Some(Unsent::FilterError(reason))
        }
    }
}

/// Stores the end of an unsent event; once stored, counts it and ends its span.
async fn settle_unsent(
    shared: &Shared,
    rt: &EndpointRuntime,
    ev: &QueuedEvent,
    span: Option<crate::spans::Deliver>,
    end: Unsent,
) {
    let stored = match &end {
        Unsent::Filtered => shared.queue.ack(ev).await,
        Unsent::Malformed(reason) | Unsent::FilterError(reason) => {
            shared.queue.dead_letter(ev, reason).await
        }
    };
    if let Err(e) = stored {
        let what = match end {
            Unsent::Filtered => "acknowledging a filtered event failed",
            Unsent::Malformed(_) => "storing a malformed event as a dead letter failed",
            Unsent::FilterError(_) => "storing a filter error as a dead letter failed",
        };
        tracing::warn!(endpoint = %rt.key, error = %e, "{what}");
        return;
    }
    let state = match end {
        Unsent::Filtered => {
            rt.metrics.filtered.inc();
            "filtered"
        }
        Unsent::Malformed(_) => {
            rt.metrics.dead_lettered.inc();
            shared.health.record(&rt.key, Outcome::Malformed);
            "dead_lettered"
        }
        Unsent::FilterError(reason) => {
            rt.metrics.dead_lettered.inc();
            shared
                .health
                .record(&rt.key, Outcome::FilterError { error: &reason });
            "dead_lettered"
        }
    };
    if let Some(span) = span {
        span.finish(ev, state, ev.attempts);
    }
}

/// What becomes of an event after an attempt.
#[derive(Debug, PartialEq)]
enum Disposition {
    Delivered,
    /// Sent again after `delay`.
    Retry {
        delay: Duration,
        error: String,
    },
    /// Moved to the dead-letter store with `reason`.
    DeadLetter {
        reason: String,
        error: String,
    },
}

/// The end of an attempt from its failure (`None`: delivered), the attempts before it,
/// the event's age and the policy. Pure: the jitter comes from `rng`.
fn disposition(
    failure: Option<Failure>,
    prior_attempts: u32,
    age: Duration,
    policy: &Policy,
    rng: &mut impl rand::Rng,
) -> Disposition {
    let Some(Failure {
        error,
        retry_after,
        permanent,
    }) = failure
    else {
        return Disposition::Delivered;
    };
    let failed = prior_attempts + 1;
    let delay = policy.retry_delay(failed, retry_after, rng);
    // Too old by the time of the next attempt is as good as too old now.
    if permanent || failed >= policy.max_attempts || age + delay > policy.max_age {
        let reason = if permanent {
            format!("{error}: the destination refused this event")
        } else {
            format!("{error} after {failed} attempts")
        };
        Disposition::DeadLetter { reason, error }
    } else {
        Disposition::Retry { delay, error }
    }
}

/// What an attempt that was sent leaves to record.
struct Sent {
    /// The event's span and when the attempt was sent, when spans are recorded.
    span: Option<(crate::spans::Deliver, SystemTime)>,
    attempt_span: [u8; 8],
    status: Option<u16>,
    now: SystemTime,
    age: Duration,
}

/// Stores what `end` says (ack, retry or dead letter), then counts it, records the
/// attempt's span and tells health.
async fn settle(
    shared: &Shared,
    rt: &EndpointRuntime,
    ev: &QueuedEvent,
    sent: Sent,
    end: Disposition,
) {
    use crate::spans::AttemptOutcome;
    let n = ev.attempts + 1;
    let stored = match &end {
        Disposition::Delivered => shared.queue.ack(ev).await,
        Disposition::Retry { delay, error } => {
            shared.queue.retry(ev, sent.now + *delay, error).await
        }
        Disposition::DeadLetter { reason, .. } => {
            if ev.kind == EventKind::Test {
                shared
                    .health
                    .record_test_failure(&rt.key, &ev.subscription, reason);
            }
            shared.queue.dead_letter(ev, reason).await
        }
    };
    if let Err(e) = &stored {
        // Delivered but not acked: it will be delivered again with the same id.
        let what = match end {
            Disposition::Delivered => "ack failed",
            _ => "recording a failed attempt failed",
        };
        tracing::warn!(endpoint = %rt.key, error = %e, "{what}");
    }
    let (outcome, error, finished) = match &end {
        Disposition::Delivered => (AttemptOutcome::Delivered, None, Some("delivered")),
        Disposition::Retry { error, .. } => (AttemptOutcome::Retry, Some(error), None),
        Disposition::DeadLetter { error, .. } => (
            AttemptOutcome::DeadLetter,
            Some(error),
            Some("dead_lettered"),
        ),
    };
    if let Some((span, at)) = sent.span {
        span.attempt(
            sent.attempt_span,
            at,
            n,
            sent.status,
            outcome,
            error.map(String::as_str),
        );
        if let (Some(state), true) = (finished, stored.is_ok()) {
            span.finish(ev, state, n);
        }
    }
    count(shared, rt, ev, &end, sent.age);
}

/// Counts an attempt's end in the endpoint's metrics and health.
fn count(
    shared: &Shared,
    rt: &EndpointRuntime,
    ev: &QueuedEvent,
    end: &Disposition,
    age: Duration,
) {
    match end {
        Disposition::Delivered => {
            rt.metrics.delivered.inc();
            rt.metrics.latency.observe(age.as_secs_f64());
            if ev.kind == EventKind::Test {
                shared.health.record_test(&rt.key, &ev.subscription, age);
            }
            shared.health.record(
                &rt.key,
                Outcome::Delivered {
                    latency: age,
                    prior_attempts: ev.attempts,
                },
            );
        }
        Disposition::Retry { error, .. } | Disposition::DeadLetter { error, .. } => {
            if matches!(end, Disposition::Retry { .. }) {
                rt.metrics.retries.inc();
            } else {
                rt.metrics.dead_lettered.inc();
            }
            rt.metrics.failed.inc();
            shared.health.record(
                &rt.key,
                Outcome::Failed {
                    error,
                    prior_attempts: ev.attempts,
                    dead_lettered: matches!(end, Disposition::DeadLetter { .. }),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn failure(permanent: bool) -> Option<Failure> {
        Some(Failure {
            error: "HTTP 503".into(),
            retry_after: None,
            permanent,
        })
    }

    #[test]
    fn disposition_table() {
        let policy = Policy {
            max_attempts: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
            max_age: Duration::from_secs(3600),
            ..Policy::default()
        };
        let young = Duration::from_secs(1);
        let dead = |reason: &str| Disposition::DeadLetter {
            reason: reason.into(),
            error: "HTTP 503".into(),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut d = |f, prior, age| disposition(f, prior, age, &policy, &mut rng);
        assert_eq!(d(None, 2, young), Disposition::Delivered);
        assert!(matches!(
            d(failure(false), 0, young),
            Disposition::Retry { .. }
        ));
        assert!(matches!(
            d(failure(false), 1, young),
            Disposition::Retry { .. }
        ));
        assert_eq!(
            d(failure(false), 2, young),
            dead("HTTP 503 after 3 attempts")
        );
        assert_eq!(
            d(failure(true), 0, young),
            dead("HTTP 503: the destination refused this event")
        );
        // Too old by the time of the next attempt.
        assert_eq!(
            d(failure(false), 0, Duration::from_millis(3_599_500)),
            dead("HTTP 503 after 1 attempts")
        );
    }
}
