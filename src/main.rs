/// A general-purpose allocator that keeps small, short-lived allocations (one request,
/// one event) off the system allocator's locks; see BENCHMARKS.md. `webhook_operator::allocator`
/// turns transparent huge pages off and returns freed pages at once when the resident size
/// passes its peak.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use webhook_operator::config::{OperatorConfig, QueueBackend};
use webhook_operator::dataplane::DataPlane;
use webhook_operator::queue::JetStreamQueue;
use webhook_operator::{api, controller, health, leader, telemetry};

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
    Run(Box<OperatorConfig>),
    /// Re-queue the dead letters of a WebhookEndpoint (through the replay annotation).
    Replay(webhook_operator::replay::ReplayArgs),
    /// Write a WebhookEndpoint's waiting events and dead letters as JSON Lines, from the
    /// queue the `run` flags name (the embedded queue only, with the operator stopped).
    Export(webhook_operator::transfer::ExportArgs),
    /// Store events written by `export` in the queue the `run` flags name (JetStream);
    /// ids are kept and dedupe applies, so a repeated import stores nothing twice.
    Import(webhook_operator::transfer::ImportArgs),
    /// Serve the provider simulators (Atlas, Atomic, Smallest) for tests and demos (the
    /// same as the `webhook-sandbox` binary).
    Sandbox(webhook_sandbox::SandboxArgs),
    /// Receive deliveries for the local demo: verify their signatures and count them.
    DemoConsumer(webhook_operator::demo_consumer::DemoConsumerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Installed as `kubectl-webhooks`, the binary is the kubectl plugin.
    if webhook_operator::plugin::invoked_as_plugin() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        return webhook_operator::plugin::run(webhook_operator::plugin::Plugin::parse()).await;
    }
    match Cli::parse().command {
        Command::Crd => print!("{}", api::crds_yaml()),
        Command::Replay(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            webhook_operator::replay::run(args).await?
        }
        Command::Export(args) => webhook_operator::transfer::export(args).await?,
        Command::Import(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            webhook_operator::transfer::import(args).await?
        }
        Command::Sandbox(args) => {
            telemetry::init(false);
            webhook_sandbox::run(args).await?
        }
        Command::DemoConsumer(args) => {
            telemetry::init(false);
            webhook_operator::demo_consumer::run(args).await?
        }
        Command::Run(config) => run(*config).await?,
    }
    Ok(())
}

/// `webhook-operator run`: the data plane, its servers and the controllers until `SIGTERM`.
async fn run(config: OperatorConfig) -> anyhow::Result<()> {
    config.check_resolve_overrides()?;
    telemetry::init(config.log_json);
    // After logging, so that a refusal of huge pages that fails is logged.
    webhook_operator::allocator::set_up();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing::info!(?config, "starting");
    let client = kube::Client::try_default().await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    let identity = leader::default_identity();
    let data_plane = open_data_plane(&config, &identity, &shutdown).await?;
    let limits = config.server_limits();
    let ingress = serve(
        "ingress",
        config.ingress_addr,
        data_plane.ingress_router(),
        limits,
        data_plane.metrics(),
        shutdown.clone(),
    )
    .await?;
    let ops = serve(
        "ops",
        config.ops_addr,
        data_plane.ops_router(),
        limits,
        data_plane.metrics(),
        shutdown.clone(),
    )
    .await?;
    let delivery = data_plane.start_delivery(shutdown.clone().cancelled_owned());

    let election = config
        .leader
        .leader_election
        .then(|| config.leader_config(identity));
    let mut ctx = controller::Context::new(client.clone(), config, Arc::new(data_plane.clone()));
    if let Some(election) = &election {
        // Registrations wait until every replica routes the URL (the route handshake).
        ctx = ctx.with_replicas(controller::replicas::ReplicaConfig::from_leader(election));
    }
    let ctx = Arc::new(ctx);
    // A signature that fails against a route's keys makes the ingress fetch the
    // provider's current secret (bounded; any replica, read-only).
    data_plane.set_key_source(Arc::new(controller::key_fetch::ProviderKeys::new(&ctx)));
    match election {
        None => controller::run(ctx, shutdown).await,
        Some(election) => {
            // Reconcilers only while holding the Lease; route sync otherwise.
            let stop_grace = election.stop_grace();
            let (leading, elector) = leader::spawn(client, election, shutdown.clone());
            leader::run_while_leading(
                leading,
                shutdown.clone(),
                stop_grace,
                |token| controller::run(ctx.clone(), token),
                |token| controller::route_sync::run(ctx.clone(), token),
            )
            .await;
            let _ = elector.await;
        }
    }
    let _ = tokio::join!(ingress, ops, delivery);
    tracing::info!("stopped");
    Ok(())
}

/// The data plane on the configured queue; with JetStream, its health is shared with the
/// other replicas over NATS.
async fn open_data_plane(
    config: &OperatorConfig,
    identity: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<DataPlane>> {
    let parser = Arc::new(webhook_operator::providers::ProviderParser);
    match config.queue {
        QueueBackend::Embedded => {
            std::fs::create_dir_all(&config.data_dir)?;
            Ok(DataPlane::open(config.data_plane(), parser).await?)
        }
        QueueBackend::Jetstream => {
            let queue = JetStreamQueue::connect(config.jetstream()?).await?;
            let nats = queue.nats_client();
            let data_plane = DataPlane::with_queue(config.data_plane(), parser, Arc::new(queue))?;
            health::cluster::share(
                nats,
                format!("{}.health", config.nats.nats_prefix),
                identity.to_owned(),
                data_plane.health_registry(),
                shutdown.clone(),
            )
            .await?;
            Ok(data_plane)
        }
    }
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
    limits: webhook_operator::dataplane::server::ServerLimits,
    metrics: Arc<webhook_operator::metrics::Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(server = what, addr = %listener.local_addr()?, "listening");
    Ok(tokio::spawn(webhook_operator::dataplane::server::serve(
        listener, router, limits, metrics, shutdown,
    )))
}
