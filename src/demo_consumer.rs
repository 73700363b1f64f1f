//! `webhook-operator demo-consumer`: the receiving end of the local demo. It accepts the
//! operator's deliveries on any path, verifies their Standard Webhooks signature with the
//! secret read from a file, and counts verified deliveries per path (`GET /_counts`).
//! A demo and test aid; the operator never runs it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{any, get};

use crate::delivery::{SigningSecret, verify_signature};

/// How far a delivery's `webhook-timestamp` may be from now, as Standard Webhooks suggests.
const TOLERANCE_SECS: i64 = 300;

/// Flags of `webhook-operator demo-consumer`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoConsumerArgs {
    /// Loopback address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// File holding the endpoint's signing secret (`whsec_<base64>` or raw bytes).
    #[arg(long)]
    pub secret_file: PathBuf,
}

#[derive(Clone)]
struct Consumer {
    secret: SigningSecret,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// The consumer's routes: `GET /_counts`, and deliveries on every other path.
pub fn router(secret: SigningSecret) -> Router {
    Router::new()
        .route("/_counts", get(counts))
        .fallback(any(receive))
        .with_state(Consumer {
            secret,
            counts: Arc::default(),
        })
}

/// Serves until SIGINT or SIGTERM.
pub async fn run(args: DemoConsumerArgs) -> anyhow::Result<()> {
    let raw = std::fs::read(&args.secret_file)?;
    let secret = SigningSecret::parse(raw.trim_ascii())?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "demo consumer listening");
    axum::serve(listener, router(secret))
        .with_graceful_shutdown(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}

async fn counts(State(c): State<Consumer>) -> axum::Json<BTreeMap<String, u64>> {
    axum::Json(c.counts.lock().expect("counts").clone())
}

async fn receive(
    State(c): State<Consumer>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sig)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        tracing::warn!(
            path = uri.path(),
            "delivery without Standard Webhooks headers"
        );
        return StatusCode::BAD_REQUEST;
    };
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (jiff::Timestamp::now().as_second() - t).abs() <= TOLERANCE_SECS);
    if !fresh || !verify_signature(std::slice::from_ref(&c.secret), id, ts, &body, sig) {
        tracing::warn!(
            path = uri.path(),
            id,
            "delivery refused: bad signature or timestamp"
        );
        return StatusCode::UNAUTHORIZED;
    }
    let total = {
        let mut counts = c.counts.lock().expect("counts");
        let n = counts.entry(uri.path().to_string()).or_default();
        *n += 1;
        *n
    };
    tracing::info!(
        path = uri.path(),
        id,
        bytes = body.len(),
        total,
        "delivery verified"
    );
    StatusCode::NO_CONTENT
}
