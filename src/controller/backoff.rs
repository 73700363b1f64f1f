//! Retry timing for failed reconciles: capped exponential backoff with jitter, and a
//! provider's `Retry-After` honoured within the cap.

use std::time::Duration;

pub const BASE: Duration = Duration::from_secs(1);
pub const CAP: Duration = Duration::from_secs(300);

/// Delay before attempt `failures + 1`, after `failures` (≥ 1) failures in a row.
/// `jitter` in [0, 1) spreads retries of many objects (±20 %).
pub fn delay(failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let exp = BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(CAP);
    let jittered = capped.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => jittered.max(ra.min(CAP)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let no_jitter = |n| delay(n, None, 0.5);
        assert_eq!(no_jitter(1), Duration::from_secs(1));
        assert_eq!(no_jitter(2), Duration::from_secs(2));
        assert_eq!(no_jitter(5), Duration::from_secs(16));
        assert_eq!(no_jitter(30), CAP);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        assert_eq!(delay(4, None, 0.0), Duration::from_millis(6400));
        assert_eq!(delay(4, None, 0.999_999).as_millis(), 9599);
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        assert_eq!(
            delay(1, Some(Duration::from_secs(30)), 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(delay(1, Some(Duration::from_secs(3600)), 0.5), CAP);
        // A short Retry-After never shortens the backoff.
        assert_eq!(
            delay(5, Some(Duration::from_secs(1)), 0.5),
            Duration::from_secs(16)
        );
    }
}
