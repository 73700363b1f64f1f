//! Building `metav1.Condition` lists the kstatus way: `lastTransitionTime` moves only when
//! a condition's status flips, and every condition carries the observed generation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The desired state of one condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The new condition list: `desired` in order, keeping each existing condition's
/// `lastTransitionTime` when its status did not change. Conditions not in `desired` are
/// dropped (the reconciler states every condition it owns on every pass).
pub fn merge(
    existing: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" };
            let last_transition_time = existing
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: d.type_.to_string(),
                status: status.to_string(),
                reason: d.reason.to_string(),
                message: d.message.clone(),
                last_transition_time,
                observed_generation: generation,
            }
        })
        .collect()
}

/// Now, to the second (the API server stores seconds; comparing finer times would make
/// every status look changed).
pub fn now() -> Time {
    Time(
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .expect("rounding now to seconds"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = merge(
            &[],
            &[Desired::new("Ready", false, "Progressing", "wait")],
            Some(1),
            t(100),
        );
        assert_eq!(first[0].last_transition_time, t(100));
        assert_eq!(first[0].status, "False");
        assert_eq!(first[0].observed_generation, Some(1));

        // Same status, new reason and message: time kept.
        let same = merge(
            &first,
            &[Desired::new("Ready", false, "EndpointNotReady", "still")],
            Some(2),
            t(200),
        );
        assert_eq!(same[0].last_transition_time, t(100));
        assert_eq!(same[0].reason, "EndpointNotReady");
        assert_eq!(same[0].observed_generation, Some(2));

        // Flip: time moves.
        let flipped = merge(
            &same,
            &[Desired::new("Ready", true, "Ready", "ok")],
            Some(2),
            t(300),
        );
        assert_eq!(flipped[0].last_transition_time, t(300));
        assert_eq!(flipped[0].status, "True");
    }

    #[test]
    fn desired_order_is_kept_and_stale_types_dropped() {
        let existing = merge(
            &[],
            &[Desired::new("Stalled", true, "InvalidSpec", "x")],
            None,
            t(1),
        );
        let merged = merge(
            &existing,
            &[
                Desired::new("Ready", true, "Ready", ""),
                Desired::new("Synced", true, "Synced", ""),
            ],
            None,
            t(2),
        );
        let types: Vec<_> = merged.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Synced"]);
    }
}
