use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhook_operator::dataplane::DataPlane;
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
    /// Re-queue the dead letters of a WebhookEndpoint (through the replay annotation).
    Replay(webhook_operator::replay::ReplayArgs),
    /// Serve the provider simulators (Atlas, Atomic, Smallest) for tests and demos.
    Sandbox(webhook_operator::sandbox::SandboxArgs),
    /// Receive deliveries for the local demo: verify their signatures and count them.
    DemoConsumer(webhook_operator::demo_consumer::DemoConsumerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", api::crds_yaml()),
        Command::Replay(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            webhook_operator::replay::run(args).await?
        }
        Command::Sandbox(args) => {
            telemetry::init(false);
            webhook_operator::sandbox::run(args).await?
        }
        Command::DemoConsumer(args) => {
            telemetry::init(false);
            webhook_operator::demo_consumer::run(args).await?
        }
        Command::Run(config) => {
            telemetry::init(config.log_json);
            let _ = rustls::crypto::ring::default_provider().install_default();
            tracing::info!(?config, "starting");
            let client = kube::Client::try_default().await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));

            std::fs::create_dir_all(&config.data_dir)?;
            let parser = Arc::new(webhook_operator::providers::ProviderParser);
            let data_plane = DataPlane::open(config.data_plane(), parser).await?;
            let ingress = serve(
                "ingress",
                config.ingress_addr,
                data_plane.ingress_router(),
                shutdown.clone(),
            )
            .await?;
            let ops = serve(
                "ops",
                config.ops_addr,
                data_plane.ops_router(),
                shutdown.clone(),
            )
            .await?;
            let delivery = data_plane.start_delivery(shutdown.clone().cancelled_owned());

            let ctx = Arc::new(controller::Context::new(
                client,
                config,
                Arc::new(data_plane),
            ));
            controller::run(ctx, shutdown).await;
            let _ = tokio::join!(ingress, ops, delivery);
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

/// Binds `addr` and serves `router` until `shutdown`.
async fn serve(
    what: &'static str,
    addr: std::net::SocketAddr,
    router: axum::Router,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(server = what, addr = %listener.local_addr()?, "listening");
    Ok(tokio::spawn(async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(server = what, error = %e, "server failed");
        }
    }))
}
