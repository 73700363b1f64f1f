//! The one way status is written: server-side apply of the whole computed status on the
//! status subresource under the operator's field manager, and only when it differs from
//! the status the object has.
//!
//! The watch cache can lag behind our own last write (a pass the refresher asks for may
//! start before the cache has seen the previous pass's write). So every kind remembers
//! what it last wrote ([`Written`], kept in its memo): while the cached object is still
//! one our writes were computed from or produced, what we wrote is the status the object
//! has, and the next status is computed from that rather than from the older cache.
//! Once the watch shows the version our last write produced, the cache holds that status
//! and the copy is dropped ([`StatusMemory`]): at thousands of objects the copies would
//! be a second cache.

use kube::api::{Api, Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

pub const FIELD_MANAGER: &str = "webhook-operator";

/// At most this many resourceVersions are remembered per object; a cache older than all
/// of them is taken as it is.
const MAX_UNSEEN: usize = 16;

/// The status last written for one object, and the resourceVersions of the object at
/// which the cache may not show it yet (the one it was computed from and the ones our
/// writes produced).
#[derive(Clone, Debug, PartialEq)]
pub struct Written<S> {
    status: S,
    versions: Vec<String>,
    /// The version our last write produced, as the API server answered.
    produced: Option<String>,
}

/// What a kind's memo keeps of one object's status: the last write while the cache may
/// not show it yet, and the newest version the watch has shown.
#[derive(Clone, Debug)]
pub struct StatusMemory<S> {
    written: Option<Written<S>>,
    seen: Option<String>,
}

impl<S> Default for StatusMemory<S> {
    fn default() -> Self {
        StatusMemory {
            written: None,
            seen: None,
        }
    }
}

impl<S> Written<S> {
    /// The resourceVersion our write produced, as the API server answered.
    pub fn produced(&self) -> Option<&str> {
        self.produced.as_deref()
    }
}

impl<S: Clone> StatusMemory<S> {
    /// The write a pass computes its status from (see [`current`]).
    pub fn written(&self) -> Option<Written<S>> {
        self.written.clone()
    }

    /// Keeps what a write produced, unless the watch has shown its version already.
    pub fn keep(&mut self, written: Written<S>) {
        self.written = (!self.shows(&written)).then_some(written);
    }

    /// The watch shows the object at `version`: the copy of a write it shows is dropped.
    pub fn observe(&mut self, version: Option<&str>) {
        self.seen = version.map(str::to_owned);
        if self.written.as_ref().is_some_and(|w| self.shows(w)) {
            self.written = None;
        }
    }

    fn shows(&self, written: &Written<S>) -> bool {
        written.produced.is_some() && written.produced == self.seen
    }
}

/// The status `obj` has: the one we wrote last while the cached `obj` is at a version our
/// writes started from or produced, else the cached one. Pure.
pub fn current<'a, K>(obj: &'a K, written: Option<&'a Written<K::Status>>) -> Option<&'a K::Status>
where
    K: Resource + HasStatus,
{
    match (written, obj.meta().resource_version.as_deref()) {
        (Some(w), Some(rv)) if w.versions.iter().any(|v| v == rv) => Some(&w.status),
        _ => obj.status(),
    }
}

/// The copy of an object a pass computes its status from: its own while the memo holds
/// our last write ([`current`] tells from the copy's version whether it shows that write);
/// the newest the cache holds once the memo has dropped it. The memo drops a write only
/// when the watch has shown it, and the pass's copy may have been taken before that: its
/// status would then predate our write, and applying a status computed from it would
/// take back what the write set. Pure.
pub fn source<'a, K>(
    obj: &'a K,
    written: Option<&Written<K::Status>>,
    cached: Option<&'a K>,
) -> &'a K
where
    K: Resource + HasStatus,
{
    match (written, cached) {
        (None, Some(newest)) => newest,
        _ => obj,
    }
}

/// The apply patch that brings `current` to `next`, or `None` when there is nothing to
/// write. Pure.
pub fn patch<K, S>(current: Option<&S>, next: &S) -> Option<serde_json::Value>
where
    K: Resource<DynamicType = ()>,
    S: Serialize + PartialEq,
{
    (current != Some(next)).then(|| {
        json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": next,
        })
    })
}

/// What to remember after writing `status` to `obj` (as the cache showed it), which the
/// API server answered with resourceVersion `produced`. Pure.
pub fn remember<K: Resource, S>(
    obj: &K,
    previous: Option<Written<S>>,
    status: S,
    produced: Option<String>,
) -> Written<S> {
    let from = obj.meta().resource_version.clone();
    let mut versions = match previous {
        // Still computing from a cache that does not show our writes: keep their trail.
        Some(p) if from.as_ref().is_some_and(|rv| p.versions.contains(rv)) => p.versions,
        _ => Vec::new(),
    };
    for v in [from, produced.clone()].into_iter().flatten() {
        if !versions.contains(&v) {
            versions.push(v);
        }
    }
    let drop = versions.len().saturating_sub(MAX_UNSEEN);
    versions.drain(..drop);
    Written {
        status,
        versions,
        produced,
    }
}

/// Applies `next` to `obj` unless the status it has (see [`current`]) equals it. Returns
/// what to remember when it wrote, `None` when it did not.
pub async fn apply_if_changed<K>(
    api: &Api<K>,
    obj: &K,
    written: Option<Written<K::Status>>,
    next: K::Status,
) -> Result<Option<Written<K::Status>>, kube::Error>
where
    K: Resource<DynamicType = ()> + HasStatus + Clone + DeserializeOwned + std::fmt::Debug,
    K::Status: Serialize + PartialEq,
{
    let Some(patch) = patch::<K, K::Status>(current(obj, written.as_ref()), &next) else {
        return Ok(None);
    };
    let applied = api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(Some(remember(
        obj,
        written,
        next,
        applied.meta().resource_version.clone(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::subscription::{EventCounters, WebhookSubscriptionStatus};
    use crate::api::{WebhookSubscription, WebhookSubscriptionSpec};

    fn sub_at(rv: &str, received: Option<u64>) -> WebhookSubscription {
        let spec: WebhookSubscriptionSpec = serde_json::from_value(
            json!({"provider": "atllas", "url": "https://x.test/h", "events": []}),
        )
        .expect("a spec");
        let mut sub = WebhookSubscription::new("orders", spec);
        sub.metadata.namespace = Some("ns".into());
        sub.metadata.resource_version = Some(rv.into());
        sub.status = received.map(status);
        sub
    }

    fn status(received: u64) -> WebhookSubscriptionStatus {
        WebhookSubscriptionStatus {
            events: Some(EventCounters {
                received,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_status_an_object_has_is_ours_until_the_cache_moves_past_our_writes() {
        // Cache at "1" (status: 1 received); we computed from "1" and wrote 5 → "2".
        let written = remember(&sub_at("1", Some(1)), None, status(5), Some("2".into()));
        let cases = [
            ("cache predates our write", sub_at("1", Some(1)), Some(5)),
            ("cache shows our write", sub_at("2", Some(5)), Some(5)),
            ("someone wrote after us", sub_at("3", Some(9)), Some(9)),
            ("re-created object, no status", sub_at("7", None), None),
        ];
        for (case, sub, want) in cases {
            let got = current(&sub, Some(&written)).and_then(|s| s.events.as_ref());
            assert_eq!(got.map(|e| e.received), want, "{case}");
        }
        // Nothing written yet: the cache is all there is.
        let sub = sub_at("1", Some(1));
        assert_eq!(current(&sub, None), sub.status.as_ref());
    }

    #[test]
    fn writes_in_a_row_from_a_lagging_cache_keep_the_trail() {
        let lagging = sub_at("1", Some(1));
        let first = remember(&lagging, None, status(5), Some("2".into()));
        let second = remember(&lagging, Some(first), status(6), Some("3".into()));
        // The cache may show any of our writes next; only the last one is the status.
        for rv in ["1", "2", "3"] {
            let received = current(&sub_at(rv, Some(0)), Some(&second))
                .and_then(|s| s.events.as_ref())
                .map(|e| e.received);
            assert_eq!(received, Some(6), "cache at {rv}");
        }
        // Computed from a cache that moved on (someone else wrote): the trail restarts.
        let third = remember(
            &sub_at("9", Some(7)),
            Some(second),
            status(8),
            Some("10".into()),
        );
        assert_eq!(third.versions, ["9", "10"]);
    }

    #[test]
    fn a_kept_write_is_dropped_once_the_watch_shows_it_and_only_then() {
        // Cache at "1"; we wrote and the API server answered "2".
        let write = || remember(&sub_at("1", Some(1)), None, status(5), Some("2".into()));
        let mut memory = StatusMemory::default();
        memory.keep(write());
        for older in [None, Some("1")] {
            memory.observe(older);
            assert_eq!(memory.written(), Some(write()), "watch at {older:?}");
        }
        memory.observe(Some("2"));
        assert_eq!(memory.written(), None, "the cache holds our write");

        // The watch showed the write before the pass came back with it: never kept.
        let mut memory = StatusMemory::default();
        memory.observe(Some("2"));
        memory.keep(write());
        assert_eq!(memory.written(), None);

        // Without the version the API server answered, only a later pass replaces it.
        let unanswered = remember(&sub_at("1", Some(1)), None, status(5), None);
        let mut memory = StatusMemory::default();
        memory.keep(unanswered.clone());
        memory.observe(Some("1"));
        memory.observe(None);
        assert_eq!(memory.written(), Some(unanswered));
    }

    #[test]
    fn a_pass_whose_copy_predates_a_write_the_memo_dropped_computes_from_the_cache() {
        // We wrote 5 received and the API server answered "2"; the watch showed "2", so the
        // memo dropped the copy. The pass's own copy was taken at "1", before the write.
        let copy = sub_at("1", None);
        let cached = sub_at("2", Some(5));
        let from = source(&copy, None, Some(&cached));
        let received = current(from, None)
            .and_then(|s| s.events.as_ref())
            .map(|e| e.received);
        assert_eq!(
            received,
            Some(5),
            "the status our write set, not the copy's"
        );

        // While the memo holds the write, the copy and the trail decide (as before).
        let written = remember(&copy, None, status(5), Some("2".into()));
        let from = source(&copy, Some(&written), Some(&cached));
        assert_eq!(from.meta().resource_version.as_deref(), Some("1"));
        // No cache yet (the first list is not in): the copy is all there is.
        assert_eq!(
            source(&copy, None, None).meta().resource_version.as_deref(),
            Some("1")
        );
    }

    #[test]
    fn the_trail_is_bounded() {
        // The cache always one write behind.
        let mut written = None;
        for i in 1..=40u64 {
            let sub = sub_at(&(i - 1).to_string(), None);
            written = Some(remember(&sub, written, status(i), Some(i.to_string())));
        }
        let written = written.expect("written");
        assert_eq!(written.versions.len(), MAX_UNSEEN);
        assert_eq!(written.versions.last().map(String::as_str), Some("40"));
    }

    #[test]
    fn the_patch_is_the_whole_status_or_nothing() {
        assert_eq!(
            patch::<WebhookSubscription, _>(Some(&status(5)), &status(5)),
            None
        );
        let want = json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1",
            "kind": "WebhookSubscription",
            "status": {"events": {"received": 6}},
        });
        assert_eq!(
            patch::<WebhookSubscription, _>(Some(&status(5)), &status(6)),
            Some(want.clone())
        );
        assert_eq!(
            patch::<WebhookSubscription, _>(None, &status(6)),
            Some(want)
        );
    }
}
