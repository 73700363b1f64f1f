//! Kubernetes Events about the operator's objects. An Event that repeats (same object,
//! type, reason and action) within [`SERIES_WINDOW`] of its last occurrence is counted on
//! the first one as a series (`kubectl describe` shows "x N over …"; the first note stays)
//! instead of being created again.
//!
//! kube's own `Recorder` does the same but keeps every Event it sent in full and scans all
//! of them on every publish, under one lock: with thousands of objects that scan was a
//! visible share of the operator's CPU. Here each remembered Event is its key, its name
//! and its count, and forgetting the old ones costs only as many steps as there are old
//! ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};

/// How long after its last occurrence a repeat still joins an Event's series.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What makes two Events the same series.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SeriesKey {
    regarding: (String, String, String, String),
    warning: bool,
    reason: String,
    action: String,
}

impl SeriesKey {
    fn of(event: &Event, regarding: &ObjectReference) -> Self {
        let field = |f: &Option<String>| f.clone().unwrap_or_default();
        SeriesKey {
            regarding: (
                field(&regarding.namespace),
                field(&regarding.kind),
                field(&regarding.name),
                field(&regarding.uid),
            ),
            warning: event.type_ == EventType::Warning,
            reason: event.reason.clone(),
            action: event.action.clone(),
        }
    }
}

/// An Event sent: its name and how many times it happened, the last at `last`.
struct Sent {
    name: String,
    count: i32,
    last: Instant,
}

/// The Events sent within the window, and when each was last touched, oldest first
/// (an entry whose Event was touched again since is skipped when it comes up).
#[derive(Default)]
struct Recent {
    sent: HashMap<SeriesKey, Sent>,
    touched: VecDeque<(Instant, SeriesKey)>,
}

impl Recent {
    fn forget_before(&mut self, oldest: Instant) {
        while let Some((at, _)) = self.touched.front() {
            if *at >= oldest {
                break;
            }
            let (at, key) = self.touched.pop_front().expect("a front entry");
            if self.sent.get(&key).is_some_and(|s| s.last == at) {
                self.sent.remove(&key);
            }
        }
    }

    fn record(&mut self, key: SeriesKey, name: String, count: i32, at: Instant) {
        self.touched.push_back((at, key.clone()));
        self.sent.insert(
            key,
            Sent {
                name,
                count,
                last: at,
            },
        );
    }
}

pub struct EventRecorder {
    client: Client,
    controller: String,
    instance: String,
    recent: Mutex<Recent>,
}

impl EventRecorder {
    /// Events reported by `controller`, from `instance` (the pod) when known.
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        EventRecorder {
            client,
            instance: instance.unwrap_or_else(|| controller.to_string()),
            controller: controller.to_string(),
            recent: Mutex::default(),
        }
    }

    /// Creates the Event, or counts it on the series of the same Event sent within the
    /// window (a new Event when that one is gone).
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = SeriesKey::of(event, regarding);
        let now = Instant::now();
        let repeat = {
            let mut recent = self.recent.lock().expect("events lock");
            if let Some(oldest) = now.checked_sub(SERIES_WINDOW) {
                recent.forget_before(oldest);
            }
            recent.sent.get(&key).map(|s| (s.name.clone(), s.count + 1))
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let counted = match repeat {
            Some((name, count)) => {
                let series = serde_json::json!({"series": {
                    "count": count,
                    "lastObservedTime": MicroTime(jiff::Timestamp::now()),
                }});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                    .await
                    .ok()
                    .map(|_| (name, count))
            }
            None => None,
        };
        let (name, count) = match counted {
            Some(counted) => counted,
            None => {
                let created = api
                    .create(&PostParams::default(), &self.new_event(event, regarding))
                    .await?;
                (created.metadata.name.unwrap_or_default(), 1)
            }
        };
        self.recent
            .lock()
            .expect("events lock")
            .record(key, name, count, now);
        Ok(())
    }

    fn new_event(&self, event: &Event, regarding: &ObjectReference) -> K8sEvent {
        let now = jiff::Timestamp::now();
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                if event.type_ == EventType::Warning {
                    "Warning"
                } else {
                    "Normal"
                }
                .into(),
            ),
            reason: Some(event.reason.clone()),
            action: Some(event.action.clone()),
            note: event.note.clone(),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> SeriesKey {
        SeriesKey {
            regarding: (
                "ns".into(),
                "WebhookSubscription".into(),
                name.into(),
                "u".into(),
            ),
            warning: false,
            reason: "Created".into(),
            action: "Sync".into(),
        }
    }

    #[test]
    fn an_event_is_forgotten_a_window_after_its_last_occurrence_not_its_first() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut recent = Recent::default();
        recent.record(key("a"), "a.1".into(), 1, at(0));
        recent.record(key("b"), "b.1".into(), 1, at(10));
        // "a" happens again: its series goes on from the new time.
        recent.record(key("a"), "a.1".into(), 2, at(20));

        recent.forget_before(at(15));
        assert_eq!(recent.sent.get(&key("a")).map(|s| s.count), Some(2));
        assert!(
            !recent.sent.contains_key(&key("b")),
            "b last happened at 10"
        );

        recent.forget_before(at(21));
        assert!(recent.sent.is_empty());
        assert!(recent.touched.is_empty());
    }
}
