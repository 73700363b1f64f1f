//! The schedule gate: whether a pass calls the provider ([`gate`]) and when the next one is
//! due ([`next_pass`]). Pure.

use super::*;

/// Inputs whose change makes a pass due at once, whatever the schedule says.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(super) struct Inputs {
    pub(super) generation: Option<i64>,
    pub(super) credentials_version: Option<String>,
    pub(super) hook_url: Option<String>,
    pub(super) requested_at: Option<String>,
    /// A test request not handled yet.
    pub(super) test_request: Option<String>,
}

/// When the next provider call for an object is due, and how many failures in a row.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub(super) inputs: Inputs,
    pub(super) next_due: Instant,
    pub(super) failures: u32,
}

/// What the schedule gate decided for a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Gate {
    /// Call the provider; `failures_before` failures in a row with the same inputs.
    Run { failures_before: u32 },
    /// Nothing changed and nothing is due: only refresh counters and a pending test, and
    /// come back after this long.
    Wait(Duration),
}

/// Whether a pass calls the provider. Pure: a pass is due when there is no schedule yet,
/// an input changed (spec, credentials Secret, target URL, a request annotation, a new
/// test request), the schedule's time has come, or signature verification flipped. The
/// failure count carries over only while the inputs stay the same.
pub(super) fn gate(
    schedule: Option<&Schedule>,
    inputs: &Inputs,
    verification_flipped: bool,
    now: Instant,
) -> Gate {
    match schedule {
        Some(s) if s.inputs == *inputs && now < s.next_due && !verification_flipped => {
            Gate::Wait(s.next_due - now)
        }
        Some(s) if s.inputs == *inputs => Gate::Run {
            failures_before: s.failures,
        },
        _ => Gate::Run { failures_before: 0 },
    }
}

/// How long until the next provider call after `outcome`, and the failures in a row.
/// Pure; `jitter` in [0, 1) spreads retries.
pub(super) fn next_pass(
    outcome: &Outcome,
    resync_interval: &str,
    failures_before: u32,
    jitter: f64,
) -> (Duration, u32) {
    let resync =
        crate::duration::parse_go_duration(resync_interval).unwrap_or(Duration::from_secs(300));
    match outcome {
        Outcome::Synced { .. } | Outcome::MissingUpstream | Outcome::Manual { .. } => (resync, 0),
        // Waits for the endpoint or the Secret to change (both are watched); the timer
        // is a safety net.
        // The endpoint check is a cheap read: recheck soon, in case a watch event came
        // before this object was in the store.
        Outcome::EndpointNotReady(_) => (Duration::from_secs(10), 0),
        Outcome::CredentialsMissing(_) => (Duration::from_secs(60), 0),
        // The replicas' Leases are watched only during a pass: look again soon.
        Outcome::RoutesPending(_) => (Duration::from_secs(5), 0),
        Outcome::Failed(err) => {
            let failures = failures_before + 1;
            (
                crate::controller::backoff::delay(failures, err.retry_after(), jitter),
                failures,
            )
        }
    }
}
