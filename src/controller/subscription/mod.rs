//! The WebhookSubscription reconciler: keeps the provider's subscription as specified,
//! repairs drift every `resyncInterval`, and removes it on delete (finalizer).
//!
//! Deciding is separated from doing: [`translate`] builds the provider-side desired state
//! from the spec, [`outcome_status`] turns an outcome into the next status, and the async
//! steps only read inputs, call the provider and write status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::conditions::{self, Desired};
use super::{
    CleanupError, Context, Error, build, publish, rotation, secrets, signature_check, status,
    test_event,
};
use crate::api::conditions::{reasons, types};
use crate::api::subscription::{
    DeletionPolicy, EventCounters, ManagementPolicy, ManualSetup, TestResult, UpstreamStatus,
    WebhookSubscription, WebhookSubscriptionSpec, WebhookSubscriptionStatus,
};
use crate::api::subscription::{HEADER_VALUE_KEY, SIGNING_SECRET_KEY};
use crate::api::{Provider, REQUESTED_AT_ANNOTATION};
use crate::providers::{
    Credentials, DesiredSubscription, Observed, ProviderError, Scope, SyncAction, UpstreamState,
};

mod events;
mod gate;
mod handshake;
mod inputs;
mod outcome;
mod test_step;
mod upstream;

pub use gate::Schedule;
pub use inputs::{CredentialsError, TargetError};
pub(crate) use inputs::{read_credentials, resolve_target};
pub use outcome::{Outcome, outcome_status};
pub use upstream::translate;
use {events::*, gate::*, inputs::*, upstream::*};

pub const FINALIZER: &str = "hooks.webhook-operator.dev/upstream";

reconcile_under_finalizer!(WebhookSubscription);

/// One pass: resolve inputs → schedule gate → provider sync → test step → status →
/// record the schedule. Each step is a named function below or in its module.
async fn apply(
    sub: &WebhookSubscription,
    ctx: &Context,
    api: &Api<WebhookSubscription>,
) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(sub);
    let mut written = ctx.memos.subscriptions.read(&key, |m| m.status.written());
    // Read after the memo: once it has dropped our last write, the cache holds it.
    let cached = super::newest(&ctx.watched.subscriptions, sub);
    let status_of = status::source(sub, written.as_ref(), cached.as_deref());
    let mut current = status::current(status_of, written.as_ref())
        .cloned()
        .unwrap_or_default();
    let resolved = resolve(sub, ctx).await?;
    let counters = event_counters(ctx, sub);

    // Nothing changed and nothing due: no provider call (our own status writes and
    // unrelated events land here); only the counters and a pending test may have moved.
    let schedule = ctx.memos.subscriptions.read(&key, |m| m.schedule.clone());
    // Deliveries started or stopped failing verification: a full pass writes the
    // condition (rare: it flips only between refused and verified).
    let verification_flipped = signature_check::changed(
        &current.conditions,
        signature_check::desired(&sub.spec, counters.as_ref().or(current.events.as_ref())).as_ref(),
    );
    let now = Instant::now();
    let failures_before = match gate(
        schedule.as_ref(),
        &resolved.inputs,
        verification_flipped,
        now,
    ) {
        Gate::Run { failures_before } => failures_before,
        Gate::Wait(wait) => {
            let mut next = current.clone();
            next.events = counters.or(next.events);
            next.last_test = test_step::check(sub, ctx).await.or(next.last_test);
            write_status(ctx, api, status_of, written, next).await?;
            return Ok(Action::requeue(test_step::recheck(sub, ctx, wait)));
        }
    };

    let request = resolved.inputs.test_request.clone();
    // Routes first, registration second (the route handshake).
    let routing = match (&resolved.target, &resolved.credentials) {
        (Ok(url), Ok(_)) => {
            handshake::ensure_routed(sub, ctx, api, status_of, &mut written, &mut current, url)
                .await?
        }
        _ => handshake::Routing::Skipped,
    };
    let (outcome, synced_as) = match &routing {
        handshake::Routing::Pending(why) => (Outcome::RoutesPending(why.clone()), None),
        _ => provider_sync(sub, ctx, resolved.target, resolved.credentials, &current).await?,
    };
    publish_outcome_event(ctx, sub, &current, &outcome).await;
    let mut next = next_status(sub, ctx, &current, &outcome);
    next.conditions = handshake::with_routed(next.conditions, sub, &current, &outcome, &routing);
    next.last_test = test_step::run(sub, ctx, request, &outcome, synced_as.as_ref())
        .await
        .or(current.last_test);
    write_status(ctx, api, status_of, written, next).await?;

    let (wait, failures) = next_pass(
        &outcome,
        &sub.spec.resync_interval,
        failures_before,
        rand::random(),
    );
    let wait = test_step::recheck(sub, ctx, wait);
    tracing::debug!(namespace = ?key.namespace, name = %key.name, ?wait, failures, "next pass scheduled");
    let inputs = Inputs {
        test_request: None,
        ..resolved.inputs
    };
    ctx.memos.subscriptions.update(key, |m| {
        m.schedule = Some(Schedule {
            inputs,
            next_due: Instant::now() + wait,
            failures,
        })
    });
    Ok(Action::requeue(wait))
}

/// Calls the provider when the inputs are there; the outcome, and what was synced (the
/// desired state and credentials a test event needs).
async fn provider_sync(
    sub: &WebhookSubscription,
    ctx: &Context,
    target: Result<String, TargetError>,
    credentials: Result<(Credentials, Option<String>), CredentialsError>,
    current: &WebhookSubscriptionStatus,
) -> Result<(Outcome, Option<(DesiredSubscription, Credentials)>), Error> {
    Ok(match (target, credentials) {
        (Err(msg), _) => (Outcome::EndpointNotReady(msg), None),
        (_, Err(msg)) => (Outcome::CredentialsMissing(msg), None),
        (Ok(hook_url), Ok((creds, _))) => {
            let outcome = sync(sub, ctx, hook_url.clone(), &creds, current).await?;
            let ns = sub.namespace().unwrap_or_default();
            let desired = translate(&ns, &sub.name_any(), &sub.spec, hook_url);
            (outcome, Some((desired, creds)))
        }
    })
}

/// The next status after a full pass (without the test step), and the `Synced` metric.
fn next_status(
    sub: &WebhookSubscription,
    ctx: &Context,
    current: &WebhookSubscriptionStatus,
    outcome: &Outcome,
) -> WebhookSubscriptionStatus {
    let requested_at = sub.annotations().get(REQUESTED_AT_ANNOTATION).cloned();
    let mut next = outcome_status(
        current,
        outcome,
        sub.meta().generation,
        requested_at,
        conditions::now(),
    );
    next.events = event_counters(ctx, sub).or(next.events);
    next.conditions = signature_check::merged(
        &next.conditions,
        &current.conditions,
        signature_check::desired(&sub.spec, next.events.as_ref()).as_ref(),
        sub.meta().generation,
        conditions::now(),
    );
    ctx.routes.synced(
        sub,
        next.conditions
            .iter()
            .any(|c| c.type_ == "Synced" && c.status == "True"),
    );
    next
}

/// Writes the whole status if it changed, and remembers what was written.
async fn write_status(
    ctx: &Context,
    api: &Api<WebhookSubscription>,
    sub: &WebhookSubscription,
    written: Option<status::Written<WebhookSubscriptionStatus>>,
    next: WebhookSubscriptionStatus,
) -> Result<(), Error> {
    if let Some(written) = status::apply_if_changed(api, sub, written, next).await? {
        ctx.memos
            .subscriptions
            .update(ObjectRef::from_obj(sub), |m| m.status.keep(written));
    }
    Ok(())
}

async fn cleanup(sub: &WebhookSubscription, ctx: &Context) -> Result<Action, Error> {
    ctx.routes.remove_subscription(sub);
    ctx.memos.subscriptions.forget(&ObjectRef::from_obj(sub));
    let applied: Option<DesiredSubscription> = sub
        .status
        .as_ref()
        .and_then(|s| s.upstream.as_ref())
        .and_then(|u| u.applied.as_deref())
        .and_then(|s| serde_json::from_str(s).ok());
    let keep = sub.spec.deletion_policy == DeletionPolicy::Orphan
        || sub.spec.management_policy == ManagementPolicy::ObserveOnly
        || sub.spec.provider == Provider::Atllas;
    if let (Some(applied), false) = (applied, keep) {
        let ns = sub.namespace().unwrap_or_default();
        let (creds, _) = read_credentials(ctx, &ns, &sub.spec)
            .await
            .map_err(|e| Error::Cleanup(CleanupError::Credentials(e)))?;
        ctx.providers
            .get(crate::controller::to_dataplane::provider(sub.spec.provider))
            .delete(&creds, &applied)
            .await
            .map_err(Error::Provider)?;
        publish(
            ctx,
            sub,
            EventType::Normal,
            "Deleted",
            "Delete",
            "removed the upstream subscription".into(),
        )
        .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests;
