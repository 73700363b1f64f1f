//! The route handshake: a subscription's hook URL is registered at its provider (or changed
//! there) only once every ready replica's ingress routes it.
//!
//! Each follower keeps its own Lease in the leader Lease's namespace,
//! `<lease-name>-replica-<identity>` (label [`REPLICA_LABEL`]), created once its routes are
//! loaded, renewed every [`RENEW`], deleted when it stops following (shutdown, or it became
//! the leader). Its annotation [`ROUTED_ANNOTATION`] is the WebhookSubscription
//! resourceVersion through which the replica has applied routes: the highest
//! resourceVersion in its subscription cache after a route sync in which every
//! subscription that must route (see `route_sync`) did route.
//!
//! The leader, before registering a URL, writes the `Routed=False/RoutesPending` marker to
//! the subscription's status, takes the resourceVersion `W` of that write and waits
//! ([`Replicas::wait_routed`]) until every live replica reports `>= W`.
//!
//! Ordering assumption: resourceVersions of one resource type are the etcd revision, an
//! integer that grows with every write, and one cluster-wide watch delivers a kind's
//! changes in that order. So a replica whose cache holds a subscription at `rv >= W` has
//! applied every subscription change up to `W`, the marker included. (Kubernetes calls
//! resourceVersions opaque; every etcd-backed API server behaves this way. A version that
//! does not parse as an integer skips the handshake, logged.)
//!
//! Liveness is judged on the leader's own clock, as in [`crate::leader`]: a replica Lease
//! not seen to change for its `leaseDurationSeconds` is dead (a SIGKILLed replica cannot
//! delete it) and is not waited for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The label every replica Lease carries; its value is the leader Lease's name.
pub const REPLICA_LABEL: &str = "hooks.webhook-operator.dev/replica-of";
/// The WebhookSubscription resourceVersion through which the replica routes.
pub const ROUTED_ANNOTATION: &str = "hooks.webhook-operator.dev/routed-resource-version";
/// How often a follower renews its replica Lease.
pub const RENEW: Duration = Duration::from_secs(2);
/// A replica Lease not renewed for this long is dead.
const DURATION: Duration = Duration::from_secs(10);
/// How long the leader waits for the replicas before it reports `RoutesPending`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const FIELD_MANAGER: &str = "webhook-operator-replica";

/// Where the replica Leases live and who this replica is.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub namespace: String,
    /// The leader Lease's name.
    pub lease_name: String,
    pub identity: String,
}

impl ReplicaConfig {
    pub fn from_leader(l: &crate::leader::LeaderConfig) -> Self {
        ReplicaConfig {
            namespace: l.namespace.clone(),
            lease_name: l.lease_name.clone(),
            identity: l.identity.clone(),
        }
    }

    /// This replica's own Lease.
    pub fn own_lease(&self) -> String {
        let mut name = format!("{}-replica-{}", self.lease_name, self.identity);
        name.truncate(253);
        name
    }
}

/// The resourceVersion as the integer it is on an etcd-backed API server.
pub fn version(rv: Option<&str>) -> Option<u64> {
    rv?.parse().ok()
}

/// A follower's own replica Lease.
pub struct OwnLease {
    api: Api<Lease>,
    config: ReplicaConfig,
    /// What the Lease says now, once written.
    reported: Option<u64>,
}

impl OwnLease {
    pub fn new(client: Client, config: ReplicaConfig) -> Self {
        OwnLease {
            api: Api::namespaced(client, &config.namespace),
            config,
            reported: None,
        }
    }

    /// Says routes are applied through `routed` at once when that moved; else nothing.
    pub async fn report(&mut self, routed: u64) {
        if self.reported != Some(routed) {
            self.write(routed).await;
        }
    }

    /// Renews the Lease (after the first report).
    pub async fn renew(&mut self) {
        if let Some(routed) = self.reported {
            self.write(routed).await;
        }
    }

    async fn write(&mut self, routed: u64) {
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.config.own_lease(),
                "labels": {REPLICA_LABEL: self.config.lease_name},
                "annotations": {ROUTED_ANNOTATION: routed.to_string()},
            },
            "spec": {
                "holderIdentity": self.config.identity,
                "leaseDurationSeconds": DURATION.as_secs(),
                "renewTime": MicroTime(jiff::Timestamp::now()),
            },
        });
        match self
            .api
            .patch(
                &self.config.own_lease(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            Ok(_) => {
                if self.reported != Some(routed) {
                    tracing::debug!(routed, "replica lease: routes applied through");
                }
                self.reported = Some(routed);
            }
            Err(e) => tracing::warn!(error = %e, "could not write the replica lease"),
        }
    }

    /// Deletes the Lease: this replica no longer follows.
    pub async fn remove(&self) {
        if self.reported.is_none() {
            return;
        }
        match self
            .api
            .delete(&self.config.own_lease(), &DeleteParams::default())
            .await
        {
            Ok(_) => tracing::info!("replica lease deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(error = %e, "could not delete the replica lease"),
        }
    }
}

/// One replica Lease as the leader saw it.
#[derive(Clone, Debug)]
struct Seen {
    identity: String,
    routed: Option<u64>,
    resource_version: Option<String>,
    /// When this version was first seen here.
    at: Instant,
    duration: Duration,
}

type Table = Option<HashMap<String, Seen>>;

/// The leader's view of the replica Leases (a watch).
pub struct Replicas {
    state: watch::Receiver<Table>,
    own: String,
}

impl Replicas {
    /// Watches the replica Leases until `shutdown`.
    pub fn start(client: Client, config: &ReplicaConfig, shutdown: &CancellationToken) -> Self {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let (tx, state) = watch::channel(None);
        let selector = format!("{REPLICA_LABEL}={}", config.lease_name);
        let stream = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::pin!(stream);
            let mut listing: HashMap<String, Seen> = HashMap::new();
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = stream.next() => e,
                };
                match event {
                    None => return,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "replica lease watch failed; retrying")
                    }
                    Some(Ok(watcher::Event::Init)) => listing.clear(),
                    Some(Ok(watcher::Event::InitApply(l))) => {
                        let old: Option<Seen> = tx
                            .borrow()
                            .as_ref()
                            .and_then(|t: &HashMap<String, Seen>| t.get(&l.name_any()).cloned());
                        listing.insert(l.name_any(), seen(&l, old.as_ref()));
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        tx.send_replace(Some(std::mem::take(&mut listing)));
                    }
                    Some(Ok(watcher::Event::Apply(l))) => tx.send_modify(|t| {
                        let t = t.get_or_insert_with(HashMap::new);
                        let next = seen(&l, t.get(&l.name_any()));
                        t.insert(l.name_any(), next);
                    }),
                    Some(Ok(watcher::Event::Delete(l))) => tx.send_modify(|t| {
                        if let Some(t) = t.as_mut() {
                            t.remove(&l.name_any());
                        }
                    }),
                }
            }
        });
        Replicas {
            state,
            own: config.own_lease(),
        }
    }

    /// Waits until every live replica but this one reports routes applied through `rv`.
    /// `Ok(n)`: `n` replicas confirmed; `Err`: the identities still behind at `timeout`.
    pub async fn wait_routed(&self, rv: u64, timeout: Duration) -> Result<usize, Vec<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.state.clone();
        loop {
            let (pending, confirmed) = {
                let table = rx.borrow_and_update();
                match table.as_ref() {
                    None => (vec!["(replica Leases not listed yet)".to_string()], 0),
                    Some(t) => {
                        let live: Vec<&Seen> = t
                            .iter()
                            .filter(|(name, s)| **name != self.own && s.at.elapsed() < s.duration)
                            .map(|(_, s)| s)
                            .collect();
                        let pending: Vec<String> = live
                            .iter()
                            .filter(|s| s.routed.is_none_or(|r| r < rv))
                            .map(|s| s.identity.clone())
                            .collect();
                        (pending, live.len())
                    }
                }
            };
            if pending.is_empty() {
                return Ok(confirmed);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Err(pending) },
                _ = tokio::time::sleep_until(deadline) => return Err(pending),
                // A replica that died stops counting once its Lease expires.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

fn seen(lease: &Lease, before: Option<&Seen>) -> Seen {
    let resource_version = lease.resource_version();
    // The same version seen again (a re-list) is not a renewal.
    let at = match before {
        Some(b) if b.resource_version == resource_version => b.at,
        _ => Instant::now(),
    };
    let spec = lease.spec.clone().unwrap_or_default();
    Seen {
        identity: spec.holder_identity.unwrap_or_else(|| lease.name_any()),
        routed: version(
            lease
                .annotations()
                .get(ROUTED_ANNOTATION)
                .map(String::as_str),
        ),
        resource_version,
        at,
        duration: spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(1) as u64))
            .unwrap_or(DURATION),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, rv: &str, routed: Option<&str>) -> Lease {
        let mut l = Lease::default();
        l.metadata.name = Some(name.into());
        l.metadata.resource_version = Some(rv.into());
        if let Some(r) = routed {
            l.metadata.annotations = Some([(ROUTED_ANNOTATION.to_string(), r.to_string())].into());
        }
        l
    }

    fn replicas(table: Table) -> (watch::Sender<Table>, Replicas) {
        let (tx, state) = watch::channel(table);
        (
            tx,
            Replicas {
                state,
                own: "wo-replica-me".into(),
            },
        )
    }

    #[tokio::test]
    async fn the_leader_waits_for_every_live_replica_but_itself() {
        let now = |name: &str, rv: &str, routed: &str| {
            (name.to_string(), seen(&lease(name, rv, Some(routed)), None))
        };
        let mut dead = seen(&lease("wo-replica-dead", "1", Some("1")), None);
        dead.at = Instant::now() - Duration::from_secs(30);
        let table: HashMap<String, Seen> = [
            now("wo-replica-a", "5", "100"),
            now("wo-replica-me", "6", "1"),
            ("wo-replica-dead".to_string(), dead),
        ]
        .into();
        let (tx, r) = replicas(Some(table));
        assert_eq!(r.wait_routed(100, Duration::from_millis(50)).await, Ok(1));
        assert_eq!(
            r.wait_routed(101, Duration::from_millis(50)).await,
            Err(vec!["wo-replica-a".to_string()])
        );
        let waiter = tokio::spawn(async move { r.wait_routed(101, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_modify(|t| {
            let t = t.as_mut().unwrap();
            let a = seen(
                &lease("wo-replica-a", "7", Some("120")),
                t.get("wo-replica-a"),
            );
            t.insert("wo-replica-a".into(), a);
        });
        assert_eq!(waiter.await.unwrap(), Ok(1));
    }

    #[tokio::test]
    async fn nothing_is_confirmed_before_the_leases_are_listed() {
        let (_tx, r) = replicas(None);
        assert!(r.wait_routed(1, Duration::from_millis(20)).await.is_err());
    }

    #[test]
    fn a_relisted_lease_is_not_a_renewal() {
        let first = seen(&lease("a", "5", None), None);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(seen(&lease("a", "5", None), Some(&first)).at, first.at);
        assert!(seen(&lease("a", "6", None), Some(&first)).at > first.at);
    }
}
