//! Secret rotation with an overlap window, for the endpoint's Standard Webhooks secret and
//! for a provider's signing secret. The value in force and the one it replaced are kept
//! in an operator-owned Secret (keys below), so a restart keeps the overlap; status only
//! ever sees a hash.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;

/// The value in force at the last pass.
pub const ACTIVE: &str = "active";
/// The value it replaced, still accepted until `PREVIOUS_UNTIL`.
pub const PREVIOUS: &str = "previous";
/// RFC 3339 end of the overlap window.
pub const PREVIOUS_UNTIL: &str = "previous-until";

/// What one pass decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The rotation keys to store (unchanged when nothing rotated or expired).
    pub stored: BTreeMap<String, Vec<u8>>,
    /// Secrets to use, newest first: the current one, and the previous one inside the window.
    pub secrets: Vec<Vec<u8>>,
    /// The current value differs from the one in force last time.
    pub rotated: bool,
    /// When the overlap ends (a pass is due then, to drop the old secret).
    pub overlap_ends: Option<Timestamp>,
}

/// Decides from the stored rotation keys and the current value. Pure.
pub fn decide(
    stored: &BTreeMap<String, Vec<u8>>,
    current: &[u8],
    now: Timestamp,
    overlap: Duration,
) -> Decision {
    let mut next: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    next.insert(ACTIVE.into(), current.to_vec());
    let active = stored.get(ACTIVE);
    let rotated = active.is_some_and(|a| a.as_slice() != current);
    let (previous, until) = if rotated {
        let until = now
            .checked_add(jiff::SignedDuration::try_from(overlap).unwrap_or_default())
            .unwrap_or(now);
        (active.cloned(), Some(until))
    } else {
        let until = stored
            .get(PREVIOUS_UNTIL)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<Timestamp>().ok());
        (stored.get(PREVIOUS).cloned(), until)
    };
    let mut secrets = vec![current.to_vec()];
    let mut overlap_ends = None;
    if let (Some(previous), Some(until)) = (previous, until)
        && until > now
        && previous.as_slice() != current
    {
        secrets.push(previous.clone());
        next.insert(PREVIOUS.into(), previous);
        next.insert(PREVIOUS_UNTIL.into(), until.to_string().into_bytes());
        overlap_ends = Some(until);
    }
    Decision {
        stored: next,
        secrets,
        rotated,
        overlap_ends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn first_pass_records_the_active_value_only() {
        let d = decide(&BTreeMap::new(), b"new", t(100), HOUR);
        assert!(!d.rotated);
        assert_eq!(d.secrets, vec![b"new".to_vec()]);
        assert_eq!(d.stored.get(ACTIVE).unwrap(), b"new");
        assert!(d.overlap_ends.is_none());
    }

    #[test]
    fn a_change_keeps_the_old_value_for_the_window_then_drops_it() {
        let first = decide(&BTreeMap::new(), b"old", t(100), HOUR);
        let rotated = decide(&first.stored, b"new", t(200), HOUR);
        assert!(rotated.rotated);
        assert_eq!(rotated.secrets, vec![b"new".to_vec(), b"old".to_vec()]);
        assert_eq!(rotated.overlap_ends, Some(t(3800)));

        // Inside the window, nothing new: both still used, window unchanged.
        let inside = decide(&rotated.stored, b"new", t(3000), HOUR);
        assert!(!inside.rotated);
        assert_eq!(inside.secrets.len(), 2);
        assert_eq!(inside.overlap_ends, Some(t(3800)));

        // After the window: only the new one.
        let after = decide(&inside.stored, b"new", t(3801), HOUR);
        assert_eq!(after.secrets, vec![b"new".to_vec()]);
        assert!(!after.stored.contains_key(PREVIOUS));
    }

    #[test]
    fn a_second_rotation_inside_the_window_keeps_only_the_latest_previous() {
        let a = decide(&BTreeMap::new(), b"a", t(0), HOUR);
        let b = decide(&a.stored, b"b", t(10), HOUR);
        let c = decide(&b.stored, b"c", t(20), HOUR);
        assert_eq!(c.secrets, vec![b"c".to_vec(), b"b".to_vec()]);
        assert_eq!(c.overlap_ends, Some(t(3620)));
    }

    #[test]
    fn zero_overlap_uses_the_new_value_alone() {
        let a = decide(&BTreeMap::new(), b"a", t(0), Duration::ZERO);
        let b = decide(&a.stored, b"b", t(10), Duration::ZERO);
        assert!(b.rotated);
        assert_eq!(b.secrets, vec![b"b".to_vec()]);
    }
}
