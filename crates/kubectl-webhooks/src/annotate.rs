//! Requests declared as annotations (README "Requests declared in Git"), made from the
//! command line: set the annotations on one object, then wait until the operator echoes the
//! request in its status. The CLI and GitOps thus share one mechanism.

use std::fmt::Debug;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use webhook_api::{WebhookEndpoint, WebhookEndpointStatus};

/// A fresh request value: the current time, so each request differs from the last.
pub fn request_value() -> String {
    jiff::Timestamp::now().to_string()
}

/// Requests on the endpoint `name` with `annotations` and waits until the status field
/// `echo` shows `request` (the request value among them).
pub async fn request_on_endpoint(
    api: &Api<WebhookEndpoint>,
    name: &str,
    annotations: Map<String, Value>,
    timeout: Duration,
    request: &str,
    echo: fn(&WebhookEndpointStatus) -> Option<&str>,
) -> anyhow::Result<()> {
    annotate_and_wait(api, name, annotations, timeout, |ep| {
        (ep.status.as_ref().and_then(echo)? == request).then_some(())
    })
    .await
}

/// Merges `annotations` (a `null` value removes one) into `name`, then polls until
/// `handled` returns `Some` for the object or `timeout` passes.
pub async fn annotate_and_wait<K, T>(
    api: &Api<K>,
    name: &str,
    annotations: Map<String, Value>,
    timeout: Duration,
    handled: impl Fn(&K) -> Option<T>,
) -> anyhow::Result<T>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    let patch = serde_json::json!({"metadata": {"annotations": annotations}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(done) = handled(&api.get(name).await?) {
            return Ok(done);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the operator did not handle the request on {name} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
