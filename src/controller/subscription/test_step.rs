//! The test step: one entry point ([`run`]) that answers a new test request (sending the
//! test event when the subscription is ready) and reports a pending test's result; the
//! lifecycle itself is in `controller::test_event`.

use super::*;
use crate::api::subscription::LastTest;

/// The test result to record this pass, if any: a new request answered (sent, or failed
/// because the subscription is not ready), then a pending test's outcome.
pub(super) async fn run(
    sub: &WebhookSubscription,
    ctx: &Context,
    request: Option<String>,
    outcome: &Outcome,
    synced_as: Option<&(DesiredSubscription, Credentials)>,
) -> Option<LastTest> {
    let mut last = None;
    if let Some(request) = request {
        let result = match (outcome, synced_as) {
            (Outcome::Synced { observed, applied }, Some((desired, creds)))
                if observed.state == UpstreamState::Enabled =>
            {
                let upstream_id = applied.as_ref().map(|_| observed.id.as_str());
                test_event::send(sub, ctx, request, desired, upstream_id, creds).await
            }
            (Outcome::Manual { .. }, Some((desired, creds))) => {
                test_event::send(sub, ctx, request, desired, None, creds).await
            }
            _ => LastTest {
                requested_at: request,
                result: TestResult::Failed,
                latency_ms: None,
                message: Some("the subscription is not Ready; see its conditions".into()),
            },
        };
        publish_test(ctx, sub, &result).await;
        last = Some(result);
    }
    check(sub, ctx).await.or(last)
}

/// A pending test's result, if it changed (published as an Event).
pub(super) async fn check(sub: &WebhookSubscription, ctx: &Context) -> Option<LastTest> {
    let result = test_event::check(sub, ctx)?;
    publish_test(ctx, sub, &result).await;
    Some(result)
}

/// `wait`, or sooner while a test is pending.
pub(super) fn recheck(sub: &WebhookSubscription, ctx: &Context, wait: Duration) -> Duration {
    if test_event::is_pending(sub, ctx) {
        wait.min(test_event::RECHECK)
    } else {
        wait
    }
}
