//! What one pass found or did ([`Outcome`]), and the next status it makes: pure.

use super::*;

/// What one pass found or did.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one short-lived value per reconcile"
)]
pub enum Outcome {
    /// Upstream matches the spec (or, ObserveOnly, what exists upstream).
    Synced {
        observed: Observed,
        applied: Option<DesiredSubscription>,
    },
    /// ObserveOnly and nothing exists upstream.
    MissingUpstream,
    /// Atllas: nothing to call; the user configures the portal.
    Manual {
        hook_url: String,
        header_name: String,
        secret_name: String,
    },
    EndpointNotReady(TargetError),
    CredentialsMissing(CredentialsError),
    /// Not every ready replica routes the hook URL yet: nothing registered this pass.
    RoutesPending(String),
    Failed(ProviderError),
}

/// The next status from the current one and an outcome. Pure.
pub fn outcome_status(
    current: &WebhookSubscriptionStatus,
    outcome: &Outcome,
    generation: Option<i64>,
    requested_at: Option<String>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> WebhookSubscriptionStatus {
    let mut next = WebhookSubscriptionStatus {
        observed_generation: generation,
        last_handled_requested_at: requested_at
            .or_else(|| current.last_handled_requested_at.clone()),
        upstream: current.upstream.clone(),
        events: current.events.clone(),
        ..Default::default()
    };
    let desired: Vec<Desired> = match outcome {
        Outcome::Synced { observed, applied } => {
            let upstream = next.upstream.get_or_insert_with(UpstreamStatus::default);
            record_upstream(upstream, observed, applied.as_ref(), now.clone());
            synced_conditions(observed, applied.is_some())
        }
        Outcome::MissingUpstream => missing_upstream_conditions(),
        Outcome::Manual {
            hook_url,
            header_name,
            secret_name,
        } => {
            next.upstream = None;
            next.manual_setup = Some(ManualSetup {
                hook_url: Some(hook_url.clone()),
                header_name: Some(header_name.clone()),
                secret_name: Some(secret_name.clone()),
            });
            manual_conditions()
        }
        Outcome::EndpointNotReady(why) => not_synced(
            reasons::ENDPOINT_NOT_READY,
            why.to_string(),
            false,
            why.to_string(),
        ),
        Outcome::CredentialsMissing(why) => not_synced(
            reasons::CREDENTIALS_MISSING,
            why.to_string(),
            true,
            why.to_string(),
        ),
        Outcome::RoutesPending(why) => {
            not_synced(reasons::ROUTES_PENDING, why.clone(), false, why.clone())
        }
        Outcome::Failed(err) => failed_conditions(err),
    };
    next.conditions = conditions::merge(&current.conditions, &desired, generation, now);
    next
}

/// Records what the provider holds in `upstream`; the sync time moves only when something did.
fn record_upstream(
    upstream: &mut UpstreamStatus,
    observed: &Observed,
    applied: Option<&DesiredSubscription>,
    now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) {
    let before = upstream.clone();
    upstream.id = Some(observed.id.clone());
    upstream.echo = observed.echo.clone();
    upstream.state = Some(match &observed.state {
        UpstreamState::Enabled => "enabled".into(),
        UpstreamState::Disabled { .. } => "disabled".into(),
        UpstreamState::Incomplete { .. } => "incomplete".into(),
        UpstreamState::Manual => "manual".into(),
    });
    if let Some(applied) = applied {
        upstream.applied = serde_json::to_string(applied).ok();
    }
    // Not a heartbeat: a resync that finds everything as recorded writes nothing,
    // so the time moves only with what it dates.
    if *upstream != before || upstream.last_sync_time.is_none() {
        upstream.last_sync_time = Some(now);
    }
}

/// Ready (from the upstream state) and Synced (from the action) after a sync; `applied` is
/// whether the operator wrote the spec (false: ObserveOnly).
fn synced_conditions(observed: &Observed, applied: bool) -> Vec<Desired> {
    let synced_reason = match observed.action {
        _ if matches!(observed.state, UpstreamState::Disabled { .. }) => reasons::SYNCED,
        SyncAction::Adopted => reasons::ADOPTED,
        SyncAction::Recreated => reasons::DRIFT_REPAIRED,
        _ if !applied => reasons::OBSERVE_ONLY,
        _ => reasons::SYNCED,
    };
    let ready = match &observed.state {
        UpstreamState::Disabled { message } => Desired::new(
            types::READY,
            false,
            reasons::DISABLED_UPSTREAM,
            message.clone(),
        ),
        UpstreamState::Incomplete { message } => Desired::new(
            types::READY,
            false,
            reasons::DRIFT_DETECTED,
            message.clone(),
        ),
        _ => Desired::new(
            types::READY,
            true,
            reasons::READY,
            "the subscription exists upstream as specified",
        ),
    };
    vec![
        ready,
        Desired::new(
            types::SYNCED,
            true,
            synced_reason,
            format!("upstream id {}", observed.id),
        ),
    ]
}

/// ObserveOnly found nothing upstream.
fn missing_upstream_conditions() -> Vec<Desired> {
    vec![
        Desired::new(
            types::READY,
            false,
            reasons::NOT_FOUND_UPSTREAM,
            "ObserveOnly: no such subscription exists upstream",
        ),
        Desired::new(
            types::SYNCED,
            true,
            reasons::OBSERVE_ONLY,
            "observed the provider; nothing found",
        ),
    ]
}

/// A receive-only provider: ready once the user configures the portal.
fn manual_conditions() -> Vec<Desired> {
    vec![
        Desired::new(
            types::READY,
            true,
            reasons::MANUAL_SETUP,
            "receive-only provider: add status.manualSetup.hookURL and the header to the provider's portal",
        ),
        Desired::new(
            types::SYNCED,
            true,
            reasons::MANUAL_SETUP,
            "nothing to sync: the provider has no API",
        ),
    ]
}

/// A provider error: Stalled when permanent, else Reconciling (retried).
fn failed_conditions(err: &ProviderError) -> Vec<Desired> {
    let msg = err.to_string();
    let (stalled, retry) = match err.is_permanent() {
        true => (true, msg.clone()),
        false => (false, format!("retrying: {msg}")),
    };
    not_synced(err.reason(), msg, stalled, retry)
}

/// Neither Ready nor Synced for `reason`, and either Stalled (the user must act) or
/// Reconciling (retried) with `third_message`.
pub(super) fn not_synced(
    reason: &'static str,
    message: String,
    stalled: bool,
    third_message: String,
) -> Vec<Desired> {
    let third = if stalled {
        types::STALLED
    } else {
        types::RECONCILING
    };
    vec![
        Desired::new(types::READY, false, reason, &message),
        Desired::new(types::SYNCED, false, reason, message),
        Desired::new(third, true, reason, third_message),
    ]
}
