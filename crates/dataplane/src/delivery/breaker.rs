//! A circuit breaker per destination: after `threshold` consecutive failures no event is
//! sent for a cool-down; then exactly one probe goes out, and its outcome closes or reopens
//! the breaker. Events wait meanwhile; they are neither dropped nor charged attempts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Cool-down over; `probing` while the single probe is out.
    HalfOpen {
        probing: bool,
    },
}

/// What a worker may send now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// As much as the other limits allow.
    Open,
    /// One probe; its outcome must be reported (or `abandon_probe` if it never went out).
    Probe,
    /// Nothing until then.
    Wait(Duration),
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut st = self.state.lock().expect("breaker lock");
        match *st {
            State::Closed { .. } => Admission::Open,
            State::Open { until } if now < until => Admission::Wait(until - now),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *st = State::HalfOpen { probing: true };
                Admission::Probe
            }
            // The probe's outcome decides; look again shortly.
            State::HalfOpen { probing: true } => Admission::Wait(Duration::from_millis(50)),
        }
    }

    pub fn abandon_probe(&self) {
        let mut st = self.state.lock().expect("breaker lock");
        if *st == (State::HalfOpen { probing: true }) {
            *st = State::HalfOpen { probing: false };
        }
    }

    pub fn on_success(&self) {
        *self.state.lock().expect("breaker lock") = State::Closed { failures: 0 };
    }

    /// Returns whether this failure opened the breaker.
    pub fn on_failure(&self, now: Instant) -> bool {
        let mut st = self.state.lock().expect("breaker lock");
        match *st {
            State::Closed { failures } if failures + 1 >= self.threshold => {
                *st = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
            State::Closed { failures } => {
                *st = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::HalfOpen { .. } => {
                *st = State::Open {
                    until: now + self.cooldown,
                };
                true
            }
            // A late failure of a request sent before opening: the cool-down stands.
            State::Open { .. } => false,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(
            *self.state.lock().expect("breaker lock"),
            State::Closed { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_probes_and_closes() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Admission::Open);
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert!(b.on_failure(t0), "third failure opens");
        assert!(b.is_open());
        assert_eq!(
            b.admit(t0 + Duration::from_secs(4)),
            Admission::Wait(Duration::from_secs(6))
        );
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert!(
            matches!(b.admit(t1), Admission::Wait(_)),
            "one probe at a time"
        );
        assert!(b.on_failure(t1), "failed probe reopens");
        assert!(matches!(
            b.admit(t1 + Duration::from_secs(1)),
            Admission::Wait(_)
        ));
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.admit(t2), Admission::Probe);
        b.abandon_probe();
        assert_eq!(
            b.admit(t2),
            Admission::Probe,
            "an unsent probe can be retried"
        );
        b.on_success();
        assert!(!b.is_open());
        assert_eq!(b.admit(t2), Admission::Open);
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1));
        let t = Instant::now();
        b.on_failure(t);
        b.on_success();
        assert!(!b.on_failure(t));
        assert!(b.on_failure(t));
    }
}
