//! What the reconcilers remember about an object between passes, in one place per kind.
//! All of it is in memory only and rebuilt from status after a restart; [`Memo::forget`]
//! drops everything about an object when its finalizer runs, so a deleted and re-created
//! object of the same name starts afresh. Each object's memory is boxed: the table then
//! holds a key and a pointer per slot, not a whole memory per slot, filled or not.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;

use super::routes::EndpointKey;
use super::status::StatusMemory;
use super::subscription::Schedule;
use super::test_event::Pending;
use crate::api::WebhookSubscription;
use crate::api::endpoint::WebhookEndpointStatus;
use crate::api::subscription::WebhookSubscriptionStatus;

/// Per-object memory of one kind: `V` per key, `V::default()` when nothing is known.
#[derive(Debug)]
pub struct Memo<K, V>(Mutex<HashMap<K, Box<V>>>);

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Memo(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash, V: Default> Memo<K, V> {
    /// Reads what is remembered about `key` (the default when nothing is).
    pub fn read<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> R {
        let map = self.0.lock().expect("memo lock");
        match map.get(key) {
            Some(v) => f(v),
            None => f(&V::default()),
        }
    }

    /// Changes what is remembered about `key`.
    pub fn update<R>(&self, key: K, f: impl FnOnce(&mut V) -> R) -> R {
        f(self.0.lock().expect("memo lock").entry(key).or_default())
    }

    /// Changes what is remembered about `key` if anything is; nothing is added.
    pub fn update_existing(&self, key: &K, f: impl FnOnce(&mut V)) {
        if let Some(v) = self.0.lock().expect("memo lock").get_mut(key) {
            f(v);
        }
    }

    /// Forgets everything about `key`: the object was deleted.
    pub fn forget(&self, key: &K) {
        self.0.lock().expect("memo lock").remove(key);
    }

    /// How many objects something is remembered about.
    pub fn len(&self) -> usize {
        self.0.lock().expect("memo lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a WebhookSubscription's passes remember.
#[derive(Clone, Debug, Default)]
pub struct SubscriptionMemory {
    /// When the next provider call is due, and the failures in a row.
    pub schedule: Option<Schedule>,
    /// A test event sent and not yet seen delivered.
    pub pending_test: Option<Pending>,
    /// The last test request handled (the cached object may predate our status write).
    pub handled_test: Option<String>,
    /// The status last written while the cache may predate it.
    pub status: StatusMemory<WebhookSubscriptionStatus>,
}

/// What a WebhookEndpoint's passes remember.
#[derive(Clone, Debug, Default)]
pub struct EndpointMemory {
    /// The last replay request handled (the cached object may predate our status write).
    pub handled_replay: Option<String>,
    /// The status last written while the cache may predate it.
    pub status: StatusMemory<WebhookEndpointStatus>,
}

pub type SubscriptionMemo = Memo<ObjectRef<WebhookSubscription>, SubscriptionMemory>;
pub type EndpointMemo = Memo<EndpointKey, EndpointMemory>;

#[cfg(test)]
mod tests {
    use std::time::{Instant, SystemTime};

    use super::*;

    fn pending() -> Pending {
        Pending {
            requested_at: "t1".into(),
            sent_at: SystemTime::now(),
            started: Instant::now(),
            how: "injected".into(),
        }
    }

    #[test]
    fn forgetting_a_subscription_drops_all_it_remembered_and_nothing_else() {
        let memo = SubscriptionMemo::default();
        let a = ObjectRef::<WebhookSubscription>::new("a").within("ns");
        let b = ObjectRef::<WebhookSubscription>::new("b").within("ns");
        memo.update(a.clone(), |m| {
            m.pending_test = Some(pending());
            m.handled_test = Some("t1".into());
        });
        memo.update(b.clone(), |m| m.handled_test = Some("t9".into()));
        assert!(memo.read(&a, |m| m.pending_test.is_some()));

        memo.forget(&a);
        assert_eq!(memo.len(), 1);
        assert!(memo.read(&a, |m| m.pending_test.is_none() && m.handled_test.is_none()));
        assert_eq!(
            memo.read(&b, |m| m.handled_test.clone()).as_deref(),
            Some("t9")
        );
    }

    #[test]
    fn forgetting_an_endpoint_drops_its_handled_replay() {
        let memo = EndpointMemo::default();
        let key = EndpointKey::new("ns", "orders");
        memo.update(key.clone(), |m| m.handled_replay = Some("r1".into()));
        assert_eq!(
            memo.read(&key, |m| m.handled_replay.clone()).as_deref(),
            Some("r1")
        );
        memo.forget(&key);
        assert!(memo.is_empty());
        assert_eq!(memo.read(&key, |m| m.handled_replay.clone()), None);
    }

    #[test]
    fn updating_only_what_exists_adds_nothing() {
        let memo = EndpointMemo::default();
        let (known, unknown) = (EndpointKey::new("a", "x"), EndpointKey::new("a", "y"));
        memo.update(known.clone(), |m| m.handled_replay = Some("r1".into()));
        memo.update_existing(&unknown, |m| m.handled_replay = Some("r2".into()));
        memo.update_existing(&known, |m| m.handled_replay = Some("r3".into()));
        assert_eq!(memo.len(), 1);
        assert_eq!(
            memo.read(&known, |m| m.handled_replay.clone()).as_deref(),
            Some("r3")
        );
    }
}
