//! The WebhookEndpoint reconciler: assigns the unguessable ingress URL, makes sure a
//! signing secret exists, hands the delivery configuration to the data plane, and writes
//! `Ready`, `Healthy` and the delivery statistics (batched: the refresher triggers a pass
//! only when the data plane's numbers changed).

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::build::{self, SecretRead, ingress_token};
use super::conditions::{self, Desired};
use super::routes::EndpointHealthView;
use super::{Context, Error, isolation, publish, rotation, secrets, status};
use crate::api::conditions::{reasons, types};
use crate::api::endpoint::{INGRESS_SECRET_KEY, SIGNING_KEY};
use crate::api::endpoint::{WebhookEndpoint, WebhookEndpointStatus};
use crate::api::{REQUESTED_AT_ANNOTATION, WebhookSubscription};

pub const FINALIZER: &str = "hooks.webhook-operator.dev/delivery";
pub use crate::api::{
    REPLAY_ANNOTATION, REPLAY_BY_ANNOTATION, REPLAY_SINCE_ANNOTATION, REPLAY_UNTIL_ANNOTATION,
    ROTATE_ANNOTATION,
};

/// The rotation request that produced the generated secret.
const ROTATION_REQUEST_KEY: &str = "rotation-request";

/// The dead letters a replay request selects, from its annotations. Without a window,
/// all of them; a window applies to the time they were dead-lettered or received.
pub fn replay_filter(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<crate::queue::ReplayFilter, String> {
    use crate::queue::ReplayFilter;
    let time = |k: &str| -> Result<Option<std::time::SystemTime>, String> {
        annotations
            .get(k)
            .map(|s| {
                s.parse::<jiff::Timestamp>()
                    .map(std::time::SystemTime::from)
                    .map_err(|_| format!("annotation {k} must be an RFC 3339 time, got {s:?}"))
            })
            .transpose()
    };
    let (since, until) = (
        time(REPLAY_SINCE_ANNOTATION)?,
        time(REPLAY_UNTIL_ANNOTATION)?,
    );
    let by = annotations.get(REPLAY_BY_ANNOTATION).map(String::as_str);
    if !matches!(by, None | Some("dead-lettered") | Some("received")) {
        return Err(format!(
            "annotation {REPLAY_BY_ANNOTATION} must be dead-lettered or received"
        ));
    }
    if since.is_none() && until.is_none() {
        return Ok(ReplayFilter::All);
    }
    let from = since.unwrap_or(std::time::UNIX_EPOCH);
    let to = until.unwrap_or_else(std::time::SystemTime::now);
    Ok(match by {
        Some("received") => ReplayFilter::ReceivedBetween { from, to },
        _ => ReplayFilter::DeadLetteredBetween { from, to },
    })
}

/// The rotation overlap window of an endpoint (24 h when unset).
pub fn rotation_overlap(signing: Option<&crate::api::endpoint::Signing>) -> Duration {
    let fallback = Duration::from_secs(24 * 3600);
    signing.map_or(fallback, |s| {
        crate::duration::parse_go_duration(&s.rotation_overlap).unwrap_or(fallback)
    })
}

fn generate_signing_secret() -> Vec<u8> {
    use base64::Engine;
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(secrets::random_secret())
    )
    .into_bytes()
}

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

reconcile_under_finalizer!(WebhookEndpoint);

/// The endpoint was deleted: its routes, its queued events and what passes remembered
/// about it go with it.
async fn cleanup(ep: &WebhookEndpoint, ctx: &Context) -> Result<Action, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let key = (ns.clone(), ep.name_any());
    ctx.endpoint_memo.forget(&key);
    ctx.routes.0.remove_endpoint(key.clone());
    // Its events go with it (README "Deleting an endpoint"); a failure keeps the finalizer
    // and is retried.
    let purged = ctx
        .routes
        .0
        .purge_endpoint(key)
        .await
        .map_err(|e| Error::Cleanup(super::CleanupError::PurgeEvents(e)))?;
    tracing::info!(namespace = %ns, name = %ep.name_any(), purged, "endpoint deleted with its queued events");
    Ok(Action::await_change())
}

async fn apply(
    ep: &WebhookEndpoint,
    ctx: &Context,
    api: &Api<WebhookEndpoint>,
) -> Result<Action, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let key = (ns.clone(), name.clone());
    let written = ctx.endpoint_memo.read(&key, |m| m.status.written());
    // Read after the memo: once it has dropped our last write, the cache holds it.
    let cached = super::newest(&ctx.endpoints, ep);
    let status_of = status::source(ep, written.as_ref(), cached.as_deref());
    let current = status::current(status_of, written.as_ref())
        .cloned()
        .unwrap_or_default();

    let mut problems: Vec<(&'static str, String)> = Vec::new();
    // A refused destination is reported first and nothing is handed to the data plane, so
    // nothing is delivered (an earlier configuration is withdrawn).
    let refused = isolation::check_destination(
        &ep.spec.destination,
        &ns,
        ctx.config.allow_cross_namespace_refs,
        &ctx.destinations,
    )
    .err();
    if let Some(refusal) = refused.clone() {
        problems.push(refusal);
    }

    // What this pass reads and writes of Secrets, for the shared build below.
    let mut fetched = build::Fetched::default();
    match secrets::ensure_generated(
        &ctx.secrets,
        ep,
        &ep.ingress_secret_name(),
        INGRESS_SECRET_KEY,
        secrets::random_secret,
    )
    .await
    {
        Ok(key) => fetched.set_owned(
            &ep.ingress_secret_name(),
            Ok([(INGRESS_SECRET_KEY.to_string(), key)].into()),
        ),
        Err(secrets::OwnedSecretError::NotOwned(_)) => {
            fetched.set_owned(&ep.ingress_secret_name(), Err(()))
        }
        Err(secrets::OwnedSecretError::Kube(e)) => return Err(e.into()),
    };

    // The signing secret: the user's, or one the operator generates (and regenerates on
    // request). Its rotation state lives in the owned `<endpoint>-signing` Secret.
    let owned_name = ep.signing_secret_name();
    let mut owned = match secrets::read_owned(&ctx.secrets, ep, &owned_name).await {
        Ok(data) => Some(data),
        Err(secrets::OwnedSecretError::NotOwned(_)) => None,
        Err(secrets::OwnedSecretError::Kube(e)) => return Err(e.into()),
    };
    let referenced = ep
        .spec
        .signing
        .as_ref()
        .and_then(|s| s.secret_ref.as_ref())
        .filter(|_| owned.is_some())
        .map(|r| &r.name)
        .into_iter()
        .chain(ep.spec.headers.iter().map(|h| &h.secret_key_ref.name));
    for name in referenced {
        fetched.read_referenced(&ctx.secrets, &ns, name).await;
    }
    let rotate_request = ep.annotations().get(ROTATE_ANNOTATION).cloned();
    let mut overlap_ends = None;
    if let Some(owned) = owned.as_mut() {
        // The handled request is kept next to the secret it produced (read from the API,
        // not the cache), so a pass that sees a stale object cannot rotate twice.
        let handled_rotation = owned
            .get(ROTATION_REQUEST_KEY)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let rotate_now = rotate_request.is_some() && rotate_request != handled_rotation;
        if ep
            .spec
            .signing
            .as_ref()
            .and_then(|s| s.secret_ref.as_ref())
            .is_none()
        {
            if rotate_now || !owned.contains_key(SIGNING_KEY) {
                owned.insert(SIGNING_KEY.into(), generate_signing_secret());
            }
            if let Some(request) = rotate_request.as_ref().filter(|_| rotate_now) {
                owned.insert(ROTATION_REQUEST_KEY.into(), request.clone().into_bytes());
            }
        }
        if let Ok(secret) = build::signing_secret(ep, &fetched, owned) {
            overlap_ends = rotate(ctx, ep, &owned_name, owned, &secret).await?;
        }
    }
    fetched.set_owned(&owned_name, owned.ok_or(()));
    let signing_secret = fetched
        .owned(&ep.metadata, &owned_name)
        .ok()
        .flatten()
        .and_then(|owned| build::signing_secret(ep, &fetched, &owned).ok());
    let delivery = build::endpoint_delivery(ep, &fetched).map_err(|p| problems.extend(p));

    if let Some(Err(e)) = ep
        .spec
        .filter
        .as_deref()
        .map(crate::delivery::filter::Filter::compile)
    {
        problems.push((reasons::FILTER_INVALID, format!("spec.filter: {e}")));
    }

    let token = fetched
        .owned(&ep.metadata, &ep.ingress_secret_name())
        .ok()
        .flatten()
        .and_then(|d| d.get(INGRESS_SECRET_KEY).map(|k| ingress_token(k)));
    if refused.is_some() {
        ctx.routes.0.remove_endpoint(key.clone());
    } else if let (true, Ok(delivery)) = (problems.is_empty(), &delivery)
        && let Err(refused) = ctx.routes.0.configure_endpoint(delivery)
    {
        problems.push(refused);
    }

    // Replay requested through the annotation, handled once per value.
    let replay_at = ep.annotations().get(REPLAY_ANNOTATION).cloned();
    // Remembered in memory too: the cached object may predate our own status write, and a
    // request must be handled once.
    let mut last_replay = ctx
        .endpoint_memo
        .read(&key, |m| m.handled_replay.clone())
        .or_else(|| current.last_handled_replay_at.clone());
    if replay_at.is_some() && replay_at != last_replay {
        let result = match replay_filter(ep.annotations()) {
            Ok(filter) => ctx.routes.0.replay(key.clone(), filter).await,
            Err(invalid) => {
                // A bad request is answered once; a new request value tries again.
                publish(
                    ctx,
                    ep,
                    EventType::Warning,
                    "ReplayInvalid",
                    "Replay",
                    invalid,
                )
                .await;
                Ok(0)
            }
        };
        match result {
            Ok(n) => {
                publish(
                    ctx,
                    ep,
                    EventType::Normal,
                    "Replayed",
                    "Replay",
                    format!("re-queued {n} dead-lettered events"),
                )
                .await;
                if let Some(r) = &replay_at {
                    ctx.endpoint_memo
                        .update(key.clone(), |m| m.handled_replay = Some(r.clone()));
                }
                last_replay = replay_at;
            }
            Err(e) => {
                publish(
                    ctx,
                    ep,
                    EventType::Warning,
                    "ReplayFailed",
                    "Replay",
                    e.to_string(),
                )
                .await;
            }
        }
    }

    let health = ctx.routes.0.endpoint_health(key.clone());
    if let Some((reason, msg)) = health.as_ref().and_then(|h| h.destination_error.clone()) {
        problems.push((reason, msg));
    }
    let mut next = next_status(
        &current,
        ep.meta().generation,
        token
            .as_deref()
            .map(|t| ingress_url(ctx.config.public_base_url.as_deref(), t)),
        signing_secret.as_deref().map(secret_hash),
        &problems,
        health.as_ref(),
        ep.annotations().get(REQUESTED_AT_ANNOTATION).cloned(),
        last_replay,
    );
    next.last_handled_rotation = if rotate_request.is_some() {
        rotate_request
    } else {
        current.last_handled_rotation.clone()
    };
    publish_transitions(ctx, ep, &current, &next).await;
    if let Some(written) = status::apply_if_changed(api, status_of, written, next).await? {
        ctx.endpoint_memo
            .update(key.clone(), |m| m.status.keep(written));
    }
    let mut wait = if problems.is_empty() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    };
    // Drop the old secret right when the overlap ends.
    if let Some(end) = overlap_ends {
        let left = end.duration_since(jiff::Timestamp::now());
        let left = Duration::try_from(left).unwrap_or_default() + Duration::from_millis(200);
        wait = wait.min(left);
    }
    Ok(Action::requeue(wait))
}

/// The next endpoint status. Pure.
#[allow(clippy::too_many_arguments)]
pub fn next_status(
    current: &WebhookEndpointStatus,
    generation: Option<i64>,
    ingress_url: Option<String>,
    signing_secret_hash: Option<String>,
    problems: &[(&'static str, String)],
    health: Option<&EndpointHealthView>,
    requested_at: Option<String>,
    last_replay: Option<String>,
) -> WebhookEndpointStatus {
    let ready = match problems.first() {
        Some((reason, msg)) => Desired::new(types::READY, false, reason, msg.clone()),
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
    if let Some((reason, msg)) = problems.first() {
        desired.push(Desired::new(types::STALLED, true, reason, msg.clone()));
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

/// Events when Ready or Healthy change.
async fn publish_transitions(
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

/// Whether the endpoint reads the Secret `name` of its namespace (signing secret or a
/// header value).
pub fn reads_secret(ep: &WebhookEndpoint, name: &str) -> bool {
    ep.spec
        .signing
        .as_ref()
        .and_then(|s| s.secret_ref.as_ref())
        .is_some_and(|r| r.name == name)
        || ep
            .spec
            .headers
            .iter()
            .any(|h| h.secret_key_ref.name == name)
}

/// Records `secret` as the one in force in the generated Secret `owned_name` (whose data
/// is `owned`), keeping the one it replaced for the overlap window; writes the Secret when
/// that changes it. Returns when the overlap ends.
async fn rotate(
    ctx: &Context,
    ep: &WebhookEndpoint,
    owned_name: &str,
    owned: &mut std::collections::BTreeMap<String, Vec<u8>>,
    secret: &[u8],
) -> Result<Option<jiff::Timestamp>, Error> {
    let decision = rotation::decide(
        owned,
        secret,
        jiff::Timestamp::now(),
        rotation_overlap(ep.spec.signing.as_ref()),
    );
    let mut next = decision.stored.clone();
    for key in [SIGNING_KEY, ROTATION_REQUEST_KEY] {
        if let Some(v) = owned.get(key) {
            next.insert(key.into(), v.clone());
        }
    }
    if next != *owned {
        secrets::write_owned(&ctx.secrets, ep, owned_name, &next).await?;
        *owned = next;
    }
    if decision.rotated {
        let until = decision
            .overlap_ends
            .map_or("now".to_string(), |t| t.to_string());
        publish(
            ctx,
            ep,
            EventType::Normal,
            "SigningSecretRotated",
            "Rotate",
            format!("signing with the new secret; the old one is also used until {until}"),
        )
        .await;
    }
    Ok(decision.overlap_ends)
}

/// What a subscription's pass reads of its endpoint, as one value that moves only when
/// that does: which object it is, its spec (the generation), its deletion, and whether it
/// is Ready at which ingress URL. Delivery figures and the other status fields do not
/// move it.
pub fn what_subscribers_read(ep: &WebhookEndpoint) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ep.metadata.uid.hash(&mut h);
    ep.metadata.generation.hash(&mut h);
    ep.metadata.deletion_timestamp.is_some().hash(&mut h);
    let status = ep.status.as_ref();
    status.and_then(|s| s.ingress_url.as_deref()).hash(&mut h);
    status
        .is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == types::READY && c.status == "True")
        })
        .hash(&mut h);
    Some(h.finish())
}

/// Subscriptions that receive on this endpoint (to re-check them when it changes).
pub fn subscribers<'a>(
    ep_ns: &'a str,
    ep_name: &'a str,
    subs: &'a [Arc<WebhookSubscription>],
) -> impl Iterator<Item = &'a Arc<WebhookSubscription>> + 'a {
    subs.iter().filter(move |s| {
        s.namespace().as_deref() == Some(ep_ns)
            && s.spec
                .endpoint_ref
                .as_ref()
                .is_some_and(|r| r.name == ep_name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cleanup_forgets_the_endpoints_handled_replay() {
        let ctx = super::super::test_support::offline_context();
        let spec = serde_json::json!({"destination": {"service": {"name": "sink", "port": 8080}}});
        let ep: WebhookEndpoint =
            super::super::test_support::object("WebhookEndpoint", "a", "orders", spec);
        let key = ("a".to_string(), "orders".to_string());
        let other = ("a".to_string(), "invoices".to_string());
        for k in [&key, &other] {
            ctx.endpoint_memo
                .update(k.clone(), |m| m.handled_replay = Some("r1".into()));
        }
        cleanup(&ep, &ctx).await.unwrap();
        // A re-created endpoint of the same name answers the same request value again.
        assert_eq!(
            ctx.endpoint_memo.read(&key, |m| m.handled_replay.clone()),
            None
        );
        assert_eq!(
            ctx.endpoint_memo
                .read(&other, |m| m.handled_replay.clone())
                .as_deref(),
            Some("r1")
        );
    }

    #[test]
    fn subscribers_are_re_checked_only_when_what_they_read_of_the_endpoint_moves() {
        let spec = serde_json::json!({"destination": {"service": {"name": "sink", "port": 8080}}});
        let base: WebhookEndpoint =
            super::super::test_support::object("WebhookEndpoint", "a", "orders", spec);
        let with = |f: &dyn Fn(&mut WebhookEndpoint)| {
            let mut ep = base.clone();
            ep.status = Some(
                serde_json::from_value(serde_json::json!({
                    "ingressUrl": "https://h.example/hooks/t",
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                        "message": "", "lastTransitionTime": "2026-11-25T00:00:00Z"}],
                }))
                .unwrap(),
            );
            f(&mut ep);
            what_subscribers_read(&ep)
        };
        let ready = with(&|_| {});
        // Delivery figures and other status fields: no pass for the subscribers.
        assert_eq!(
            ready,
            with(&|ep| {
                let st = ep.status.as_mut().unwrap();
                st.delivery = Some(Default::default());
                st.delivery.as_mut().unwrap().delivered = 1000;
                st.last_handled_replay_at = Some("r".into());
            })
        );
        // What the subscriptions read: each moves the value.
        let moved: [&dyn Fn(&mut WebhookEndpoint); 5] = [
            &|ep| ep.metadata.generation = Some(2),
            &|ep| ep.metadata.uid = Some("another".into()),
            &|ep| ep.metadata.deletion_timestamp = Some(conditions::now()),
            &|ep| {
                ep.status.as_mut().unwrap().ingress_url = Some("https://h.example/hooks/u".into())
            },
            &|ep| ep.status.as_mut().unwrap().conditions[0].status = "False".into(),
        ];
        for change in moved {
            assert_ne!(ready, with(change));
        }
    }

    #[test]
    fn token_depends_on_the_key_only_and_is_not_the_key() {
        let a = ingress_token(b"key-a");
        assert_eq!(a, ingress_token(b"key-a"));
        assert_ne!(a, ingress_token(b"key-b"));
        assert_eq!(a.len(), 40);
        assert!(!a.contains(&hex::encode(b"key-a")));
    }

    #[test]
    fn url_is_path_only_without_a_public_base() {
        assert_eq!(ingress_url(None, "t"), "/hooks/t");
        assert_eq!(
            ingress_url(Some("https://h.example.com/"), "t"),
            "https://h.example.com/hooks/t"
        );
    }

    #[test]
    fn a_problem_makes_the_endpoint_not_ready_and_stalled() {
        let st = next_status(
            &Default::default(),
            Some(2),
            Some("/hooks/t".into()),
            None,
            &[(
                reasons::DESTINATION_FORBIDDEN,
                "169.254.169.254 is link-local".into(),
            )],
            None,
            None,
            None,
        );
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "DestinationForbidden")
        );
        assert!(
            st.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True")
        );
        assert_eq!(st.observed_generation, Some(2));
    }

    #[test]
    fn secret_hash_does_not_reveal_the_secret() {
        let h = secret_hash(b"whsec_abc");
        assert!(h.starts_with("sha256:"));
        assert!(!h.contains("abc"));
    }
}
