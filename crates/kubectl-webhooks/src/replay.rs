//! `webhook-operator replay`: asks the operator to re-queue an endpoint's dead letters by
//! setting the replay annotation (the same request a GitOps change can make), then waits
//! until the operator echoes it in status.

use std::time::Duration;

use kube::Client;
use kube::api::Api;
use serde_json::json;

use crate::annotate::{request_on_endpoint, request_value};
use webhook_api::{
    REPLAY_ANNOTATION, REPLAY_BY_ANNOTATION, REPLAY_SINCE_ANNOTATION, REPLAY_UNTIL_ANNOTATION,
    WebhookEndpoint,
};

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The WebhookEndpoint whose dead letters are re-queued.
    pub endpoint: String,
    /// Its namespace (default: the kubeconfig's).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only events at or after this RFC 3339 time (see `--by`).
    #[arg(long)]
    pub since: Option<jiff::Timestamp>,
    /// Only events at or before this RFC 3339 time (see `--by`).
    #[arg(long)]
    pub until: Option<jiff::Timestamp>,
    /// Which time the window applies to.
    #[arg(long, value_parser = ["dead-lettered", "received"], default_value = "dead-lettered")]
    pub by: String,
    /// How long to wait for the operator to handle the request.
    #[arg(long, default_value = "60s", value_parser = |s: &str| webhook_api::duration::parse_go_duration(s).map_err(|e| e.to_string()))]
    pub timeout: Duration,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<WebhookEndpoint> = Api::namespaced(client, &ns);
    let request = request_value();
    let annotations = json!({
        REPLAY_ANNOTATION: request,
        REPLAY_SINCE_ANNOTATION: args.since.map(|t| t.to_string()),
        REPLAY_UNTIL_ANNOTATION: args.until.map(|t| t.to_string()),
        REPLAY_BY_ANNOTATION: args.by,
    });
    let serde_json::Value::Object(annotations) = annotations else {
        unreachable!("a JSON object literal")
    };
    request_on_endpoint(
        &api,
        &args.endpoint,
        annotations,
        args.timeout,
        &request,
        |s| s.last_handled_replay_at.as_deref(),
    )
    .await?;
    println!(
        "replay of {ns}/{} handled (request {request}); see its Events for the count",
        args.endpoint
    );
    Ok(())
}
