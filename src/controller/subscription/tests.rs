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
        &serde_json::from_value(serde_json::json!({"provider": "atlas", "events": ["call.ended"]}))
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
    let spec = serde_json::json!({"provider": "atllas", "events": ["call.finished"], "endpointRef": {"name": "orders"}});
    let sub: WebhookSubscription =
        super::super::test_support::object("WebhookSubscription", "b", "calls", spec);
    let key = ObjectRef::from_obj(&sub);
    ctx.memos.subscriptions.update(key.clone(), |m| {
        m.handled_test = Some("t1".into());
        m.schedule = Some(Schedule {
            inputs: inputs(1),
            next_due: Instant::now(),
            failures: 2,
        });
    });
    cleanup(&sub, &ctx).await.unwrap();
    assert!(ctx.memos.subscriptions.is_empty());
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

#[test]
fn a_resync_that_finds_everything_as_recorded_computes_the_same_status() {
    let first = after(
        &WebhookSubscriptionStatus::default(),
        &synced(UpstreamState::Enabled, SyncAction::Created, true),
        100,
    );
    assert_eq!(
        first.upstream.as_ref().unwrap().last_sync_time,
        Some(t(100))
    );
    // Later passes that find the upstream as recorded: the very same status, so the one
    // status writer writes nothing (before, the sync time moved on every pass).
    for secs in [400, 700] {
        let again = after(
            &first,
            &synced(UpstreamState::Enabled, SyncAction::Unchanged, true),
            secs,
        );
        assert_eq!(again, first, "a resync at {secs}");
    }
    // What the time dates moves it: the provider disabled the subscription.
    let disabled = after(
        &first,
        &synced(
            UpstreamState::Disabled {
                message: "off".into(),
            },
            SyncAction::Unchanged,
            true,
        ),
        900,
    );
    assert_eq!(disabled.upstream.unwrap().last_sync_time, Some(t(900)));
}
