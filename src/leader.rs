//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection
//! does it: the holder renews `renewTime` every retry period; another candidate takes the
//! Lease over once it has seen no renewal for `leaseDurationSeconds`.
//!
//! Expiry is judged on the candidate's own monotonic clock (when *it* last saw the record
//! change), never by comparing `renewTime` with the local wall clock, so clock skew between
//! replicas cannot cut a lease short. Every write is an update with the read
//! `resourceVersion`, so two candidates can never both win the same round. A leader that
//! cannot renew for `renew_deadline` steps down on its own before anyone may take over.
//!
//! Owns the Lease object and nothing else; [`run_while_leading`] turns the leadership
//! signal into a task that runs only while leading (the reconcilers in `main`).

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Settings of one candidate.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// Unique per replica: the pod name, or a random id.
    pub identity: String,
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops leading (< `lease_duration`).
    pub renew_deadline: Duration,
    /// How often the holder renews and a candidate looks.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// client-go's proportions: renew deadline 2/3 of the duration, retry every ~2/15.
    pub fn new(
        namespace: String,
        lease_name: String,
        identity: String,
        duration: Duration,
    ) -> Self {
        Self {
            namespace,
            lease_name,
            identity,
            lease_duration: duration,
            renew_deadline: duration * 2 / 3,
            retry_period: (duration * 2 / 15).max(Duration::from_millis(500)),
        }
    }

    /// How long the reconcilers get to stop once leadership is lost: half the margin
    /// between the renew deadline and the Lease's expiry, so they are gone before any
    /// other replica may take over.
    pub fn stop_grace(&self) -> Duration {
        self.lease_duration.saturating_sub(self.renew_deadline) / 2
    }
}

/// This replica's identity: `POD_NAME` when set, else a random one.
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("webhook-operator-{:08x}", rand::random::<u32>()))
}

/// What one look at the Lease decided.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Leading,
    Following,
}

struct Observed {
    /// (holder, renewTime, resourceVersion) last seen, and when it was first seen locally.
    record: Option<(Option<String>, Option<String>, Option<String>)>,
    since: Instant,
}

/// Campaigns until `shutdown`; the watch says whether this replica leads. On shutdown a
/// leader gives the Lease up (empty holder), so the next replica does not wait it out.
pub fn spawn(
    client: kube::Client,
    config: LeaderConfig,
    shutdown: CancellationToken,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &config.namespace);
        let mut observed = Observed {
            record: None,
            since: Instant::now(),
        };
        let mut last_renew: Option<Instant> = None;
        loop {
            // A request that hangs (an API server that stopped answering, not refusing)
            // must not outlive the renew deadline: bound every round by what is left of it.
            let budget = match last_renew {
                Some(t) if *tx.borrow() => config.renew_deadline.saturating_sub(t.elapsed()),
                _ => config.renew_deadline,
            }
            .max(Duration::from_millis(100));
            let step = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tokio::time::timeout(budget, try_acquire_or_renew(&api, &config, &mut observed)) => match r {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer from the API server within {budget:?}")),
                },
            };
            match step {
                Ok(Step::Leading) => {
                    last_renew = Some(Instant::now());
                    if !*tx.borrow() {
                        tracing::info!(identity = %config.identity, lease = %config.lease_name, "became leader");
                        tx.send_replace(true);
                    }
                }
                Ok(Step::Following) => {
                    if *tx.borrow() {
                        tracing::warn!(identity = %config.identity, "lost the lease to another replica");
                        tx.send_replace(false);
                    }
                    last_renew = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: Lease request failed");
                    if *tx.borrow()
                        && last_renew.is_none_or(|t| t.elapsed() >= config.renew_deadline)
                    {
                        tracing::warn!(identity = %config.identity, "could not renew the lease in time; stepping down");
                        tx.send_replace(false);
                        last_renew = None;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(config.retry_period) => {}
            }
        }
        if *tx.borrow() {
            tx.send_replace(false);
            release(&api, &config).await;
        }
    });
    (rx, handle)
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaderConfig,
    observed: &mut Observed,
) -> Result<Step, kube::Error> {
    let now = MicroTime(jiff::Timestamp::now());
    let duration_secs = config.lease_duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&config.lease_name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.lease_name.clone()),
                namespace: Some(config.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Step::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Step::Following),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (
        holder.clone(),
        spec.renew_time.as_ref().map(|t| t.0.to_string()),
        lease.metadata.resource_version.clone(),
    );
    if observed.record.as_ref() != Some(&record) {
        observed.record = Some(record);
        observed.since = Instant::now();
    }
    let ours = holder.as_deref() == Some(config.identity.as_str());
    // The holder's own duration counts (it may differ from ours during a rollout).
    let holder_duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(config.lease_duration);
    let expired = holder.is_none() || observed.since.elapsed() >= holder_duration;
    if !ours && !expired {
        return Ok(Step::Following);
    }
    let mut next = spec;
    if !ours {
        next.acquire_time = Some(now.clone());
        next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
        tracing::info!(identity = %config.identity, previous = holder.as_deref().unwrap_or(""), "taking over the lease");
    }
    next.holder_identity = Some(config.identity.clone());
    next.lease_duration_seconds = Some(duration_secs);
    next.renew_time = Some(now);
    lease.spec = Some(next);
    // `replace` sends our resourceVersion: a concurrent writer makes this a 409.
    match api
        .replace(&config.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(Step::Leading),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Step::Following),
        Err(e) => Err(e),
    }
}

/// Empties the holder so another replica can take over at once.
async fn release(api: &Api<Lease>, config: &LeaderConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&config.lease_name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    match api
        .replace(&config.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!(identity = %config.identity, "lease released"),
        Err(e) => tracing::warn!(error = %e, "could not release the lease"),
    }
}

/// Runs `task(token)` each time this replica becomes leader, cancelling the token (and
/// awaiting the task for at most `stop_grace`, then dropping it) when leadership is lost;
/// `follow(token)` runs while not leading. Returns when `shutdown` is cancelled.
pub async fn run_while_leading<L, LF, F, FF>(
    mut leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
    stop_grace: Duration,
    mut lead: L,
    mut follow: F,
) where
    L: FnMut(CancellationToken) -> LF,
    LF: Future<Output = ()>,
    F: FnMut(CancellationToken) -> FF,
    FF: Future<Output = ()>,
{
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let is_leader = *leading.borrow_and_update();
        let token = shutdown.child_token();
        let stop = token.clone();
        let role = if is_leader {
            futures::future::Either::Left(lead(stop))
        } else {
            futures::future::Either::Right(follow(stop))
        };
        tokio::pin!(role);
        let mut finished = false;
        let changed = tokio::select! {
            _ = &mut role => {
                finished = true;
                // The role ended by itself: wait for a change or shutdown before going on.
                tokio::select! {
                    r = leading.changed() => r.is_ok(),
                    _ = shutdown.cancelled() => false,
                }
            }
            r = leading.changed() => r.is_ok(),
        };
        token.cancel();
        if !finished && tokio::time::timeout(stop_grace, &mut role).await.is_err() && is_leader {
            // Requests stuck on an unreachable API server: dropping the future drops them.
            tracing::warn!("reconcilers did not stop within {stop_grace:?}; dropped");
        }
        if is_leader {
            tracing::info!("reconcilers stopped");
        }
        if !changed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roles_switch_with_leadership_and_stop_on_shutdown() {
        let (tx, rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<&str>::new()));
        // A role that logs its start and, once cancelled, its end.
        let role = |start: &'static str, end: &'static str| {
            let log = log.clone();
            move |t: CancellationToken| {
                let l = log.clone();
                async move {
                    l.lock().unwrap().push(start);
                    t.cancelled().await;
                    l.lock().unwrap().push(end);
                }
            }
        };
        let task = tokio::spawn(run_while_leading(
            rx,
            shutdown.clone(),
            Duration::from_secs(5),
            role("lead", "/lead"),
            role("follow", "/follow"),
        ));
        let wait_for = |n: usize| {
            let log = log.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), async {
                    while log.lock().unwrap().len() < n {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await
                .expect("role change in time")
            }
        };
        wait_for(1).await;
        tx.send_replace(true);
        wait_for(3).await;
        tx.send_replace(false);
        wait_for(5).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            vec!["follow", "/follow", "lead", "/lead", "follow", "/follow"]
        );
    }
}
