//! The route handshake's leader side: the leader routes the subscription itself before it
//! calls the provider, and registers a URL (or changes it there) only once every ready
//! replica's ingress routes it (see [`crate::controller::replicas`]).

use super::*;
use crate::controller::replicas::{self, HANDSHAKE_TIMEOUT};

/// What the handshake decided for this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Routing {
    /// No provider call is due (the inputs are not there).
    Skipped,
    /// No wait: a single replica, a receive-only or observed subscription, or the provider
    /// has this URL from us already.
    NotNeeded,
    /// Every live replica reported the marker's resourceVersion.
    Routed,
    /// Some replica does not route the URL yet (the message says which).
    Pending(String),
}

/// Whether registering `hook_url` must wait for the replicas: the operator writes it to
/// the provider (not Atllas, not ObserveOnly), on an endpoint of ours (not `spec.url`),
/// and the provider does not have this URL from
/// us yet (a new subscription, a new token, another endpoint, or a registration that
/// failed). Re-creating the URL already registered (drift repair) does not wait: every
/// replica routes it already.
pub(super) fn needed(
    sub: &WebhookSubscription,
    current: &WebhookSubscriptionStatus,
    hook_url: &str,
) -> bool {
    if sub.spec.provider == Provider::Atllas
        || sub.spec.management_policy == ManagementPolicy::ObserveOnly
        || sub.spec.endpoint_ref.is_none()
    {
        return false;
    }
    let registered: Option<String> = current
        .upstream
        .as_ref()
        .and_then(|u| u.applied.as_deref())
        .and_then(|s| serde_json::from_str::<DesiredSubscription>(s).ok())
        .map(|d| d.hook_url);
    registered.as_deref() != Some(hook_url)
}

/// The leader's own ingress routes the subscription with the keys known now (possibly
/// none yet): before the provider is called, so the provider can never send first.
async fn route_here(sub: &WebhookSubscription, ctx: &Context) -> Result<(), Error> {
    if sub.spec.provider == Provider::Atllas {
        return Ok(()); // its header value is generated and routed by the manual set-up
    }
    let mut fetched = build::Fetched::default();
    fetched
        .read_owned(&ctx.secrets, sub, &sub.provider_signing_secret_name())
        .await?;
    ctx.routes
        .subscription_keys(sub, build::verification_keys(sub, &fetched));
    Ok(())
}

/// Routes the subscription here, then, when needed, writes the `RoutesPending` marker and
/// waits (at most [`HANDSHAKE_TIMEOUT`]) until every live replica routes through it.
/// `written` and `current` follow the marker write.
pub(super) async fn ensure_routed(
    sub: &WebhookSubscription,
    ctx: &Context,
    api: &Api<WebhookSubscription>,
    status_of: &WebhookSubscription,
    written: &mut Option<status::Written<WebhookSubscriptionStatus>>,
    current: &mut WebhookSubscriptionStatus,
    hook_url: &str,
) -> Result<Routing, Error> {
    route_here(sub, ctx).await?;
    let Some(replicas) = ctx.replicas() else {
        return Ok(Routing::NotNeeded);
    };
    if !needed(sub, current, hook_url) {
        return Ok(Routing::NotNeeded);
    }
    let mut marked = current.clone();
    marked.conditions = with_condition(
        &current.conditions,
        Desired::new(
            types::ROUTED,
            false,
            reasons::ROUTES_PENDING,
            "waiting until every replica routes the hook URL before registering it",
        ),
        sub.meta().generation,
    );
    let rv = match status::apply_if_changed(api, status_of, written.clone(), marked.clone()).await?
    {
        Some(w) => {
            let rv = w.produced().map(str::to_string);
            ctx.memos
                .subscriptions
                .update(ObjectRef::from_obj(sub), |m| m.status.keep(w.clone()));
            *written = Some(w);
            *current = marked;
            rv
        }
        // The marker is there already: the newest version we know carries it.
        None => [
            sub.meta().resource_version.as_deref(),
            status_of.meta().resource_version.as_deref(),
            written.as_ref().and_then(|w| w.produced()),
        ]
        .into_iter()
        .filter_map(replicas::version)
        .max()
        .map(|v| v.to_string()),
    };
    let Some(rv) = replicas::version(rv.as_deref()) else {
        tracing::warn!(
            ?rv,
            "resourceVersion is not an integer: registering without the route handshake"
        );
        return Ok(Routing::Routed);
    };
    let started = Instant::now();
    match replicas.wait_routed(rv, HANDSHAKE_TIMEOUT).await {
        Ok(n) => {
            tracing::info!(name = %sub.name_any(), replicas = n, waited_ms = started.elapsed().as_millis() as u64, "route handshake: every replica routes the hook URL");
            Ok(Routing::Routed)
        }
        Err(pending) => {
            tracing::warn!(name = %sub.name_any(), ?pending, "route handshake: replicas do not route the hook URL yet");
            Ok(Routing::Pending(format!(
                "not registered yet: replica(s) {} do not route the hook URL after {}s",
                pending.join(", "),
                HANDSHAKE_TIMEOUT.as_secs()
            )))
        }
    }
}

/// `conditions` with `desired` set (merged the kstatus way), the others kept.
fn with_condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    desired: Desired,
    generation: Option<i64>,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let set = conditions::merge(conditions, &[desired], generation, conditions::now());
    let mut out: Vec<_> = conditions
        .iter()
        .filter(|c| c.type_ != set[0].type_)
        .cloned()
        .collect();
    out.extend(set);
    out
}

/// The next status's conditions with the `Routed` condition as this pass leaves it:
/// present once the leader registers (or is about to register) the URL, which is what
/// tells the followers they must route it before reporting the handshake done; gone when
/// nothing is registered (receive-only, observed, no endpoint).
pub(super) fn with_routed(
    next: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    sub: &WebhookSubscription,
    current: &WebhookSubscriptionStatus,
    outcome: &Outcome,
    routing: &Routing,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let mut next: Vec<_> = next
        .into_iter()
        .filter(|c| c.type_ != types::ROUTED)
        .collect();
    if sub.spec.provider == Provider::Atllas
        || sub.spec.management_policy == ManagementPolicy::ObserveOnly
        || matches!(outcome, Outcome::EndpointNotReady(_))
    {
        return next;
    }
    let desired = match routing {
        Routing::Routed => Desired::new(
            types::ROUTED,
            true,
            reasons::ROUTES_LOADED,
            "every replica's ingress routes the hook URL",
        ),
        Routing::Pending(why) => {
            Desired::new(types::ROUTED, false, reasons::ROUTES_PENDING, why.clone())
        }
        Routing::NotNeeded | Routing::Skipped => {
            next.extend(
                current
                    .conditions
                    .iter()
                    .find(|c| c.type_ == types::ROUTED)
                    .cloned(),
            );
            return next;
        }
    };
    let set = conditions::merge(
        &current.conditions,
        &[desired],
        sub.meta().generation,
        conditions::now(),
    );
    next.extend(set);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::subscription::UpstreamStatus;

    const URL: &str = "https://h.example.com/hooks/tok/sub";

    fn sub(provider: &str, observe: bool) -> WebhookSubscription {
        let mut spec = serde_json::json!({"provider": provider, "events": ["call.ended"],
            "endpointRef": {"name": "orders"}});
        if observe {
            spec["managementPolicy"] = "ObserveOnly".into();
        }
        crate::controller::test_support::object("WebhookSubscription", "ns", "sub", spec)
    }

    fn registered(url: &str) -> WebhookSubscriptionStatus {
        let s = sub("atlas", false);
        let applied = translate("ns", "sub", &s.spec, url.into());
        WebhookSubscriptionStatus {
            upstream: Some(UpstreamStatus {
                applied: serde_json::to_string(&applied).ok(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_url_the_provider_does_not_have_from_us_waits_for_the_replicas() {
        let new = WebhookSubscriptionStatus::default();
        assert!(needed(&sub("atlas", false), &new, URL), "new subscription");
        assert!(
            needed(
                &sub("smallest", false),
                &registered("https://h/old/sub"),
                URL
            ),
            "a new token or endpoint"
        );
        assert!(
            !needed(&sub("atlas", false), &registered(URL), URL),
            "the same URL again (drift repair, resync)"
        );
        assert!(
            !needed(&sub("atllas", false), &new, URL),
            "nothing registered"
        );
        assert!(!needed(&sub("atlas", true), &new, URL), "ObserveOnly");
        let mut external = sub("atlas", false);
        external.spec.endpoint_ref = None;
        assert!(!needed(&external, &new, URL), "spec.url: not our ingress");
    }

    fn routed_of(
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) -> Option<(String, String)> {
        conditions
            .iter()
            .find(|c| c.type_ == types::ROUTED)
            .map(|c| (c.status.clone(), c.reason.clone()))
    }

    #[test]
    fn the_routed_condition_follows_the_handshake_and_goes_with_the_endpoint() {
        let s = sub("atlas", false);
        let none = WebhookSubscriptionStatus::default();
        let pending = |m: &str| Routing::Pending(m.into());
        let failed = Outcome::Failed(ProviderError::Unavailable("down".into()));
        let got = with_routed(vec![], &s, &none, &failed, &Routing::Routed);
        assert_eq!(
            routed_of(&got),
            Some(("True".into(), reasons::ROUTES_LOADED.into()))
        );
        let mut after = none.clone();
        after.conditions = got;
        // A later pass that needs no handshake keeps it; one without an endpoint drops it.
        let kept = with_routed(vec![], &s, &after, &failed, &Routing::NotNeeded);
        assert_eq!(routed_of(&kept), routed_of(&after.conditions));
        let gone = with_routed(
            vec![],
            &s,
            &after,
            &Outcome::EndpointNotReady(TargetError::EndpointMissing("orders".into())),
            &Routing::Skipped,
        );
        assert_eq!(routed_of(&gone), None);
        let waiting = with_routed(
            vec![],
            &s,
            &after,
            &Outcome::RoutesPending("r1".into()),
            &pending("r1"),
        );
        assert_eq!(
            routed_of(&waiting),
            Some(("False".into(), reasons::ROUTES_PENDING.into()))
        );
        let manual = with_routed(
            vec![],
            &sub("atllas", false),
            &after,
            &failed,
            &Routing::Routed,
        );
        assert_eq!(routed_of(&manual), None, "Atllas: nothing registered");
    }
}
