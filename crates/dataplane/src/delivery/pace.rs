//! The consumer's pace: how many requests an endpoint may have in flight now, adapted to
//! its answers (AIMD) within `maxInFlight`. A `429`/`503`, or answers clearly slower than
//! the endpoint's usual, halve the limit (at most once per round trip: answers to requests
//! sent before the last decrease do not decrease it again); each quick answer adds
//! `1/limit`, so a full round of quick answers adds one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one answer says about the destination's pace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// `429` or `503`: the destination asks for fewer requests.
    Overloaded,
    /// Any other answer, after `latency`.
    Answered(Duration),
    /// No answer (transport error, timeout): the breaker's business, not the pace's.
    Nothing,
}

/// Multiplicative decrease.
const DECREASE: f64 = 0.5;
/// How much slower than the usual latency counts as a rise …
const RISE_FACTOR: f64 = 2.0;
/// … and by at least this much (small latencies are noisy).
const RISE_MIN: Duration = Duration::from_millis(20);
/// Weight of a new sample in the recent latency.
const RECENT_WEIGHT: f64 = 0.2;
/// How fast the usual latency follows slower samples (it follows faster ones at once).
const USUAL_DRIFT: f64 = 0.01;

#[derive(Debug)]
struct State {
    limit: f64,
    /// The usual latency: the lowest seen, drifting slowly upwards.
    usual: Option<f64>,
    /// Recent latency (moving average).
    recent: Option<f64>,
    last_decrease: Option<Instant>,
}

/// One endpoint's adaptive in-flight limit.
#[derive(Debug)]
pub struct Pace {
    max: u32,
    adaptive: bool,
    state: Mutex<State>,
}

impl Pace {
    /// Starts at `max_in_flight`; `adaptive: false` keeps it there.
    pub fn new(max_in_flight: u32, adaptive: bool) -> Self {
        let max = max_in_flight.max(1);
        Self {
            max,
            adaptive,
            state: Mutex::new(State {
                limit: f64::from(max),
                usual: None,
                recent: None,
                last_decrease: None,
            }),
        }
    }

    /// Whether this pace is the one for `max_in_flight` and `adaptive`.
    pub fn fits(&self, max_in_flight: u32, adaptive: bool) -> bool {
        self.max == max_in_flight.max(1) && self.adaptive == adaptive
    }

    /// Requests that may be in flight now: 1 to `maxInFlight`.
    pub fn limit(&self) -> usize {
        let st = self.state.lock().expect("pace lock");
        (st.limit.floor() as usize).clamp(1, self.max as usize)
    }

    /// Takes in the answer to a request sent at `sent`. Returns whether the limit went down.
    pub fn on_answer(&self, sent: Instant, signal: Signal, now: Instant) -> bool {
        if !self.adaptive {
            return false;
        }
        let mut st = self.state.lock().expect("pace lock");
        let slow = match signal {
            Signal::Nothing => return false,
            Signal::Overloaded => true,
            Signal::Answered(latency) => st.sample(latency.as_secs_f64()),
        };
        if slow {
            // Sent before the last decrease: that decrease already answered for it.
            if st.last_decrease.is_some_and(|at| sent < at) {
                return false;
            }
            st.limit = (st.limit * DECREASE).max(1.0);
            st.last_decrease = Some(now);
            // The rise is answered; judge the next round by its own answers.
            st.recent = st.usual;
            true
        } else {
            st.limit = (st.limit + 1.0 / st.limit).min(f64::from(self.max));
            false
        }
    }
}

impl State {
    /// Records a latency sample; returns whether recent answers are clearly slower than usual.
    fn sample(&mut self, secs: f64) -> bool {
        let usual = match self.usual {
            Some(u) if secs >= u => u + (secs - u) * USUAL_DRIFT,
            _ => secs,
        };
        let recent = match self.recent {
            Some(r) => r + (secs - r) * RECENT_WEIGHT,
            None => secs,
        };
        self.usual = Some(usual);
        self.recent = Some(recent);
        recent > usual * RISE_FACTOR && recent - usual > RISE_MIN.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Quick answers to requests sent one at a time from `t`, `n` of them.
    fn quick(p: &Pace, t: &mut Instant, n: usize, latency: Duration) {
        for _ in 0..n {
            let sent = *t;
            *t += latency;
            p.on_answer(sent, Signal::Answered(latency), *t);
        }
    }

    #[test]
    fn starts_at_max_and_halves_on_429_once_per_round() {
        let p = Pace::new(64, true);
        assert_eq!(p.limit(), 64);
        let t0 = Instant::now();
        let t1 = t0 + 10 * MS;
        // A whole window of 429s to requests sent at t0: one halving, not 64.
        assert!(p.on_answer(t0, Signal::Overloaded, t1));
        for _ in 0..63 {
            assert!(!p.on_answer(t0, Signal::Overloaded, t1));
        }
        assert_eq!(p.limit(), 32);
        // A 429 to a request sent after the decrease halves again.
        assert!(p.on_answer(t1 + MS, Signal::Overloaded, t1 + 2 * MS));
        assert_eq!(p.limit(), 16);
        // Never below one.
        let mut t = t1 + 3 * MS;
        for _ in 0..20 {
            p.on_answer(t, Signal::Overloaded, t + MS);
            t += 2 * MS;
        }
        assert_eq!(p.limit(), 1);
    }

    #[test]
    fn grows_back_by_one_per_round_of_quick_answers_up_to_max() {
        let p = Pace::new(8, true);
        let mut t = Instant::now();
        p.on_answer(t, Signal::Overloaded, t + MS);
        p.on_answer(t + 2 * MS, Signal::Overloaded, t + 3 * MS);
        assert_eq!(p.limit(), 2);
        t += 4 * MS;
        // About one more per round of quick answers (2.5, 2.9, 3.2).
        quick(&p, &mut t, 3, 5 * MS);
        assert_eq!(p.limit(), 3);
        quick(&p, &mut t, 3, 5 * MS);
        assert_eq!(p.limit(), 4);
        quick(&p, &mut t, 1000, 5 * MS);
        assert_eq!(p.limit(), 8, "capped at maxInFlight");
    }

    #[test]
    fn a_latency_rise_decreases_and_noise_does_not() {
        let p = Pace::new(32, true);
        let mut t = Instant::now();
        quick(&p, &mut t, 50, 20 * MS);
        assert_eq!(p.limit(), 32);
        // Jitter around 20 ms, and small latencies doubling (1 → 3 ms): no decrease.
        for l in [25, 15, 30, 18, 35, 22] {
            quick(&p, &mut t, 1, l * MS);
        }
        assert_eq!(p.limit(), 32);
        let q = Pace::new(32, true);
        quick(&q, &mut t, 50, MS);
        quick(&q, &mut t, 50, 3 * MS);
        assert_eq!(q.limit(), 32);
        // The consumer slows down to 200 ms: the limit goes down within a few answers.
        let mut decreased = 0;
        for _ in 0..10 {
            let sent = t;
            t += 200 * MS;
            if p.on_answer(sent, Signal::Answered(200 * MS), t) {
                decreased += 1;
            }
        }
        assert!(decreased >= 1, "no decrease on a tenfold latency rise");
        assert!(p.limit() <= 16, "limit {}", p.limit());
    }

    #[test]
    fn a_slow_consumer_becomes_the_usual_one() {
        // Slower for good: after the decrease, the limit grows again as 200 ms becomes usual.
        let p = Pace::new(32, true);
        let mut t = Instant::now();
        quick(&p, &mut t, 50, 20 * MS);
        quick(&p, &mut t, 2000, 200 * MS);
        assert_eq!(p.limit(), 32);
    }

    #[test]
    fn fixed_concurrency_ignores_the_answers() {
        let p = Pace::new(16, false);
        let t = Instant::now();
        for _ in 0..10 {
            assert!(!p.on_answer(t, Signal::Overloaded, t + MS));
        }
        assert_eq!(p.limit(), 16);
        assert_eq!(Pace::new(0, true).limit(), 1);
    }

    #[test]
    fn no_answer_changes_nothing() {
        let p = Pace::new(16, true);
        let t = Instant::now();
        assert!(!p.on_answer(t, Signal::Nothing, t + MS));
        assert_eq!(p.limit(), 16);
    }
}
