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
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
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

pub const FINALIZER: &str = "hooks.webhook-operator.dev/upstream";

pub async fn reconcile(sub: Arc<WebhookSubscription>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = sub.namespace().unwrap_or_default();
    let api: Api<WebhookSubscription> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, sub, |event| async {
        match event {
            Finalizer::Apply(sub) => apply(&sub, &ctx, &api).await,
            Finalizer::Cleanup(sub) => cleanup(&sub, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The provider-side desired state of a spec, given the URL the provider must call.
pub fn translate(
    namespace: &str,
    name: &str,
    spec: &WebhookSubscriptionSpec,
    hook_url: String,
) -> DesiredSubscription {
    let scope = match spec.provider {
        Provider::Atlas => Scope::Atlas {
            campaign_id: spec
                .atlas
                .as_ref()
                .map(|a| a.campaign_id.clone())
                .unwrap_or_default(),
        },
        Provider::Atomic => {
            let a = spec
                .atomic
                .clone()
                .unwrap_or_else(|| crate::api::subscription::AtomicScope {
                    organization_id: String::new(),
                    environment_id: String::new(),
                    card_template_id: None,
                    action_flow_config_id: None,
                    method: Default::default(),
                    signature: None,
                });
            Scope::Atomic {
                organization_id: a.organization_id,
                environment_id: a.environment_id,
                card_template_id: a.card_template_id,
                action_flow_config_id: a.action_flow_config_id,
                method: a.method,
            }
        }
        Provider::Smallest => Scope::Smallest {
            agent_ids: spec
                .smallest
                .as_ref()
                .map(|s| s.agent_ids.iter().map(|a| a.0.clone()).collect())
                .unwrap_or_default(),
        },
        Provider::Atllas => Scope::Atllas {
            header_name: spec.atllas_header_name(),
        },
    };
    DesiredSubscription {
        provider: spec.provider,
        hook_url,
        events: spec.events.iter().map(|e| e.0.clone()).collect(),
        scope,
        owner: format!("{namespace}/{name}"),
    }
}

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
            upstream.id = Some(observed.id.clone());
            upstream.echo = observed.echo.clone();
            upstream.state = Some(match &observed.state {
                UpstreamState::Enabled => "enabled".into(),
                UpstreamState::Disabled { .. } => "disabled".into(),
                UpstreamState::Incomplete { .. } => "incomplete".into(),
                UpstreamState::Manual => "manual".into(),
            });
            upstream.last_sync_time = Some(now.clone());
            if let Some(applied) = applied {
                upstream.applied = serde_json::to_string(applied).ok();
            }
            let synced_reason = match observed.action {
                _ if matches!(observed.state, UpstreamState::Disabled { .. }) => reasons::SYNCED,
                SyncAction::Adopted => reasons::ADOPTED,
                SyncAction::Recreated => reasons::DRIFT_REPAIRED,
                _ if applied.is_none() => reasons::OBSERVE_ONLY,
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
        Outcome::MissingUpstream => vec![
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
        ],
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
        Outcome::Failed(err) => {
            let msg = err.to_string();
            let (stalled, retry) = match err.is_permanent() {
                true => (true, msg.clone()),
                false => (false, format!("retrying: {msg}")),
            };
            not_synced(err.reason(), msg, stalled, retry)
        }
    };
    next.conditions = conditions::merge(&current.conditions, &desired, generation, now);
    next
}

/// Neither Ready nor Synced for `reason`, and either Stalled (the user must act) or
/// Reconciling (retried) with `third_message`.
fn not_synced(
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

/// Inputs whose change makes a pass due at once, whatever the schedule says.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Inputs {
    generation: Option<i64>,
    credentials_version: Option<String>,
    hook_url: Option<String>,
    requested_at: Option<String>,
    /// A test request not handled yet.
    test_request: Option<String>,
}

/// When the next provider call for an object is due, and how many failures in a row.
#[derive(Clone, Debug)]
pub struct Schedule {
    inputs: Inputs,
    next_due: Instant,
    failures: u32,
}

/// What the schedule gate decided for a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// Call the provider; `failures_before` failures in a row with the same inputs.
    Run { failures_before: u32 },
    /// Nothing changed and nothing is due: only refresh counters and a pending test, and
    /// come back after this long.
    Wait(Duration),
}

/// Whether a pass calls the provider. Pure: a pass is due when there is no schedule yet,
/// an input changed (spec, credentials Secret, target URL, a request annotation, a new
/// test request), the schedule's time has come, or signature verification flipped. The
/// failure count carries over only while the inputs stay the same.
fn gate(
    schedule: Option<&Schedule>,
    inputs: &Inputs,
    verification_flipped: bool,
    now: Instant,
) -> Gate {
    match schedule {
        Some(s) if s.inputs == *inputs && now < s.next_due && !verification_flipped => {
            Gate::Wait(s.next_due - now)
        }
        Some(s) if s.inputs == *inputs => Gate::Run {
            failures_before: s.failures,
        },
        _ => Gate::Run { failures_before: 0 },
    }
}

/// How long until the next provider call after `outcome`, and the failures in a row.
/// Pure; `jitter` in [0, 1) spreads retries.
fn next_pass(
    outcome: &Outcome,
    resync_interval: &str,
    failures_before: u32,
    jitter: f64,
) -> (Duration, u32) {
    let resync =
        crate::duration::parse_go_duration(resync_interval).unwrap_or(Duration::from_secs(300));
    match outcome {
        Outcome::Synced { .. } | Outcome::MissingUpstream | Outcome::Manual { .. } => (resync, 0),
        // Waits for the endpoint or the Secret to change (both are watched); the timer
        // is a safety net.
        // The endpoint check is a cheap read: recheck soon, in case a watch event came
        // before this object was in the store.
        Outcome::EndpointNotReady(_) => (Duration::from_secs(10), 0),
        Outcome::CredentialsMissing(_) => (Duration::from_secs(60), 0),
        Outcome::Failed(err) => {
            let failures = failures_before + 1;
            (
                super::backoff::delay(failures, err.retry_after(), jitter),
                failures,
            )
        }
    }
}

async fn apply(
    sub: &WebhookSubscription,
    ctx: &Context,
    api: &Api<WebhookSubscription>,
) -> Result<Action, Error> {
    let ns = sub.namespace().unwrap_or_default();
    let name = sub.name_any();
    let key = ObjectRef::from_obj(sub);
    let requested_at = sub.annotations().get(REQUESTED_AT_ANNOTATION).cloned();
    let written = ctx.subscription_memo.read(&key, |m| m.status.clone());
    let current = status::current(sub, written.as_ref())
        .cloned()
        .unwrap_or_default();

    // Inputs: the target URL and the credentials.
    let target = resolve_target(sub, ctx).await?;
    let credentials = if sub.spec.provider == Provider::Atllas {
        Ok((Credentials::default(), None))
    } else {
        read_credentials(ctx, &ns, &sub.spec).await
    };
    let inputs = Inputs {
        generation: sub.meta().generation,
        credentials_version: credentials.as_ref().ok().and_then(|(_, v)| v.clone()),
        hook_url: target.as_ref().ok().cloned(),
        requested_at: requested_at.clone(),
        test_request: test_event::new_request(sub, ctx),
    };

    // Nothing changed and nothing due: no provider call (our own status writes and
    // unrelated events land here).
    let schedule = ctx.subscription_memo.read(&key, |m| m.schedule.clone());
    let counters = event_counters(ctx, sub);
    // Deliveries started or stopped failing verification: a full pass writes the
    // condition (rare: it flips only between refused and verified).
    let verification_flipped = signature_check::changed(
        &current.conditions,
        signature_check::desired(&sub.spec, counters.as_ref().or(current.events.as_ref())).as_ref(),
    );
    let failures_before = match gate(
        schedule.as_ref(),
        &inputs,
        verification_flipped,
        Instant::now(),
    ) {
        Gate::Run { failures_before } => failures_before,
        Gate::Wait(mut wait) => {
            // Only the counters and a pending test may have moved.
            let mut next = current.clone();
            next.events = counters.or(next.events);
            if let Some(result) = test_event::check(sub, ctx) {
                publish_test(ctx, sub, &result).await;
                next.last_test = Some(result);
            }
            write_status(ctx, api, sub, written, next).await?;
            if test_event::is_pending(sub, ctx) {
                wait = wait.min(test_event::RECHECK);
            }
            return Ok(Action::requeue(wait));
        }
    };

    let mut test_inputs = None;
    let outcome = match (target, credentials) {
        (Err(msg), _) => Outcome::EndpointNotReady(msg),
        (_, Err(msg)) => Outcome::CredentialsMissing(msg),
        (Ok(hook_url), Ok((creds, _))) => {
            let outcome = sync(sub, ctx, hook_url.clone(), &creds, &current).await?;
            test_inputs = Some((translate(&ns, &name, &sub.spec, hook_url), creds));
            outcome
        }
    };

    publish_outcome_event(ctx, sub, &current, &outcome).await;
    let mut next = outcome_status(
        &current,
        &outcome,
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
    next.last_test = current.last_test.clone();
    if let Some(request) = inputs.test_request.clone() {
        let result = match (&outcome, &test_inputs) {
            (Outcome::Synced { observed, applied }, Some((desired, creds)))
                if observed.state == UpstreamState::Enabled =>
            {
                let upstream_id = applied.as_ref().map(|_| observed.id.as_str());
                test_event::send(sub, ctx, request, desired, upstream_id, creds).await
            }
            (Outcome::Manual { .. }, Some((desired, creds))) => {
                test_event::send(sub, ctx, request, desired, None, creds).await
            }
            _ => crate::api::subscription::LastTest {
                requested_at: request,
                result: TestResult::Failed,
                latency_ms: None,
                message: Some("the subscription is not Ready; see its conditions".into()),
            },
        };
        publish_test(ctx, sub, &result).await;
        next.last_test = Some(result);
    }
    if let Some(result) = test_event::check(sub, ctx) {
        publish_test(ctx, sub, &result).await;
        next.last_test = Some(result);
    }
    write_status(ctx, api, sub, written, next).await?;

    let (wait, failures) = next_pass(
        &outcome,
        &sub.spec.resync_interval,
        failures_before,
        rand::random(),
    );
    let wait = if test_event::is_pending(sub, ctx) {
        wait.min(test_event::RECHECK)
    } else {
        wait
    };
    tracing::debug!(namespace = %ns, name = %name, ?wait, failures, "next pass scheduled");
    let inputs = Inputs {
        test_request: None,
        ..inputs
    };
    ctx.subscription_memo.update(key, |m| {
        m.schedule = Some(Schedule {
            inputs,
            next_due: Instant::now() + wait,
            failures,
        })
    });
    Ok(Action::requeue(wait))
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
        ctx.subscription_memo
            .update(ObjectRef::from_obj(sub), |m| m.status = Some(written));
    }
    Ok(())
}

/// Why the URL the provider must call is not known yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("neither endpointRef nor url is set")]
    NoTarget,
    #[error("WebhookEndpoint {0} does not exist")]
    EndpointMissing(String),
    #[error(
        "WebhookEndpoint {0} has only an ingress path: configure the operator's public base URL"
    )]
    IngressPathOnly(String),
    #[error("WebhookEndpoint {0} is not Ready yet")]
    EndpointNotReady(String),
}

impl TargetError {
    /// Stable and low-cardinality, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TargetError::NoTarget => "no_target",
            TargetError::EndpointMissing(_) => "endpoint_missing",
            TargetError::IngressPathOnly(_) => "ingress_path_only",
            TargetError::EndpointNotReady(_) => "endpoint_not_ready",
        }
    }
}

/// Why a subscription's provider credentials cannot be read. Names the Secret and key,
/// never a value.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentialsRef is not set")]
    NotSet,
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
}

impl CredentialsError {
    /// Stable and low-cardinality, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CredentialsError::NotSet => "credentials_not_set",
            CredentialsError::Secret(secrets::SecretError::NotFound(_)) => "secret_not_found",
            CredentialsError::Secret(secrets::SecretError::MissingKey(..)) => "secret_missing_key",
            CredentialsError::Secret(secrets::SecretError::Api(..)) => "secret_unreadable",
            CredentialsError::Secret(secrets::SecretError::NotReferable(_)) => {
                "secret_not_referable"
            }
        }
    }
}

/// The URL the provider must call: the endpoint's ingress URL plus the subscription name,
/// or the external `url`. The inner `Err` says why it is not known yet.
async fn resolve_target(
    sub: &WebhookSubscription,
    ctx: &Context,
) -> Result<Result<String, TargetError>, Error> {
    if let Some(url) = &sub.spec.url {
        return Ok(Ok(url.clone()));
    }
    let Some(ep_ref) = &sub.spec.endpoint_ref else {
        return Ok(Err(TargetError::NoTarget));
    };
    let ns = sub.namespace().unwrap_or_default();
    let Some(ep) = ctx.endpoint(&ns, &ep_ref.name).await? else {
        return Ok(Err(TargetError::EndpointMissing(ep_ref.name.clone())));
    };
    let ready = ep.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == types::READY && c.status == "True")
    });
    let url = ep.status.as_ref().and_then(|s| s.ingress_url.clone());
    match url {
        Some(url) if ready && (url.starts_with("https://") || url.starts_with("http://")) => Ok(
            Ok(format!("{}/{}", url.trim_end_matches('/'), sub.name_any())),
        ),
        Some(_) if ready && sub.spec.provider != Provider::Atllas => {
            Ok(Err(TargetError::IngressPathOnly(ep_ref.name.clone())))
        }
        Some(url) if ready => Ok(Ok(format!(
            "{}/{}",
            url.trim_end_matches('/'),
            sub.name_any()
        ))),
        _ => Ok(Err(TargetError::EndpointNotReady(ep_ref.name.clone()))),
    }
}

/// Credentials and the Secret's resourceVersion, or why they cannot be read.
async fn read_credentials(
    ctx: &Context,
    ns: &str,
    spec: &WebhookSubscriptionSpec,
) -> Result<(Credentials, Option<String>), CredentialsError> {
    let Some(r) = &spec.credentials_ref else {
        return Err(CredentialsError::NotSet);
    };
    let secret =
        secrets::read_referenced(&ctx.client, ns, &r.name, ctx.config.require_secret_label).await?;
    let creds = match spec.provider {
        Provider::Atomic => Credentials {
            api_key: None,
            client_id: Some(secret.get_string(&r.client_id_key)?),
            client_secret: Some(secret.get_string(&r.client_secret_key)?),
        },
        _ => Credentials {
            api_key: Some(secret.get_string(&r.api_key_key)?),
            client_id: None,
            client_secret: None,
        },
    };
    Ok((creds, secret.resource_version.clone()))
}

/// Talks to the provider (or, for Atllas, prepares the manual set-up) and registers the
/// subscription's verification keys with the ingress.
async fn sync(
    sub: &WebhookSubscription,
    ctx: &Context,
    hook_url: String,
    creds: &Credentials,
    current: &WebhookSubscriptionStatus,
) -> Result<Outcome, Error> {
    let ns = sub.namespace().unwrap_or_default();
    let name = sub.name_any();
    let desired = translate(&ns, &name, &sub.spec, hook_url.clone());

    if sub.spec.provider == Provider::Atllas {
        let secret_name = sub.atllas_header_secret_name();
        let value =
            secrets::ensure_generated(&ctx.client, sub, &secret_name, HEADER_VALUE_KEY, || {
                hex::encode(secrets::random_secret()).into_bytes()
            })
            .await?;
        let mut fetched = build::Fetched::default();
        fetched.set_owned(
            &secret_name,
            Ok([(HEADER_VALUE_KEY.to_string(), value)].into()),
        );
        ctx.routes
            .subscription_keys(sub, build::verification_keys(sub, &fetched));
        return Ok(Outcome::Manual {
            hook_url,
            header_name: sub.spec.atllas_header_name(),
            secret_name,
        });
    }

    let provider = ctx.providers.get(sub.spec.provider);
    let result = match sub.spec.management_policy {
        ManagementPolicy::ObserveOnly => match provider.observe(creds, &desired).await {
            Ok(Some(observed)) => Ok((observed, None)),
            Ok(None) => return Ok(Outcome::MissingUpstream),
            Err(e) => Err(e),
        },
        ManagementPolicy::Manage => {
            let previous: Option<DesiredSubscription> = current
                .upstream
                .as_ref()
                .and_then(|u| u.applied.as_deref())
                .and_then(|s| serde_json::from_str(s).ok());
            // Once something was applied, look before writing: a subscription the provider
            // disabled is reported, not silently replaced (re-enabling is the user's call).
            let disabled = match previous.as_ref().filter(|p| **p == desired) {
                Some(_) => match provider.observe(creds, &desired).await {
                    Ok(Some(o)) if matches!(o.state, UpstreamState::Disabled { .. }) => Some(Ok(o)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                },
                None => None,
            };
            match disabled {
                Some(result) => result.map(|o| (o, previous.clone())),
                None => provider
                    .ensure(creds, &desired, previous.as_ref())
                    .await
                    .map(|o| (o, Some(desired.clone()))),
            }
        }
    };
    match result {
        Ok((observed, applied)) => {
            let mut fetched = build::Fetched::default();
            if let Some(secret) = &observed.signing_secret {
                // A changed provider secret (Atomic replacement, Smallest re-read) is
                // accepted in old and new form for the endpoint's rotation window.
                let secret_name = sub.provider_signing_secret_name();
                let owned = secrets::read_owned(&ctx.client, sub, &secret_name).await?;
                let decision = rotation::decide(
                    &owned,
                    secret.as_bytes(),
                    jiff::Timestamp::now(),
                    endpoint_overlap(sub, ctx).await,
                );
                let mut next = decision.stored.clone();
                next.insert(SIGNING_SECRET_KEY.into(), secret.as_bytes().to_vec());
                if next != owned {
                    secrets::write_owned(&ctx.client, sub, &secret_name, &next).await?;
                }
                if decision.rotated {
                    publish(ctx, sub, EventType::Normal, "ProviderSecretRotated", "Sync", "the provider's signing secret changed; the old one is accepted during the overlap window".into()).await;
                }
                fetched.set_owned(&secret_name, Ok(next));
            }
            ctx.routes
                .subscription_keys(sub, build::verification_keys(sub, &fetched));
            Ok(Outcome::Synced { observed, applied })
        }
        Err(e) => Ok(Outcome::Failed(e)),
    }
}

/// The rotation window of the endpoint the subscription receives on.
async fn endpoint_overlap(sub: &WebhookSubscription, ctx: &Context) -> Duration {
    let ns = sub.namespace().unwrap_or_default();
    let ep = match &sub.spec.endpoint_ref {
        Some(r) => ctx.endpoint(&ns, &r.name).await.ok().flatten(),
        None => None,
    };
    super::endpoint::rotation_overlap(ep.as_deref().and_then(|e| e.spec.signing.as_ref()))
}

/// An Event for every upstream change and for every new failure reason.
async fn publish_outcome_event(
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
        Outcome::MissingUpstream | Outcome::Manual { .. } => return,
    };
    if type_ == EventType::Warning && previous_reason.as_deref() == Some(reason) {
        return; // same failure as last time: the condition already says so
    }
    publish(ctx, sub, type_, reason, "Sync", note).await;
}

async fn cleanup(sub: &WebhookSubscription, ctx: &Context) -> Result<Action, Error> {
    ctx.routes.remove_subscription(sub);
    ctx.subscription_memo.forget(&ObjectRef::from_obj(sub));
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
            .get(sub.spec.provider)
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

/// An Event for a test's outcome (not for `Pending`).
async fn publish_test(
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

/// `status.events` from the ingress counters.
fn event_counters(ctx: &Context, sub: &WebhookSubscription) -> Option<EventCounters> {
    let time = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| jiff::Timestamp::try_from(t).ok())
            .and_then(|t| t.round(jiff::Unit::Second).ok())
            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
    };
    let (mismatches, last_mismatch) = ctx.routes.signature_failures(sub).unwrap_or_default();
    ctx.routes
        .counters(sub)
        .map(|(received, last)| EventCounters {
            received,
            last_received_time: time(last),
            signature_mismatches: mismatches,
            last_signature_mismatch_time: time(last_mismatch),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    /// The status after `outcome` at second `secs`, generation 1, no request handled.
    fn after(
        current: &WebhookSubscriptionStatus,
        outcome: &Outcome,
        secs: i64,
    ) -> WebhookSubscriptionStatus {
        outcome_status(current, outcome, Some(1), None, t(secs))
    }

    fn observed(state: UpstreamState, action: SyncAction) -> Observed {
        Observed {
            id: "up-1".into(),
            echo: Default::default(),
            state,
            signing_secret: None,
            action,
        }
    }

    fn applied() -> Option<DesiredSubscription> {
        Some(translate(
            "ns",
            "sub",
            &serde_json::from_value(
                serde_json::json!({"provider": "atlas", "events": ["call.ended"]}),
            )
            .unwrap(),
            "https://h.example.com/hooks/tok/sub".into(),
        ))
    }

    fn synced(state: UpstreamState, action: SyncAction, manage: bool) -> Outcome {
        Outcome::Synced {
            observed: observed(state, action),
            applied: if manage { applied() } else { None },
        }
    }

    /// (type, status, reason, message) of a condition.
    type Stated = (String, String, String, String);

    /// What each condition states, in order.
    fn summary(conditions: &[Condition]) -> Vec<Stated> {
        conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect()
    }

    fn c(type_: &str, status: &str, reason: &str, message: &str) -> Stated {
        (type_.into(), status.into(), reason.into(), message.into())
    }

    #[test]
    fn outcome_status_states_exactly_these_conditions() {
        let ready = || {
            c(
                "Ready",
                "True",
                "Ready",
                "the subscription exists upstream as specified",
            )
        };
        let disabled = || UpstreamState::Disabled {
            message: "paused by the provider".into(),
        };
        let cases: Vec<(&str, Outcome, Vec<Stated>)> = vec![
            (
                "created",
                synced(UpstreamState::Enabled, SyncAction::Created, true),
                vec![ready(), c("Synced", "True", "Synced", "upstream id up-1")],
            ),
            (
                "adopted",
                synced(UpstreamState::Enabled, SyncAction::Adopted, true),
                vec![ready(), c("Synced", "True", "Adopted", "upstream id up-1")],
            ),
            (
                "recreated",
                synced(UpstreamState::Enabled, SyncAction::Recreated, true),
                vec![
                    ready(),
                    c("Synced", "True", "DriftRepaired", "upstream id up-1"),
                ],
            ),
            (
                "observe only",
                synced(UpstreamState::Enabled, SyncAction::Unchanged, false),
                vec![
                    ready(),
                    c("Synced", "True", "ObserveOnly", "upstream id up-1"),
                ],
            ),
            (
                "disabled upstream, even when adopted",
                synced(disabled(), SyncAction::Adopted, true),
                vec![
                    c(
                        "Ready",
                        "False",
                        "DisabledUpstream",
                        "paused by the provider",
                    ),
                    c("Synced", "True", "Synced", "upstream id up-1"),
                ],
            ),
            (
                "incomplete upstream",
                synced(
                    UpstreamState::Incomplete {
                        message: "trigger t2 is missing".into(),
                    },
                    SyncAction::Unchanged,
                    true,
                ),
                vec![
                    c("Ready", "False", "DriftDetected", "trigger t2 is missing"),
                    c("Synced", "True", "Synced", "upstream id up-1"),
                ],
            ),
            (
                "missing upstream",
                Outcome::MissingUpstream,
                vec![
                    c(
                        "Ready",
                        "False",
                        "NotFoundUpstream",
                        "ObserveOnly: no such subscription exists upstream",
                    ),
                    c(
                        "Synced",
                        "True",
                        "ObserveOnly",
                        "observed the provider; nothing found",
                    ),
                ],
            ),
            (
                "manual",
                Outcome::Manual {
                    hook_url: "https://h/hooks/t/sub".into(),
                    header_name: "X-Webhook-Token".into(),
                    secret_name: "sub-atllas-header".into(),
                },
                vec![
                    c(
                        "Ready",
                        "True",
                        "ManualSetupRequired",
                        "receive-only provider: add status.manualSetup.hookURL and the header to the provider's portal",
                    ),
                    c(
                        "Synced",
                        "True",
                        "ManualSetupRequired",
                        "nothing to sync: the provider has no API",
                    ),
                ],
            ),
            (
                "endpoint not ready",
                Outcome::EndpointNotReady(TargetError::EndpointNotReady("ep".into())),
                vec![
                    c(
                        "Ready",
                        "False",
                        "EndpointNotReady",
                        "WebhookEndpoint ep is not Ready yet",
                    ),
                    c(
                        "Synced",
                        "False",
                        "EndpointNotReady",
                        "WebhookEndpoint ep is not Ready yet",
                    ),
                    c(
                        "Reconciling",
                        "True",
                        "EndpointNotReady",
                        "WebhookEndpoint ep is not Ready yet",
                    ),
                ],
            ),
            (
                "credentials missing",
                Outcome::CredentialsMissing(CredentialsError::NotSet),
                vec![
                    c(
                        "Ready",
                        "False",
                        "CredentialsMissing",
                        "credentialsRef is not set",
                    ),
                    c(
                        "Synced",
                        "False",
                        "CredentialsMissing",
                        "credentialsRef is not set",
                    ),
                    c(
                        "Stalled",
                        "True",
                        "CredentialsMissing",
                        "credentialsRef is not set",
                    ),
                ],
            ),
            (
                "permanent provider failure stalls",
                Outcome::Failed(ProviderError::Unauthorized("bad key".into())),
                vec![
                    c("Ready", "False", "Unauthorized", "unauthorized: bad key"),
                    c("Synced", "False", "Unauthorized", "unauthorized: bad key"),
                    c("Stalled", "True", "Unauthorized", "unauthorized: bad key"),
                ],
            ),
            (
                "transient provider failure reconciles",
                Outcome::Failed(ProviderError::Unavailable("503".into())),
                vec![
                    c(
                        "Ready",
                        "False",
                        "UpstreamUnavailable",
                        "provider unavailable: 503",
                    ),
                    c(
                        "Synced",
                        "False",
                        "UpstreamUnavailable",
                        "provider unavailable: 503",
                    ),
                    c(
                        "Reconciling",
                        "True",
                        "UpstreamUnavailable",
                        "retrying: provider unavailable: 503",
                    ),
                ],
            ),
        ];
        for (name, outcome, want) in cases {
            let next = outcome_status(
                &WebhookSubscriptionStatus::default(),
                &outcome,
                Some(3),
                None,
                t(100),
            );
            assert_eq!(summary(&next.conditions), want, "{name}");
            assert!(
                next.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(3) && c.last_transition_time == t(100)),
                "{name}"
            );
            assert_eq!(next.observed_generation, Some(3), "{name}");
        }
    }

    #[test]
    fn outcome_status_records_the_upstream_and_manual_setup() {
        let current = WebhookSubscriptionStatus {
            last_handled_requested_at: Some("r1".into()),
            ..Default::default()
        };
        let cases = [
            ("enabled", UpstreamState::Enabled, "enabled"),
            (
                "disabled",
                UpstreamState::Disabled {
                    message: "m".into(),
                },
                "disabled",
            ),
            (
                "incomplete",
                UpstreamState::Incomplete {
                    message: "m".into(),
                },
                "incomplete",
            ),
            ("manual", UpstreamState::Manual, "manual"),
        ];
        for (name, state, want) in cases {
            let next = after(&current, &synced(state, SyncAction::Updated, true), 200);
            let up = next.upstream.expect(name);
            assert_eq!(up.state.as_deref(), Some(want), "{name}");
            assert_eq!(up.id.as_deref(), Some("up-1"), "{name}");
            assert_eq!(up.last_sync_time, Some(t(200)), "{name}");
            assert_eq!(up.applied, serde_json::to_string(&applied()).ok(), "{name}");
            // The last handled request is kept when the pass answers none.
            assert_eq!(next.last_handled_requested_at.as_deref(), Some("r1"));
        }

        // ObserveOnly keeps what was applied before (nothing new is applied).
        let before = outcome_status(
            &current,
            &synced(UpstreamState::Enabled, SyncAction::Created, true),
            Some(1),
            Some("r2".into()),
            t(200),
        );
        assert_eq!(before.last_handled_requested_at.as_deref(), Some("r2"));
        let observed = after(
            &before,
            &synced(UpstreamState::Enabled, SyncAction::Unchanged, false),
            300,
        );
        assert_eq!(
            observed.upstream.as_ref().unwrap().applied,
            before.upstream.as_ref().unwrap().applied
        );

        // Manual: no upstream, the set-up the user needs.
        let manual = after(
            &before,
            &Outcome::Manual {
                hook_url: "https://h/hooks/t/sub".into(),
                header_name: "X-Webhook-Token".into(),
                secret_name: "sub-atllas-header".into(),
            },
            300,
        );
        assert_eq!(manual.upstream, None);
        assert_eq!(
            manual.manual_setup,
            Some(ManualSetup {
                hook_url: Some("https://h/hooks/t/sub".into()),
                header_name: Some("X-Webhook-Token".into()),
                secret_name: Some("sub-atllas-header".into()),
            })
        );
    }

    #[test]
    fn outcome_status_keeps_transition_times_while_status_holds() {
        let first = after(
            &WebhookSubscriptionStatus::default(),
            &Outcome::Failed(ProviderError::Unavailable("503".into())),
            100,
        );
        // Still failing, for another reason: Ready stays False since t(100).
        let second = after(
            &first,
            &Outcome::Failed(ProviderError::Unauthorized("bad key".into())),
            200,
        );
        let at = |s: &WebhookSubscriptionStatus, ty: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == ty)
                .map(|c| c.last_transition_time.clone())
        };
        assert_eq!(at(&second, "Ready"), Some(t(100)));
        assert_eq!(at(&second, "Stalled"), Some(t(200)));
        let third = after(
            &second,
            &synced(UpstreamState::Enabled, SyncAction::Created, true),
            300,
        );
        assert_eq!(at(&third, "Ready"), Some(t(300)));
        assert_eq!(
            at(&third, "Stalled"),
            None,
            "conditions not stated are dropped"
        );
    }

    #[tokio::test]
    async fn cleanup_forgets_everything_the_subscription_passes_remembered() {
        let ctx = super::super::test_support::offline_context();
        // Atllas: nothing upstream to delete, so cleanup makes no call.
        let sub: WebhookSubscription = serde_json::from_value(serde_json::json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
            "metadata": {"name": "calls", "namespace": "b"},
            "spec": {"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}}
        }))
        .unwrap();
        let key = ObjectRef::from_obj(&sub);
        ctx.subscription_memo.update(key.clone(), |m| {
            m.handled_test = Some("t1".into());
            m.schedule = Some(Schedule {
                inputs: inputs(1),
                next_due: Instant::now(),
                failures: 2,
            });
        });
        cleanup(&sub, &ctx).await.unwrap();
        assert!(ctx.subscription_memo.is_empty());
    }

    fn inputs(generation: i64) -> Inputs {
        Inputs {
            generation: Some(generation),
            credentials_version: Some("7".into()),
            hook_url: Some("https://h/hooks/t/sub".into()),
            requested_at: None,
            test_request: None,
        }
    }

    #[test]
    fn gate_calls_the_provider_only_when_something_changed_or_is_due() {
        let now = Instant::now();
        let schedule = |next_due: Instant, failures: u32| Schedule {
            inputs: inputs(1),
            next_due,
            failures,
        };
        let later = now + Duration::from_secs(30);
        let earlier = now - Duration::from_secs(1);
        let with_test = Inputs {
            test_request: Some("t1".into()),
            ..inputs(1)
        };
        let new_secret = Inputs {
            credentials_version: Some("8".into()),
            ..inputs(1)
        };
        let run = |failures_before: u32| Gate::Run { failures_before };
        let wait = Gate::Wait(Duration::from_secs(30));
        let (not_due, due) = (Some(schedule(later, 2)), Some(schedule(earlier, 2)));
        let flipped = "verification flipped: failures carry over";
        let cases = [
            ("first pass", None, inputs(1), false, run(0)),
            (
                "nothing changed, not due",
                not_due.clone(),
                inputs(1),
                false,
                wait,
            ),
            ("due: failures carry over", due, inputs(1), false, run(2)),
            (flipped, not_due.clone(), inputs(1), true, run(2)),
            (
                "spec changed: failures reset",
                not_due.clone(),
                inputs(2),
                false,
                run(0),
            ),
            (
                "credentials Secret changed",
                not_due,
                new_secret,
                false,
                run(0),
            ),
            (
                "a new test request",
                Some(schedule(later, 0)),
                with_test,
                false,
                run(0),
            ),
        ];
        for (name, schedule, inputs, flipped, want) in cases {
            assert_eq!(
                gate(schedule.as_ref(), &inputs, flipped, now),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn next_pass_waits_by_outcome() {
        let s = Duration::from_secs;
        let cases = [
            (
                "synced: resync",
                synced(UpstreamState::Enabled, SyncAction::Created, true),
                "90s",
                3,
                (s(90), 0),
            ),
            (
                "unparsable resync: 5m",
                Outcome::MissingUpstream,
                "soon",
                0,
                (s(300), 0),
            ),
            (
                "endpoint not ready",
                Outcome::EndpointNotReady(TargetError::NoTarget),
                "90s",
                4,
                (s(10), 0),
            ),
            (
                "credentials missing",
                Outcome::CredentialsMissing(CredentialsError::NotSet),
                "90s",
                4,
                (s(60), 0),
            ),
            (
                "failed: backoff grows",
                Outcome::Failed(ProviderError::Unavailable("x".into())),
                "90s",
                2,
                (s(4), 3),
            ),
            (
                "failed: Retry-After honoured",
                Outcome::Failed(ProviderError::RateLimited {
                    retry_after: Some(s(42)),
                }),
                "90s",
                0,
                (s(42), 1),
            ),
        ];
        for (name, outcome, resync, failures_before, want) in cases {
            assert_eq!(
                next_pass(&outcome, resync, failures_before, 0.5),
                want,
                "{name}"
            );
        }
    }
}
