//! Reconcilers for both kinds, and the wiring that runs them.

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::api::{WebhookEndpoint, WebhookSubscription};
use crate::config::OperatorConfig;

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `shutdown` is cancelled.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let ns = ctx.config.namespace.clone();
    let endpoints = Controller::new(
        api::<WebhookEndpoint>(&ctx.client, ns.as_deref()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(reconcile_endpoint, error_policy, ctx.clone())
    .for_each(|_| async {});
    let subscriptions = Controller::new(
        api::<WebhookSubscription>(&ctx.client, ns.as_deref()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(reconcile_subscription, error_policy, ctx.clone())
    .for_each(|_| async {});
    tokio::join!(endpoints, subscriptions);
}

async fn reconcile_endpoint(
    ep: Arc<WebhookEndpoint>,
    _ctx: Arc<Context>,
) -> Result<Action, kube::Error> {
    tracing::info!(namespace = ep.namespace().as_deref(), name = %ep.name_any(), kind = "WebhookEndpoint", "reconciling");
    Ok(Action::await_change())
}

async fn reconcile_subscription(
    sub: Arc<WebhookSubscription>,
    _ctx: Arc<Context>,
) -> Result<Action, kube::Error> {
    tracing::info!(namespace = sub.namespace().as_deref(), name = %sub.name_any(), kind = "WebhookSubscription", "reconciling");
    Ok(Action::await_change())
}

fn error_policy<K>(_obj: Arc<K>, err: &kube::Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, "reconcile failed");
    Action::requeue(std::time::Duration::from_secs(5))
}
