//! Test events requested in Git: `hooks.webhook-operator.dev/test-requested-at` on a
//! WebhookSubscription sends one test event through the whole path and reports the
//! outcome in `status.lastTest`. Where the provider has a test endpoint (Atomic) the
//! provider sends it; otherwise the operator makes one up in the provider's own format,
//! signed like the provider signs, and runs it through its ingress in-process. Each
//! annotation value is handled once.

use std::time::{Duration, Instant, SystemTime};

use kube::ResourceExt;

use super::routes::endpoint_of;
use super::secrets;
use super::{Context, build};
use crate::api::subscription::{LastTest, TestResult, WebhookSubscription};
use crate::api::{Provider, TEST_REQUESTED_AT_ANNOTATION};
use crate::inbound::VerificationKeys;
use crate::providers::{Credentials, DesiredSubscription, synthetic_test_event};

/// How long a test may take to reach the destination before it counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How often a pending test is checked.
pub const RECHECK: Duration = Duration::from_secs(1);

/// A test sent and not yet seen delivered.
#[derive(Clone, Debug)]
pub struct Pending {
    pub requested_at: String,
    pub sent_at: SystemTime,
    pub started: Instant,
    pub how: String,
}

/// The annotation value, when it asks for a test not handled yet.
pub fn new_request(sub: &WebhookSubscription, ctx: &Context) -> Option<String> {
    let requested = sub.annotations().get(TEST_REQUESTED_AT_ANNOTATION)?.clone();
    let key = kube::runtime::reflector::ObjectRef::from_obj(sub);
    // Remembered in memory as well: the cached object may predate our own status write.
    let pending = ctx
        .memos
        .subscriptions
        .read(&key, |m| m.handled_test.clone());
    let handled = sub
        .status
        .as_ref()
        .and_then(|s| s.last_test.as_ref())
        .map(|t| t.requested_at.clone());
    (Some(&requested) != pending.as_ref() && Some(&requested) != handled.as_ref())
        .then_some(requested)
}

/// Sends the test event for `requested_at`. The subscription has just synced as
/// `desired`, upstream id `upstream_id`.
pub async fn send(
    sub: &WebhookSubscription,
    ctx: &Context,
    requested_at: String,
    desired: &DesiredSubscription,
    upstream_id: Option<&str>,
    creds: &Credentials,
) -> LastTest {
    let key = kube::runtime::reflector::ObjectRef::from_obj(sub);
    ctx.memos
        .subscriptions
        .update(key.clone(), |m| m.handled_test = Some(requested_at.clone()));
    let sent_at = SystemTime::now();
    let how = match send_event(sub, ctx, desired, upstream_id, creds).await {
        Ok(how) => how,
        Err(why) => {
            return LastTest {
                requested_at,
                result: TestResult::Failed,
                latency_ms: None,
                message: Some(why),
            };
        }
    };
    ctx.memos.subscriptions.update(key, |m| {
        m.pending_test = Some(Pending {
            requested_at: requested_at.clone(),
            sent_at,
            started: Instant::now(),
            how: how.clone(),
        })
    });
    LastTest {
        requested_at,
        result: TestResult::Pending,
        latency_ms: None,
        message: Some(how),
    }
}

async fn send_event(
    sub: &WebhookSubscription,
    ctx: &Context,
    desired: &DesiredSubscription,
    upstream_id: Option<&str>,
    creds: &Credentials,
) -> Result<String, String> {
    if let Some(id) = upstream_id {
        let sent = ctx
            .providers
            .get(super::to_dataplane::provider(sub.spec.provider))
            .send_test(creds, desired, id)
            .await
            .map_err(|e| format!("the provider's test endpoint failed: {e}"))?;
        if sent {
            return Ok("sent by the provider's test endpoint".into());
        }
    }
    let token = token_of(&desired.hook_url)
        .ok_or("the subscription does not receive through a WebhookEndpoint")?;
    let keys = verification_keys(sub, ctx).await?;
    let (headers, body) = synthetic_test_event(desired, &keys);
    let status = ctx
        .routes
        .0
        .inject(token, sub.name_any(), headers, body)
        .await
        .map_err(|e| format!("the ingress could not take the test event: {e}"))?;
    if (200..300).contains(&status) {
        Ok("a synthetic test event in the provider's format, injected at the ingress".into())
    } else {
        Err(format!("the ingress answered {status} to the test event"))
    }
}

/// `<token>` of `.../hooks/<token>/<subscription>`.
fn token_of(hook_url: &str) -> Option<String> {
    let mut parts = hook_url.rsplit('/');
    parts.next()?;
    let token = parts.next()?;
    (parts.next()? == "hooks").then(|| token.to_string())
}

/// What the provider would sign or head its test delivery with: the keys the ingress
/// verifies with (the one build, read from the API now).
async fn verification_keys(
    sub: &WebhookSubscription,
    ctx: &Context,
) -> Result<VerificationKeys, String> {
    let secret = match sub.spec.provider {
        Provider::Atlas => return Ok(VerificationKeys::default()),
        Provider::Atllas => sub.atllas_header_secret_name(),
        Provider::Atomic | Provider::Smallest => sub.provider_signing_secret_name(),
    };
    let mut fetched = build::Fetched::default();
    fetched
        .read_owned(&ctx.secrets, sub, &secret)
        .await
        .map_err(|e| e.to_string())?;
    build::verification_keys(sub, &fetched)
        .filter(|keys| !keys.secrets.is_empty())
        .ok_or_else(|| secrets::SecretError::NotFound(secret).to_string())
}

/// The result of a pending test, if it changed: delivered, dead-lettered (refused by the
/// destination, or out of attempts), timed out, or still pending (`None`, check again
/// after [`RECHECK`]).
pub fn check(sub: &WebhookSubscription, ctx: &Context) -> Option<LastTest> {
    let key = kube::runtime::reflector::ObjectRef::from_obj(sub);
    let pending = ctx
        .memos
        .subscriptions
        .read(&key, |m| m.pending_test.clone())?;
    let endpoint = endpoint_of(sub);
    let delivered = endpoint
        .clone()
        .and_then(|ep| ctx.routes.0.last_test(ep, sub.name_any()))
        .filter(|(at, _)| *at >= pending.sent_at);
    let dead_lettered = endpoint
        .and_then(|ep| ctx.routes.0.last_test_failure(ep, sub.name_any()))
        .filter(|(at, _)| *at >= pending.sent_at);
    let result = match (delivered, dead_lettered) {
        (None, Some((_, why))) => LastTest {
            requested_at: pending.requested_at,
            result: TestResult::Failed,
            latency_ms: None,
            message: Some(format!("dead-lettered: {why}")),
        },
        (Some((_, latency)), _) => LastTest {
            requested_at: pending.requested_at,
            result: TestResult::Delivered,
            latency_ms: Some((latency.as_secs_f64() * 1000.0 * 10.0).round() / 10.0),
            message: Some(pending.how),
        },
        (None, None) if pending.started.elapsed() > TIMEOUT => LastTest {
            requested_at: pending.requested_at,
            result: TestResult::Failed,
            latency_ms: None,
            message: Some(format!(
                "not delivered within {}s; see the endpoint's Healthy condition",
                TIMEOUT.as_secs()
            )),
        },
        (None, None) => return None,
    };
    ctx.memos
        .subscriptions
        .update(key, |m| m.pending_test = None);
    Some(result)
}

/// Whether a test of this subscription is waiting for its delivery.
pub fn is_pending(sub: &WebhookSubscription, ctx: &Context) -> bool {
    ctx.memos
        .subscriptions
        .read(&kube::runtime::reflector::ObjectRef::from_obj(sub), |m| {
            m.pending_test.is_some()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comes_from_the_hook_path() {
        assert_eq!(
            token_of("https://h.example.com/hooks/abc123/calls").as_deref(),
            Some("abc123")
        );
        assert_eq!(token_of("https://consumer.example.com/webhook"), None);
    }
}
