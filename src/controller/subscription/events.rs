//! Kubernetes Events of a subscription pass: upstream changes, new failures, test results.

use super::*;

/// An Event for every upstream change and for every new failure reason.
pub(super) async fn publish_outcome_event(
    ctx: &Context,
    sub: &WebhookSubscription,
    current: &WebhookSubscriptionStatus,
    outcome: &Outcome,
) {
    let previous_reason = current
        .conditions
        .iter()
        .find(|c| c.type_ == types::SYNCED)
        .map(|c| c.reason.clone());
    let previous_ready = current
        .conditions
        .iter()
        .find(|c| c.type_ == types::READY)
        .map(|c| c.reason.clone());
    let (type_, reason, note) = match outcome {
        Outcome::Synced { observed, .. }
            if matches!(observed.state, UpstreamState::Disabled { .. }) =>
        {
            if previous_ready.as_deref() == Some(reasons::DISABLED_UPSTREAM) {
                return;
            }
            let UpstreamState::Disabled { message } = &observed.state else {
                return;
            };
            (
                EventType::Warning,
                reasons::DISABLED_UPSTREAM,
                message.clone(),
            )
        }
        Outcome::Synced { observed, .. } => {
            let (reason, what) = match observed.action {
                SyncAction::Created => ("Created", "created the upstream subscription"),
                SyncAction::Adopted => (
                    reasons::ADOPTED,
                    "adopted an identical upstream subscription",
                ),
                SyncAction::Updated => ("Updated", "updated the upstream subscription"),
                SyncAction::Replaced => ("Replaced", "replaced the upstream subscription"),
                SyncAction::Recreated => (
                    reasons::DRIFT_REPAIRED,
                    "the upstream subscription had vanished or been disabled; recreated it",
                ),
                SyncAction::Unchanged
                    if previous_ready.as_deref() == Some(reasons::DISABLED_UPSTREAM) =>
                {
                    (
                        "EnabledUpstream",
                        "the provider reports the subscription enabled again",
                    )
                }
                SyncAction::Unchanged => return,
            };
            (
                EventType::Normal,
                reason,
                format!("{what} (id {})", observed.id),
            )
        }
        Outcome::Failed(e) => (EventType::Warning, e.reason(), e.to_string()),
        Outcome::CredentialsMissing(why) => (
            EventType::Warning,
            reasons::CREDENTIALS_MISSING,
            why.to_string(),
        ),
        Outcome::EndpointNotReady(why) => (
            EventType::Normal,
            reasons::ENDPOINT_NOT_READY,
            why.to_string(),
        ),
        Outcome::RoutesPending(why) => (EventType::Warning, reasons::ROUTES_PENDING, why.clone()),
        Outcome::MissingUpstream | Outcome::Manual { .. } => return,
    };
    if type_ == EventType::Warning && previous_reason.as_deref() == Some(reason) {
        return; // same failure as last time: the condition already says so
    }
    publish(ctx, sub, type_, reason, "Sync", note).await;
}

/// An Event for a test's outcome (not for `Pending`).
pub(super) async fn publish_test(
    ctx: &Context,
    sub: &WebhookSubscription,
    result: &crate::api::subscription::LastTest,
) {
    let (type_, reason) = match result.result {
        TestResult::Delivered => (EventType::Normal, "TestDelivered"),
        TestResult::Failed => (EventType::Warning, "TestFailed"),
        TestResult::Pending => return,
    };
    let note = format!(
        "test {}: {}",
        result.requested_at,
        result.message.clone().unwrap_or_default()
    );
    publish(ctx, sub, type_, reason, "Test", note).await;
}
