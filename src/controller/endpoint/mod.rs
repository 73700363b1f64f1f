//! The WebhookEndpoint reconciler: assigns the unguessable ingress URL, makes sure a
//! signing secret exists, hands the delivery configuration to the data plane, and writes
//! `Ready`, `Healthy` and the delivery statistics (batched: the refresher triggers a pass
//! only when the data plane's numbers changed).

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;

use super::{Context, Error};
use crate::api::WebhookSubscription;
use crate::api::conditions::types;
use crate::api::endpoint::WebhookEndpoint;

mod configure;
mod problem;
mod replay;
mod rotation;
mod secrets;
mod status;
mod validate;

pub use problem::EndpointProblem;
pub use replay::replay_filter;
pub use rotation::rotation_overlap;
pub use status::{ingress_url, next_status, secret_hash};

pub const FINALIZER: &str = "hooks.webhook-operator.dev/delivery";
pub use crate::api::{
    REPLAY_ANNOTATION, REPLAY_BY_ANNOTATION, REPLAY_SINCE_ANNOTATION, REPLAY_UNTIL_ANNOTATION,
    ROTATE_ANNOTATION,
};

reconcile_under_finalizer!(WebhookEndpoint);

/// The endpoint was deleted: its routes, its queued events and what passes remembered
/// about it go with it.
async fn cleanup(ep: &WebhookEndpoint, ctx: &Context) -> Result<Action, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let key = super::routes::key_of(ep);
    ctx.memos.endpoints.forget(&key);
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

/// One pass: secrets → rotation → validate → configure → replay → status. Each step is
/// a module of its own; each hands the next what it found.
async fn apply(
    ep: &WebhookEndpoint,
    ctx: &Context,
    api: &Api<WebhookEndpoint>,
) -> Result<Action, Error> {
    let key = super::routes::key_of(ep);
    let written = ctx.memos.endpoints.read(&key, |m| m.status.written());
    // Read after the memo: once it has dropped our last write, the cache holds it.
    // (`super::status` is the controller's status store; `status` is this pass's step.)
    let cached = super::newest(&ctx.watched.endpoints, ep);
    let status_of = super::status::source(ep, written.as_ref(), cached.as_deref());
    let current = super::status::current(status_of, written.as_ref())
        .cloned()
        .unwrap_or_default();

    let read = secrets::read(ep, ctx).await?;
    let rotated = rotation::apply(ep, ctx, read).await?;
    let mut validated = validate::validate(ep, ctx, &rotated);
    configure::configure(ctx, &key, &mut validated);
    let last_replay = replay::replay(ep, ctx, &key, &current).await;

    let next = status::next(
        ep,
        ctx,
        &key,
        &current,
        &rotated,
        &mut validated,
        last_replay,
    );
    status::publish_transitions(ctx, ep, &current, &next).await;
    if let Some(written) = super::status::apply_if_changed(api, status_of, written, next).await? {
        ctx.memos
            .endpoints
            .update(key.clone(), |m| m.status.keep(written));
    }
    let wait = status::requeue(&validated.problems, rotated.overlap_ends);
    Ok(Action::requeue(wait))
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
        || ep.spec.tls_secret_names().any(|n| n == name)
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
    use crate::api::conditions::reasons;
    use crate::controller::build::ingress_token;
    use crate::controller::conditions;

    #[tokio::test]
    async fn cleanup_forgets_the_endpoints_handled_replay() {
        let ctx = super::super::test_support::offline_context();
        let spec = serde_json::json!({"destination": {"service": {"name": "sink", "port": 8080}}});
        let ep: WebhookEndpoint =
            super::super::test_support::object("WebhookEndpoint", "a", "orders", spec);
        let key = super::super::routes::EndpointKey::new("a", "orders");
        let other = super::super::routes::EndpointKey::new("a", "invoices");
        for k in [&key, &other] {
            ctx.memos
                .endpoints
                .update(k.clone(), |m| m.handled_replay = Some("r1".into()));
        }
        cleanup(&ep, &ctx).await.unwrap();
        // A re-created endpoint of the same name answers the same request value again.
        assert_eq!(
            ctx.memos.endpoints.read(&key, |m| m.handled_replay.clone()),
            None
        );
        assert_eq!(
            ctx.memos
                .endpoints
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
            &[EndpointProblem::DestinationRefused(
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
