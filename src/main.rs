use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhook_operator::{api, config::OperatorConfig, controller, telemetry};

#[derive(Parser)]
#[command(name = "webhook-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRD YAML of both kinds.
    Crd,
    /// Run the operator against the current kubeconfig or the in-cluster config.
    Run(OperatorConfig),
    /// Serve the provider simulators (Atlas, Atomic, Smallest) for tests and demos.
    Sandbox(webhook_operator::sandbox::SandboxArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", api::crds_yaml()),
        Command::Sandbox(args) => {
            telemetry::init(false);
            webhook_operator::sandbox::run(args).await?
        }
        Command::Run(config) => {
            telemetry::init(config.log_json);
            let _ = rustls::crypto::ring::default_provider().install_default();
            tracing::info!(?config, "starting");
            let client = kube::Client::try_default().await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let ctx = Arc::new(controller::Context { client, config });
            controller::run(ctx, shutdown).await;
            tracing::info!("stopped");
        }
    }
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}
