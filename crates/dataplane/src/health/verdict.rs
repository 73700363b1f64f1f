//! The `Healthy` condition of an endpoint as a pure function of its delivery figures.

/// The reasons of the `Healthy` condition and of a destination error: stable CamelCase
/// strings, the same as the operator's condition reasons (a test of the controller holds
/// the two lists equal).
pub mod reasons {
    pub const DELIVERING: &str = "Delivering";
    pub const NO_DELIVERIES: &str = "NoDeliveries";
    pub const DELIVERY_FAILING: &str = "DeliveryFailing";
    pub const DEGRADED: &str = "Degraded";
    pub const BACKLOGGED: &str = "Backlogged";
    pub const DESTINATION_UNRESOLVABLE: &str = "DestinationUnresolvable";
    pub const DESTINATION_FORBIDDEN: &str = "DestinationForbidden";
    /// Failing, and the last failure was a TLS handshake (its error starts with
    /// [`super::TLS_FAILURE`]).
    pub const TLS_HANDSHAKE_FAILED: &str = "TLSHandshakeFailed";
}

/// How every TLS failure of a delivery attempt begins (the delivery client's errors).
pub const TLS_FAILURE: &str = "TLS handshake failed";

/// What the verdict is computed from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerdictInput {
    pub delivered: u64,
    pub failed: u64,
    pub consecutive_failures: u64,
    /// Attempts in the recent window.
    pub window_attempts: usize,
    /// Failed share of the recent window, 0 to 1.
    pub failure_ratio: Option<f64>,
    pub breaker_open: bool,
    pub last_error: Option<String>,
    /// Why the ingress refuses this endpoint's events right now (a bound is reached).
    pub backlog: Option<String>,
}

/// Where healthy ends.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthThresholds {
    /// Consecutive failures that make an endpoint `DeliveryFailing`.
    pub failing_after: u64,
    /// A recent failure ratio above this is `Degraded`.
    pub degraded_ratio: f64,
    /// Fewer attempts in the window say nothing about a ratio.
    pub min_window_attempts: usize,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        Self {
            failing_after: 5,
            degraded_ratio: 0.2,
            min_window_attempts: 10,
        }
    }
}

/// The `Healthy` condition: status, reason (a stable CamelCase string) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    pub reason: &'static str,
    pub message: String,
}

pub fn verdict(i: &VerdictInput, t: &HealthThresholds) -> Verdict {
    let last = i
        .last_error
        .as_deref()
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default();
    if let Some(backlog) = &i.backlog {
        return Verdict {
            healthy: false,
            reason: reasons::BACKLOGGED,
            message: format!(
                "{backlog}; new events are refused with 503 until deliveries catch up{last}"
            ),
        };
    }
    if i.breaker_open || (i.consecutive_failures > 0 && i.consecutive_failures >= t.failing_after) {
        let breaker = if i.breaker_open {
            ", circuit breaker open"
        } else {
            ""
        };
        let tls = i
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(TLS_FAILURE));
        return Verdict {
            healthy: false,
            reason: if tls {
                reasons::TLS_HANDSHAKE_FAILED
            } else {
                reasons::DELIVERY_FAILING
            },
            message: format!(
                "{} consecutive failed attempts{breaker}{last}",
                i.consecutive_failures
            ),
        };
    }
    if let Some(ratio) = i.failure_ratio
        && i.window_attempts >= t.min_window_attempts
        && ratio > t.degraded_ratio
    {
        return Verdict {
            healthy: false,
            reason: reasons::DEGRADED,
            message: format!(
                "{:.0}% of the last {} attempts failed{last}",
                ratio * 100.0,
                i.window_attempts
            ),
        };
    }
    if i.delivered == 0 && i.failed == 0 {
        return Verdict {
            healthy: true,
            reason: reasons::NO_DELIVERIES,
            message: "no deliveries yet".into(),
        };
    }
    Verdict {
        healthy: true,
        reason: reasons::DELIVERING,
        message: match i.failure_ratio {
            Some(r) if i.window_attempts > 0 => format!(
                "recent deliveries succeed ({:.0}% of the last {} attempts failed)",
                r * 100.0,
                i.window_attempts
            ),
            _ => "recent deliveries succeed".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let t = HealthThresholds::default();
        let base = VerdictInput::default();
        let err = Some("HTTP 503".to_string());
        // (name, input, healthy, reason, message fragment)
        let cases: Vec<(&str, VerdictInput, bool, &str, &str)> = vec![
            (
                "nothing yet",
                base.clone(),
                true,
                "NoDeliveries",
                "no deliveries",
            ),
            (
                "all good",
                VerdictInput {
                    delivered: 50,
                    window_attempts: 50,
                    failure_ratio: Some(0.0),
                    ..base.clone()
                },
                true,
                "Delivering",
                "0% of the last 50",
            ),
            (
                "failing",
                VerdictInput {
                    delivered: 3,
                    failed: 5,
                    consecutive_failures: 5,
                    window_attempts: 8,
                    failure_ratio: Some(0.6),
                    last_error: err.clone(),
                    ..base.clone()
                },
                false,
                "DeliveryFailing",
                "5 consecutive failed attempts; last error: HTTP 503",
            ),
            (
                "below failing threshold but degraded",
                VerdictInput {
                    delivered: 30,
                    failed: 20,
                    consecutive_failures: 2,
                    window_attempts: 50,
                    failure_ratio: Some(0.4),
                    last_error: err.clone(),
                    ..base.clone()
                },
                false,
                "Degraded",
                "40% of the last 50 attempts failed; last error: HTTP 503",
            ),
            (
                "ratio at the threshold is healthy",
                VerdictInput {
                    delivered: 80,
                    failed: 20,
                    window_attempts: 100,
                    failure_ratio: Some(0.2),
                    ..base.clone()
                },
                true,
                "Delivering",
                "20%",
            ),
            (
                "too few attempts for a ratio",
                VerdictInput {
                    delivered: 1,
                    failed: 2,
                    consecutive_failures: 2,
                    window_attempts: 3,
                    failure_ratio: Some(0.66),
                    ..base.clone()
                },
                true,
                "Delivering",
                "recent deliveries succeed (66% of the last 3 attempts failed)",
            ),
            (
                "breaker open",
                VerdictInput {
                    failed: 3,
                    consecutive_failures: 3,
                    breaker_open: true,
                    ..base.clone()
                },
                false,
                "DeliveryFailing",
                "circuit breaker open",
            ),
            (
                "failures only, none consecutive threshold",
                VerdictInput {
                    failed: 1,
                    consecutive_failures: 1,
                    window_attempts: 1,
                    failure_ratio: Some(1.0),
                    ..base.clone()
                },
                true,
                "Delivering",
                "recent deliveries succeed (100% of the last 1 attempts failed)",
            ),
            (
                "backlogged wins over failing",
                VerdictInput {
                    failed: 9,
                    consecutive_failures: 9,
                    backlog: Some("10 events waiting (limit 10)".into()),
                    last_error: err.clone(),
                    ..base.clone()
                },
                false,
                "Backlogged",
                "10 events waiting (limit 10); new events are refused with 503",
            ),
        ];
        for (name, input, healthy, reason, fragment) in cases {
            let v = verdict(&input, &t);
            assert_eq!((v.healthy, v.reason), (healthy, reason), "{name}: {v:?}");
            assert!(v.message.contains(fragment), "{name}: {}", v.message);
        }
    }
}
