//! The `kubectl-webhooks` binary (kubectl runs it as `kubectl webhooks`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    kubectl_webhooks::plugin::run(kubectl_webhooks::plugin::Plugin::parse()).await
}
