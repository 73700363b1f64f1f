//! Delivery health merged across replicas.
//!
//! With several replicas every one delivers, but only the Lease holder writes status. So
//! every replica publishes its delivery outcomes (batched, at most every 200 ms) on the
//! core NATS subject `<prefix>.health`, and every replica records the other replicas'
//! outcomes into its own [`HealthRegistry`] with [`HealthRegistry::record_remote`]. Each
//! registry then counts the whole cluster's deliveries, and whichever replica leads (now or
//! after a takeover) writes the merged numbers.
//!
//! Why core NATS and not JetStream: these are counters for status, not events; a lost batch
//! (a replica dying, the server restarting) makes counts low by that batch, never loses an
//! event, and costs no storage. Destination errors and breaker state stay per replica:
//! each replica judges its own path to the destination.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{HealthRegistry, Outcome};
use crate::queue::EndpointKey;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum WireOutcome {
    Delivered {
        ns: String,
        name: String,
        latency_ms: u64,
        prior: u32,
    },
    Failed {
        ns: String,
        name: String,
        error: String,
        prior: u32,
        dead: bool,
    },
    Malformed {
        ns: String,
        name: String,
    },
    FilterError {
        ns: String,
        name: String,
        error: String,
    },
}

#[derive(Serialize, Deserialize, Debug)]
struct Batch {
    replica: String,
    outcomes: Vec<WireOutcome>,
}

fn to_wire(key: &EndpointKey, o: &Outcome<'_>) -> WireOutcome {
    match *o {
        Outcome::Delivered {
            latency,
            prior_attempts,
        } => WireOutcome::Delivered {
            ns: key.namespace.clone(),
            name: key.name.clone(),
            latency_ms: latency.as_millis() as u64,
            prior: prior_attempts,
        },
        Outcome::Failed {
            error,
            prior_attempts,
            dead_lettered,
        } => WireOutcome::Failed {
            ns: key.namespace.clone(),
            name: key.name.clone(),
            error: error.to_owned(),
            prior: prior_attempts,
            dead: dead_lettered,
        },
        Outcome::Malformed => WireOutcome::Malformed {
            ns: key.namespace.clone(),
            name: key.name.clone(),
        },
        Outcome::FilterError { error } => WireOutcome::FilterError {
            ns: key.namespace.clone(),
            name: key.name.clone(),
            error: error.to_owned(),
        },
    }
}

fn apply(registry: &HealthRegistry, w: &WireOutcome) {
    match w {
        WireOutcome::Delivered {
            ns,
            name,
            latency_ms,
            prior,
        } => registry.record_remote(
            &EndpointKey::new(ns.as_str(), name.as_str()),
            Outcome::Delivered {
                latency: Duration::from_millis(*latency_ms),
                prior_attempts: *prior,
            },
        ),
        WireOutcome::Failed {
            ns,
            name,
            error,
            prior,
            dead,
        } => registry.record_remote(
            &EndpointKey::new(ns.as_str(), name.as_str()),
            Outcome::Failed {
                error,
                prior_attempts: *prior,
                dead_lettered: *dead,
            },
        ),
        WireOutcome::Malformed { ns, name } => registry.record_remote(
            &EndpointKey::new(ns.as_str(), name.as_str()),
            Outcome::Malformed,
        ),
        WireOutcome::FilterError { ns, name, error } => registry.record_remote(
            &EndpointKey::new(ns.as_str(), name.as_str()),
            Outcome::FilterError { error },
        ),
    }
}

/// Shares `registry`'s outcomes with the other replicas on `client` and merges theirs in,
/// until `shutdown`. `replica` must be unique per replica (its own batches are skipped).
pub async fn share(
    client: async_nats::Client,
    subject: String,
    replica: String,
    registry: Arc<HealthRegistry>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<WireOutcome>();
    registry.set_sink(Arc::new(move |key, outcome| {
        let _ = tx.send(to_wire(key, outcome));
    }));
    let mut inbox = client.subscribe(subject.clone()).await?;
    let me = replica.clone();
    let receive_registry = registry.clone();
    let publisher = client.clone();
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut pending: Vec<WireOutcome> = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(o) = rx.recv() => pending.push(o),
                _ = tick.tick() => {
                    if pending.is_empty() {
                        continue;
                    }
                    // Bounded message size: NATS' default max payload is 1 MiB.
                    for chunk in pending.chunks(2000) {
                        let batch = Batch { replica: me.clone(), outcomes: chunk.to_vec() };
                        let body = serde_json::to_vec(&batch).expect("batch serialises");
                        if let Err(e) = publisher.publish(subject.clone(), body.into()).await {
                            tracing::debug!(error = %e, "health batch not published");
                        }
                    }
                    pending.clear();
                }
                Some(msg) = inbox.next() => {
                    match serde_json::from_slice::<Batch>(&msg.payload) {
                        Ok(b) if b.replica != me => {
                            for o in &b.outcomes {
                                apply(&receive_registry, o);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::debug!(error = %e, "unreadable health batch"),
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthConfig;

    #[test]
    fn wire_outcomes_count_like_local_ones() {
        let local = HealthRegistry::new(HealthConfig::default());
        let merged = HealthRegistry::new(HealthConfig::default());
        let k = EndpointKey::new("ns", "ep");
        let outcomes = [
            Outcome::Failed {
                error: "HTTP 503",
                prior_attempts: 0,
                dead_lettered: false,
            },
            Outcome::Delivered {
                latency: Duration::from_millis(40),
                prior_attempts: 1,
            },
            Outcome::Failed {
                error: "timeout",
                prior_attempts: 4,
                dead_lettered: true,
            },
        ];
        for o in outcomes {
            local.record(&k, o);
            apply(&merged, &to_wire(&k, &o));
        }
        let (a, b) = (local.snapshot(&k).unwrap(), merged.snapshot(&k).unwrap());
        assert_eq!(a.stats.delivered, 1);
        assert_eq!(a.stats.dead_lettered, 1);
        assert_eq!(
            (
                a.stats.delivered,
                a.stats.failed,
                a.stats.retrying,
                a.stats.dead_lettered
            ),
            (
                b.stats.delivered,
                b.stats.failed,
                b.stats.retrying,
                b.stats.dead_lettered
            )
        );
        assert_eq!(a.stats.last_error, b.stats.last_error);
    }
}
