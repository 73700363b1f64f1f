//! `webhook-operator export` / `import`: an endpoint's waiting events and dead letters as
//! JSON Lines ([`crate::queue::ExportedEvent`]), read from and written to the queue the
//! operator's own flags (or `WEBHOOK_OPERATOR_*` variables) name. A backup and restore,
//! or the move from the embedded queue to JetStream: export from the embedded file with
//! the operator stopped (the file is locked while it runs), import into JetStream.
//! Idempotent: ids are kept and dedupe applies, so a repeated import stores nothing twice.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::{OperatorConfig, QueueBackend};
use crate::queue::{EndpointKey, EnqueueOutcome, JetStreamQueue, Queue, RedbQueue};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The WebhookEndpoint, as NAMESPACE/NAME.
    pub endpoint: String,
    /// Where to write the JSON Lines (default: standard output).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The queue: the same flags as `run` (`--queue`, `--data-dir`, `--nats-*`).
    #[command(flatten)]
    pub config: Box<OperatorConfig>,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The JSON Lines to read (default: standard input).
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// The queue: the same flags as `run` (`--queue`, `--data-dir`, `--nats-*`).
    #[command(flatten)]
    pub config: Box<OperatorConfig>,
}

/// Opens the queue `config` names: the embedded file (which must not be in use) or
/// JetStream.
async fn open(config: &OperatorConfig) -> anyhow::Result<Arc<dyn Queue>> {
    Ok(match config.queue {
        QueueBackend::Embedded => {
            let dp = config.data_plane();
            let path = dp.queue_path.clone();
            let options = crate::queue::RedbQueueOptions {
                dedupe_window: dp.dedupe_window,
                max_dedupe_keys: dp.max_dedupe_keys,
                ..Default::default()
            };
            let queue = tokio::task::spawn_blocking(move || RedbQueue::open(&path, options))
                .await?
                .with_context(|| {
                    format!(
                        "opening the queue at {} (stop the operator first: it locks the file)",
                        dp.queue_path.display()
                    )
                })?;
            Arc::new(queue)
        }
        QueueBackend::Jetstream => Arc::new(JetStreamQueue::connect(config.jetstream()?).await?),
    })
}

pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let (namespace, name) = args
        .endpoint
        .split_once('/')
        .context("the endpoint is NAMESPACE/NAME")?;
    let queue = open(&args.config).await?;
    let events = queue.export(&EndpointKey::new(namespace, name)).await?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::fs::File::create(path)?),
        None => Box::new(std::io::stdout().lock()),
    };
    crate::queue::write_lines(&events, &mut out)?;
    out.flush()?;
    let dead = events.iter().filter(|e| e.is_dead()).count();
    eprintln!(
        "exported {} waiting events and {dead} dead letters of {}",
        events.len() - dead,
        args.endpoint
    );
    Ok(())
}

pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let input: Box<dyn BufRead> = match &args.input {
        Some(path) => Box::new(std::io::BufReader::new(std::fs::File::open(path)?)),
        None => Box::new(std::io::stdin().lock()),
    };
    let events = crate::queue::read_lines(input).map_err(anyhow::Error::msg)?;
    let queue = open(&args.config).await?;
    let outcomes = queue.import(events).await?;
    let duplicates = outcomes
        .iter()
        .filter(|o| **o == EnqueueOutcome::Duplicate)
        .count();
    eprintln!(
        "imported {} events, {duplicates} already there",
        outcomes.len() - duplicates
    );
    Ok(())
}
