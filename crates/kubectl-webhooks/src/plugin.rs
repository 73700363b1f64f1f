//! `kubectl webhooks`: the operator's binary installed under the kubectl plugin name
//! `kubectl-webhooks` (a symlink or a copy; `main` dispatches on the program name). Every
//! command but `status` is a request declared as an annotation (README "Requests declared
//! in Git"): it sets the annotation and waits for the operator's echo, so the CLI and
//! GitOps stay one mechanism.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Map, Value};

use crate::annotate::{annotate_and_wait, request_on_endpoint, request_value};
use crate::replay::ReplayArgs;
use webhook_api::{
    ROTATE_ANNOTATION, TEST_REQUESTED_AT_ANNOTATION, WebhookEndpoint, WebhookSubscription,
};

/// The program name kubectl looks for on `PATH` for `kubectl webhooks`.
pub const PLUGIN_NAME: &str = "kubectl-webhooks";

/// Whether the process runs as the kubectl plugin (by its program name).
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_stem())
        .is_some_and(|n| n == PLUGIN_NAME)
}

/// `kubectl webhooks`: status of and requests to the operator's objects.
#[derive(clap::Parser, Debug)]
#[command(name = "kubectl-webhooks", bin_name = "kubectl webhooks", version)]
pub struct Plugin {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// One table of WebhookEndpoints and WebhookSubscriptions: readiness, health or sync,
    /// deliveries, backlog and the last error.
    Status(StatusArgs),
    /// Send one test event through a subscription's whole path and wait for its result.
    Test(RequestArgs),
    /// Re-queue an endpoint's dead letters (the same as `webhook-operator replay`).
    Replay(ReplayArgs),
    /// Rotate an endpoint's generated signing secret and wait until it is in force.
    Rotate(RequestArgs),
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Namespace (default: the kubeconfig's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(clap::Args, Debug)]
pub struct RequestArgs {
    /// The object's name.
    pub name: String,
    /// Its namespace (default: the kubeconfig's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// How long to wait for the operator to handle the request.
    #[arg(long, default_value = "60s", value_parser = |s: &str| webhook_api::duration::parse_go_duration(s).map_err(|e| e.to_string()))]
    pub timeout: Duration,
}

pub async fn run(plugin: Plugin) -> anyhow::Result<()> {
    match plugin.command {
        PluginCommand::Status(args) => status(args).await,
        PluginCommand::Test(args) => test(args).await,
        PluginCommand::Replay(args) => crate::replay::run(args).await,
        PluginCommand::Rotate(args) => rotate(args).await,
    }
}

fn one_annotation(name: &str, value: &str) -> Map<String, Value> {
    Map::from_iter([(name.to_string(), Value::from(value))])
}

async fn namespaced<K>(namespace: Option<String>) -> anyhow::Result<(Api<K>, String)>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    let client = Client::try_default().await?;
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    Ok((Api::namespaced(client, &ns), ns))
}

async fn test(args: RequestArgs) -> anyhow::Result<()> {
    let (api, ns) = namespaced::<WebhookSubscription>(args.namespace).await?;
    let request = request_value();
    let last = annotate_and_wait(
        &api,
        &args.name,
        one_annotation(TEST_REQUESTED_AT_ANNOTATION, &request),
        args.timeout,
        |sub| {
            let t = sub.status.as_ref()?.last_test.as_ref()?;
            (t.requested_at == request && t.result != "Pending").then(|| t.clone())
        },
    )
    .await?;
    let latency = last
        .latency_ms
        .map(|ms| format!(" in {ms:.0} ms"))
        .unwrap_or_default();
    let message = last.message.unwrap_or_default();
    println!(
        "test of {ns}/{}: {}{latency} {message}",
        args.name, last.result
    );
    if last.result != "Delivered" {
        anyhow::bail!("the test event was not delivered");
    }
    Ok(())
}

async fn rotate(args: RequestArgs) -> anyhow::Result<()> {
    let (api, ns) = namespaced::<WebhookEndpoint>(args.namespace).await?;
    let request = request_value();
    request_on_endpoint(
        &api,
        &args.name,
        one_annotation(ROTATE_ANNOTATION, &request),
        args.timeout,
        &request,
        |s| s.last_handled_rotation.as_deref(),
    )
    .await?;
    println!(
        "signing secret of {ns}/{} rotated (request {request}); the previous one still signs during rotationOverlap",
        args.name
    );
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let (endpoints, subs): (Api<WebhookEndpoint>, Api<WebhookSubscription>) = if args.all_namespaces
    {
        (Api::all(client.clone()), Api::all(client))
    } else {
        let ns = args
            .namespace
            .unwrap_or_else(|| client.default_namespace().to_string());
        (
            Api::namespaced(client.clone(), &ns),
            Api::namespaced(client, &ns),
        )
    };
    let mut rows = vec![row(&[
        "NAMESPACE",
        "KIND",
        "NAME",
        "READY",
        "HEALTH",
        "DELIVERED",
        "RETRYING",
        "DEAD",
        "LAST ERROR",
    ])];
    for ep in endpoints.list(&ListParams::default()).await?.items {
        let s = ep.status.clone().unwrap_or_default();
        let d = s.delivery.unwrap_or_default();
        let figures = [
            d.delivered.to_string(),
            d.retrying.to_string(),
            d.dead_lettered.to_string(),
        ];
        let last_error = d
            .last_error
            .unwrap_or_else(|| failing_message(&s.conditions));
        let kind = ("endpoint", "Healthy");
        rows.push(status_row(&ep, kind, &s.conditions, figures, last_error));
    }
    for sub in subs.list(&ListParams::default()).await?.items {
        let s = sub.status.clone().unwrap_or_default();
        let figures = ["-", "-", "-"].map(String::from);
        let last_error = failing_message(&s.conditions);
        let kind = ("subscription", "Synced");
        rows.push(status_row(&sub, kind, &s.conditions, figures, last_error));
    }
    print!("{}", table(&rows));
    Ok(())
}

/// One row of `status`: the object, its `Ready` status and the reason of its second
/// condition (`kind` is the kind's name and that condition's type), then the delivery
/// figures and the last error.
fn status_row(
    obj: &impl ResourceExt,
    (kind, second): (&str, &str),
    conditions: &[Condition],
    figures: [String; 3],
    last_error: String,
) -> Vec<String> {
    let mut row = vec![
        obj.namespace().unwrap_or_default(),
        kind.to_string(),
        obj.name_any(),
        cond_status(conditions, "Ready"),
        cond_reason(conditions, second),
    ];
    row.extend(figures);
    row.push(last_error);
    row
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn cond_status(conditions: &[Condition], type_: &str) -> String {
    find(conditions, type_).map_or("Unknown".into(), |c| c.status.clone())
}

fn cond_reason(conditions: &[Condition], type_: &str) -> String {
    find(conditions, type_).map_or("-".into(), |c| c.reason.clone())
}

/// The message of the first condition that is not well (`Ready`, `Healthy`, `Synced`
/// False), or `-`.
fn failing_message(conditions: &[Condition]) -> String {
    conditions
        .iter()
        .find(|c| ["Ready", "Healthy", "Synced"].contains(&c.type_.as_str()) && c.status == "False")
        .map_or("-".into(), |c| c.message.clone())
}

/// Left-aligned columns two spaces apart, like kubectl's tables; a cell is kept to one
/// line of at most 80 characters.
fn table(rows: &[Vec<String>]) -> String {
    let clean = |c: &str| -> String {
        let one_line = c.replace(['\n', '\r'], " ");
        if one_line.chars().count() > 80 {
            one_line.chars().take(79).chain(['…']).collect()
        } else {
            one_line
        }
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_keeps_cells_on_one_line() {
        let t = table(&[
            row(&["NAME", "LAST ERROR"]),
            row(&["orders-long", "HTTP 500\nsecond line"]),
        ]);
        assert_eq!(
            t,
            "NAME         LAST ERROR\norders-long  HTTP 500 second line\n"
        );
    }
}
