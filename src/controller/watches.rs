//! One watch per kind, shared by everything one role runs: the leader's two controllers
//! and its route priming, or a follower's route sync. Each kind has one cache ([`Store`])
//! and any number of trigger streams subscribed to the same watch.
//!
//! Readiness: a `Store`'s own `wait_until_ready()` wakes only one of its waiters, and the
//! controller reading the store is already one. So everything else
//! [`Watch::cache`] or awaits [`Watches::ready`], which any number of tasks may do.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{Context, api};
use crate::api::{WebhookEndpoint, WebhookSubscription};

/// Objects a subscriber may fall behind the watch before the watch waits for it.
const BUFFER: usize = 1024;

/// One kind's watch: its cache, its subscribers, whether its first list is in.
pub struct Watch<K: Resource<DynamicType = ()> + Clone + 'static> {
    pub store: Store<K>,
    writer: Option<Writer<K>>,
    ready: watch::Receiver<bool>,
    ready_tx: Option<watch::Sender<bool>>,
}

impl<K> Watch<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    fn new() -> Self {
        let (store, writer) = reflector::store_shared(BUFFER);
        let (ready_tx, ready) = watch::channel(false);
        Watch {
            store,
            writer: Some(writer),
            ready,
            ready_tx: Some(ready_tx),
        }
    }

    /// Every object the watch applies (and all of them after each full list). Subscribe
    /// before [`Watches::start`]: a subscriber added later misses the first list.
    ///
    /// Each subscriber is drained into its own [`Pending`] queue at once, so the watch
    /// never waits for a consumer that has not started yet (the controllers start after
    /// the routes are primed from the same caches) or that runs behind it.
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let mut handle = self
            .writer
            .as_ref()
            .and_then(Writer::subscribe)
            .expect("subscribed before the watch started");
        let pending = Arc::new(Pending::default());
        let filled = pending.clone();
        tokio::spawn(async move {
            while let Some(obj) = handle.next().await {
                filled.push(obj);
            }
            filled.close();
        });
        futures::stream::unfold(pending, |pending| async move {
            let next = pending.pop().await?;
            Some((next, pending))
        })
    }

    /// The cache, and whether its first list is in; for readers other than the
    /// controller of the kind (which awaits the store itself).
    pub fn cache(&self) -> Cache<K> {
        Cache {
            store: self.store.clone(),
            ready: self.ready.clone(),
        }
    }

    /// Runs the watch into the cache and the subscribers until `shutdown`.
    fn start(&mut self, api: Api<K>, shutdown: &CancellationToken) {
        let (Some(writer), Some(ready)) = (self.writer.take(), self.ready_tx.take()) else {
            return;
        };
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(slim)
            .reflect_shared(writer);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::pin!(stream);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    next = stream.next() => match next {
                        Some(Ok(watcher::Event::InitDone)) => {
                            ready.send_replace(true);
                        }
                        Some(_) => {}
                        None => return,
                    },
                }
            }
        });
    }

    async fn wait_ready(&self) {
        let _ = self.ready.clone().wait_for(|ready| *ready).await;
    }
}

/// The objects one subscriber has not taken yet, in the order they first changed, each
/// at its newest version: a subscriber that runs behind the watch (a controller at its
/// concurrency limit while thousands of objects are created) holds one entry per changed
/// object, not one copy per change.
struct Pending<K: Resource<DynamicType = ()>> {
    queue: Mutex<PendingQueue<K>>,
    wake: Notify,
}

struct PendingQueue<K: Resource<DynamicType = ()>> {
    order: VecDeque<ObjectRef<K>>,
    newest: HashMap<ObjectRef<K>, Arc<K>>,
    closed: bool,
}

impl<K: Resource<DynamicType = ()>> Default for Pending<K> {
    fn default() -> Self {
        Pending {
            queue: Mutex::new(PendingQueue {
                order: VecDeque::new(),
                newest: HashMap::new(),
                closed: false,
            }),
            wake: Notify::new(),
        }
    }
}

impl<K: Resource<DynamicType = ()>> Pending<K> {
    fn push(&self, obj: Arc<K>) {
        let key = ObjectRef::from_obj(obj.as_ref());
        let mut q = self.queue.lock().expect("pending lock");
        if q.newest.insert(key.clone(), obj).is_none() {
            q.order.push_back(key);
        }
        drop(q);
        self.wake.notify_one();
    }

    fn close(&self) {
        self.queue.lock().expect("pending lock").closed = true;
        self.wake.notify_one();
    }

    /// The next object, or `None` once the watch has ended and everything was taken.
    async fn pop(&self) -> Option<Arc<K>> {
        loop {
            {
                let mut q = self.queue.lock().expect("pending lock");
                while let Some(key) = q.order.pop_front() {
                    if let Some(obj) = q.newest.remove(&key) {
                        return Some(obj);
                    }
                }
                if q.closed {
                    return None;
                }
            }
            // A push between the unlock and here leaves a permit: no wake-up is lost.
            self.wake.notified().await;
        }
    }
}

/// Drops what no reader uses and what would make the caches grow with every write:
/// the managed fields (one entry per field manager and subresource) and kubectl's copy
/// of the last applied object (a Secret's values a second time, for a metadata watch).
fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A kind's cache as readers other than its controller see it.
#[derive(Clone)]
pub struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
    ready: watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Cache<K> {
    /// A cache over `store` whose first list is in, for tests.
    #[cfg(test)]
    pub fn listed(store: Store<K>) -> Self {
        Cache {
            store,
            ready: watch::channel(true).1,
        }
    }

    /// The object as the cache holds it, or `None` while the first list is not in.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Option<Arc<K>>> {
        (*self.ready.borrow()).then(|| self.store.get(&ObjectRef::new(name).within(namespace)))
    }
}

/// The three kinds a role reads.
pub struct Watches {
    pub endpoints: Watch<WebhookEndpoint>,
    pub subscriptions: Watch<WebhookSubscription>,
    /// Secrets by metadata only (their data is read where needed).
    pub secrets: Watch<PartialObjectMeta<Secret>>,
}

impl Watches {
    /// Not started: subscribe first, then [`Watches::start`].
    pub fn new() -> Self {
        Watches {
            endpoints: Watch::new(),
            subscriptions: Watch::new(),
            secrets: Watch::new(),
        }
    }

    /// Starts the three watches in the operator's namespace (or all); they stop with
    /// `shutdown`.
    pub fn start(&mut self, ctx: &Context, shutdown: &CancellationToken) {
        let ns = ctx.watched.namespace.as_deref();
        self.endpoints.start(api(&ctx.client, ns), shutdown);
        self.subscriptions.start(api(&ctx.client, ns), shutdown);
        self.secrets.start(api(&ctx.client, ns), shutdown);
    }

    /// Waits for the three first lists; `false` when `shutdown` came first.
    pub async fn ready(&self, shutdown: &CancellationToken) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = async {
                self.endpoints.wait_ready().await;
                self.subscriptions.wait_ready().await;
                self.secrets.wait_ready().await;
            } => true,
        }
    }
}

impl Default for Watches {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn version(name: &str, rv: &str) -> Arc<ConfigMap> {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.namespace = Some("apps".into());
        cm.metadata.resource_version = Some(rv.into());
        Arc::new(cm)
    }

    #[tokio::test]
    async fn a_subscriber_behind_the_watch_gets_each_object_once_at_its_newest_version() {
        let pending = Pending::default();
        for (name, rv) in [("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("b", "5")] {
            pending.push(version(name, rv));
        }
        pending.close();
        let mut taken = Vec::new();
        while let Some(obj) = pending.pop().await {
            taken.push((
                obj.metadata.name.clone().unwrap_or_default(),
                obj.metadata.resource_version.clone(),
            ));
        }
        let want: Vec<(String, Option<String>)> = [("a", "3"), ("b", "5"), ("c", "4")]
            .iter()
            .map(|(n, rv)| (n.to_string(), Some(rv.to_string())))
            .collect();
        assert_eq!(
            taken, want,
            "first-change order, newest versions, no repeats"
        );
    }

    #[tokio::test]
    async fn a_waiting_subscriber_wakes_for_a_push() {
        let pending: Arc<Pending<ConfigMap>> = Arc::new(Pending::default());
        let waiter = tokio::spawn({
            let pending = pending.clone();
            async move {
                pending
                    .pop()
                    .await
                    .map(|o| o.metadata.resource_version.clone())
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        pending.push(version("a", "7"));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(got, Some(Some("7".into())));
    }
}
