//! Step 6: the next status (pure [`next_status`]), the Events of its transitions, and
//! when to look again.

use std::time::Duration;

use kube::Resource;
use kube::runtime::events::EventType;
use sha2::{Digest, Sha256};

use super::problem::EndpointProblem;
use super::rotation::Rotated;
use super::validate::Validated;
use crate::api::REQUESTED_AT_ANNOTATION;
use crate::api::conditions::{reasons, types};
use crate::api::endpoint::{WebhookEndpoint, WebhookEndpointStatus};
use crate::controller::conditions::{self, Desired};
use crate::controller::routes::{EndpointHealthView, EndpointKey};
use crate::controller::{Context, publish};

/// `status.ingressURL`: the public base URL plus the path, or the path alone.
pub fn ingress_url(public_base: Option<&str>, token: &str) -> String {
    let path = format!("/hooks/{token}");
    match public_base {
        Some(base) => format!("{}{path}", base.trim_end_matches('/')),
        None => path,
    }
}

/// SHA-256 of the signing secret, for status: rotation shows without revealing it.
pub fn secret_hash(secret: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret)))
}

/// The status this pass writes. A destination error of the data plane joins the
/// problems.
pub fn next(
    ep: &WebhookEndpoint,
    ctx: &Context,
    key: &EndpointKey,
    current: &WebhookEndpointStatus,
    rotated: &Rotated,
    validated: &mut Validated,
    last_replay: Option<String>,
) -> WebhookEndpointStatus {
    let health = ctx.routes.0.endpoint_health(key.clone());
    if let Some((reason, msg)) = health.as_ref().and_then(|h| h.destination_error.clone()) {
        validated
            .problems
            .push(EndpointProblem::Destination(reason, msg));
    }
    let mut next = next_status(
        current,
        ep.meta().generation,
        validated
            .token
            .as_deref()
            .map(|t| ingress_url(ctx.public_base_url.as_deref(), t)),
        validated.signing_secret.as_deref().map(secret_hash),
        &validated.problems,
        health.as_ref(),
        ep.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(REQUESTED_AT_ANNOTATION).cloned()),
        last_replay,
    );
    next.last_handled_rotation = rotated
        .rotate_request
        .clone()
        .or_else(|| current.last_handled_rotation.clone());
    next
}

/// The next endpoint status. Pure.
#[allow(clippy::too_many_arguments)]
pub fn next_status(
    current: &WebhookEndpointStatus,
    generation: Option<i64>,
    ingress_url: Option<String>,
    signing_secret_hash: Option<String>,
    problems: &[EndpointProblem],
    health: Option<&EndpointHealthView>,
    requested_at: Option<String>,
    last_replay: Option<String>,
) -> WebhookEndpointStatus {
    let ready = match problems.first() {
        Some(p) => Desired::new(types::READY, false, p.reason(), p.message()),
        None => Desired::new(
            types::READY,
            true,
            reasons::INGRESS_ASSIGNED,
            "ingress URL assigned and destination accepted",
        ),
    };
    let healthy = match health {
        Some(h) => Desired::new(types::HEALTHY, h.healthy, h.reason, h.message.clone()),
        None => Desired::new(
            types::HEALTHY,
            true,
            reasons::NO_DELIVERIES,
            "no deliveries yet",
        ),
    };
    let mut desired = vec![ready, healthy];
    if let Some(p) = problems.first() {
        desired.push(Desired::new(types::STALLED, true, p.reason(), p.message()));
    }
    WebhookEndpointStatus {
        observed_generation: generation,
        conditions: conditions::merge(&current.conditions, &desired, generation, conditions::now()),
        ingress_url,
        signing_secret_hash,
        last_handled_requested_at: requested_at
            .or_else(|| current.last_handled_requested_at.clone()),
        last_handled_replay_at: last_replay,
        last_handled_rotation: current.last_handled_rotation.clone(),
        delivery: health
            .map(|h| h.stats.clone())
            .or_else(|| current.delivery.clone()),
    }
}

/// When to look again: soon while something is wrong, and right when the overlap of a
/// rotation ends (to drop the old secret).
pub fn requeue(problems: &[EndpointProblem], overlap_ends: Option<jiff::Timestamp>) -> Duration {
    let mut wait = if problems.is_empty() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    };
    if let Some(end) = overlap_ends {
        let left = end.duration_since(jiff::Timestamp::now());
        let left = Duration::try_from(left).unwrap_or_default() + Duration::from_millis(200);
        wait = wait.min(left);
    }
    wait
}

/// Events when Ready or Healthy change.
pub async fn publish_transitions(
    ctx: &Context,
    ep: &WebhookEndpoint,
    current: &WebhookEndpointStatus,
    next: &WebhookEndpointStatus,
) {
    for type_ in [types::READY, types::HEALTHY] {
        let before = current.conditions.iter().find(|c| c.type_ == type_);
        let Some(after) = next.conditions.iter().find(|c| c.type_ == type_) else {
            continue;
        };
        if before.is_some_and(|b| b.status == after.status && b.reason == after.reason) {
            continue;
        }
        if before.is_none() && after.status == "True" {
            continue; // first pass, all well: nothing worth an Event
        }
        let kind = if after.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        publish(ctx, ep, kind, &after.reason, type_, after.message.clone()).await;
    }
    let filter_errors =
        |s: &WebhookEndpointStatus| s.delivery.as_ref().map_or(0, |d| d.filter_errors);
    let new = filter_errors(next).saturating_sub(filter_errors(current));
    if new > 0 {
        // The last error is the filter's unless a delivery failed since.
        let error = next
            .delivery
            .as_ref()
            .and_then(|d| d.last_error.as_deref())
            .filter(|e| e.starts_with(crate::health::FILTER_ERROR_PREFIX))
            .unwrap_or("spec.filter failed");
        publish(
            ctx,
            ep,
            EventType::Warning,
            "FilterFailed",
            "Deliver",
            format!("{new} event(s): {error}; kept as dead letters: fix spec.filter, then replay"),
        )
        .await;
    }
    let malformed = |s: &WebhookEndpointStatus| s.delivery.as_ref().map_or(0, |d| d.malformed);
    let new = malformed(next).saturating_sub(malformed(current));
    if new > 0 {
        publish(
            ctx,
            ep,
            EventType::Warning,
            "MalformedEvents",
            "Receive",
            format!("{new} event(s) from the provider could not be read; they are kept in the dead-letter store for inspection"),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_pass_comes_sooner_with_a_problem_and_at_the_end_of_an_overlap() {
        let problem = EndpointProblem::FilterInvalid("unexpected token".into());
        assert_eq!(requeue(&[], None), Duration::from_secs(300));
        assert_eq!(
            requeue(std::slice::from_ref(&problem), None),
            Duration::from_secs(30)
        );
        let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(5);
        let wait = requeue(&[], Some(soon));
        assert!(wait <= Duration::from_millis(5200) && wait > Duration::from_secs(4));
        // The first problem names Ready's and Stalled's reason and message.
        let st = next_status(
            &Default::default(),
            None,
            None,
            None,
            &[problem],
            None,
            None,
            None,
        );
        for type_ in [types::READY, types::STALLED] {
            let c = st.conditions.iter().find(|c| c.type_ == type_).unwrap();
            assert_eq!(c.reason, reasons::FILTER_INVALID);
            assert_eq!(c.message, "spec.filter: unexpected token");
        }
    }
}
