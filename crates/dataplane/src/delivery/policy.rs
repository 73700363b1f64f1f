//! The delivery policy in force for one endpoint (the controller parses it from the
//! API's strings once), and the retry schedule it implies.

use std::time::Duration;

use rand::Rng;

/// Backoff shape between delivery attempts; jitter is always added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backoff {
    /// initialDelay × 2^(attempt−1), capped at maxDelay.
    #[default]
    Exponential,
    /// initialDelay × attempt, capped at maxDelay.
    Linear,
}

/// Parsed `spec.delivery`.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub timeout: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Older events are dead-lettered instead of retried.
    pub max_age: Duration,
    pub max_in_flight: u32,
    /// Adapt the requests in flight to the destination's answers, within `max_in_flight`
    /// (see `pace`); off: always `max_in_flight`.
    pub adaptive_concurrency: bool,
    /// 0: unlimited.
    pub rate_per_second: u32,
    pub dead_letter_retention: Duration,
}

/// The API's defaults (the controller's conversion of a default `spec.delivery` is held
/// equal to this by a test).
impl Default for Policy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_attempts: 8,
            backoff: Backoff::Exponential,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            max_age: Duration::from_secs(24 * 3600),
            max_in_flight: 16,
            adaptive_concurrency: true,
            rate_per_second: 0,
            dead_letter_retention: Duration::from_secs(168 * 3600),
        }
    }
}

impl Policy {
    /// Delay before the next attempt after `failed_attempts` failures (≥ 1): the backoff
    /// shape, ±20 % jitter so that retries of a burst spread out, capped at `max_delay`.
    /// A destination's `Retry-After` (on `429`/`503`) sets it instead, whether shorter or
    /// longer, capped at [`RETRY_AFTER_CAP`].
    pub fn retry_delay(
        &self,
        failed_attempts: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Duration {
        let n = failed_attempts.max(1);
        let base = match self.backoff {
            Backoff::Exponential => self
                .initial_delay
                .saturating_mul(2u32.saturating_pow((n - 1).min(31))),
            Backoff::Linear => self.initial_delay.saturating_mul(n),
        };
        let base = base.min(self.max_delay);
        let jittered = base
            .mul_f64(rng.random_range(0.8..=1.2))
            .min(self.max_delay);
        match retry_after {
            Some(ra) => ra.min(RETRY_AFTER_CAP),
            None => jittered,
        }
    }
}

/// The longest a destination's `Retry-After` may hold an event back (a longer one, or an
/// HTTP date further away, waits this long).
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// Reads `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let secs = at.as_second() - now.as_second();
    Some(Duration::from_secs(secs.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy(backoff: Backoff) -> Policy {
        Policy {
            backoff,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            ..Policy::default()
        }
    }

    #[test]
    fn backoff_shapes_with_bounded_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // (backoff, failed attempts, expected base in seconds)
        let cases = [
            (Backoff::Exponential, 1, 1.0),
            (Backoff::Exponential, 3, 4.0),
            (Backoff::Exponential, 7, 60.0),
            (Backoff::Exponential, 99, 60.0),
            (Backoff::Linear, 1, 1.0),
            (Backoff::Linear, 5, 5.0),
            (Backoff::Linear, 500, 60.0),
        ];
        for (b, n, base) in cases {
            for _ in 0..50 {
                let d = policy(b).retry_delay(n, None, &mut rng).as_secs_f64();
                assert!(
                    d >= base * 0.8 - 1e-9 && d <= (base * 1.2).min(60.0) + 1e-9,
                    "{b:?} {n}: {d}"
                );
            }
        }
    }

    #[test]
    fn retry_after_sets_the_delay_capped_at_ten_minutes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p = policy(Backoff::Exponential);
        // Longer than the backoff, and longer than maxDelay (60 s): the consumer's word.
        let d = p.retry_delay(1, Some(Duration::from_secs(30)), &mut rng);
        assert_eq!(d, Duration::from_secs(30));
        let d = p.retry_delay(1, Some(Duration::from_secs(120)), &mut rng);
        assert_eq!(d, Duration::from_secs(120));
        // Past the cap: the cap.
        let d = p.retry_delay(1, Some(Duration::from_secs(3600)), &mut rng);
        assert_eq!(d, RETRY_AFTER_CAP);
        assert_eq!(RETRY_AFTER_CAP, Duration::from_secs(600));
        // Shorter than the backoff (4 s ± 20 % at the third failure): sooner.
        let d = p.retry_delay(3, Some(Duration::from_secs(1)), &mut rng);
        assert_eq!(d, Duration::from_secs(1));
        let d = p.retry_delay(3, Some(Duration::ZERO), &mut rng);
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn an_http_date_past_the_cap_waits_the_cap() {
        let now = jiff::Timestamp::from_second(784_111_777).unwrap(); // Sun, 06 Nov 1994 08:49:37 GMT
        let ra = parse_retry_after("Sun, 06 Nov 1994 10:49:37 GMT", now);
        assert_eq!(ra, Some(Duration::from_secs(7200)));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let d = policy(Backoff::Linear).retry_delay(1, ra, &mut rng);
        assert_eq!(d, RETRY_AFTER_CAP);
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = jiff::Timestamp::from_second(784_111_777).unwrap(); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
