//! `webhook-sandbox`: the provider simulators as a process, for the local demo and tests
//! that need them out of process. Not part of the operator's image.

use clap::Parser;

/// Serve the provider simulators (Atlas, Atomic, Smallest, Atllas deliveries).
#[derive(Parser)]
#[command(name = "webhook-sandbox", version, about)]
struct Cli {
    #[command(flatten)]
    args: webhook_sandbox::SandboxArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    webhook_sandbox::run(Cli::parse().args).await
}
