//! Simulators of the providers' management APIs and deliveries (`webhook-operator
//! sandbox`), for tests, the demo and evaluation without real accounts.
//!
//! One listener; a path prefix per provider (`/atlas/v1/api`, `/atomic/{orgId}`,
//! `/smallest/atoms/v1`) serving the documented paths, headers, bodies, status codes and
//! error shapes, with state in memory; `/_control/` lets tests inspect state, count calls,
//! fire events, drift state behind the operator's back and inject faults. Where a
//! provider's documents are silent the simulator makes one assumption, listed in
//! PROVIDERS.md. Owns nothing the operator runs in production.

// Handlers return the provider's error response straight from helpers; its size does not
// matter in a simulator.
#![allow(clippy::result_large_err)]

mod atlas;
mod atllas;
mod atomic;
mod control;
mod faults;
mod smallest;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

pub use faults::Faults;

/// Accepted credentials and behaviour switches.
#[derive(Clone)]
pub struct SandboxConfig {
    pub atlas_api_key: String,
    pub smallest_api_key: String,
    pub atomic_client_id: String,
    pub atomic_client_secret: String,
    /// Lifetime of Atomic access tokens (the real one is an hour).
    pub atomic_token_ttl: Duration,
    /// Atlas documents hook URLs as HTTPS; off by default so loopback receivers work.
    pub require_https: bool,
    /// How long a simulated delivery waits for the receiver.
    pub delivery_timeout: Duration,
    /// Atomic list/create answers carry the assumed fields `cardTemplateId`,
    /// `actionFlowConfigId`, `method` and `enabled` (the documented answer shows none).
    pub atomic_echo_assumed_fields: bool,
    /// Atlas subscription ids are the hook URL (one reading of the subscribe document).
    pub atlas_ids_are_hook_urls: bool,
    /// Atlas events carry `triggerName` and `messageId` (the document names only `callId`).
    pub atlas_events_name_trigger: bool,
    /// Smallest lists carry `decryptedSecretKey` (the official SDK documents it there).
    pub smallest_secret_in_list: bool,
    /// Header and encoding of Atomic delivery signatures (the default is the guess the
    /// operator makes; another lets tests play an account that signs differently).
    pub atomic_signature: (String, wire::SignatureEncoding),
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            atlas_api_key: "atlas-test-key".into(),
            smallest_api_key: "smallest-test-key".into(),
            atomic_client_id: "atomic-client".into(),
            atomic_client_secret: "atomic-secret".into(),
            atomic_token_ttl: Duration::from_secs(3600),
            require_https: false,
            delivery_timeout: Duration::from_secs(10),
            atomic_echo_assumed_fields: true,
            atlas_ids_are_hook_urls: false,
            atlas_events_name_trigger: true,
            smallest_secret_in_list: true,
            atomic_signature: (
                wire::atomic::SIGNATURE_HEADER.into(),
                wire::SignatureEncoding::Hex,
            ),
        }
    }
}

impl std::fmt::Debug for SandboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxConfig")
            .field("atomic_client_id", &self.atomic_client_id)
            .field("atomic_token_ttl", &self.atomic_token_ttl)
            .field("require_https", &self.require_https)
            .finish_non_exhaustive()
    }
}

/// Flags of `webhook-operator sandbox`.
#[derive(Clone, Debug, clap::Args)]
pub struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    #[arg(
        long,
        env = "SANDBOX_ATLAS_API_KEY",
        default_value = "atlas-test-key",
        hide_env_values = true
    )]
    pub atlas_api_key: String,
    #[arg(
        long,
        env = "SANDBOX_SMALLEST_API_KEY",
        default_value = "smallest-test-key",
        hide_env_values = true
    )]
    pub smallest_api_key: String,
    #[arg(
        long,
        env = "SANDBOX_ATOMIC_CLIENT_ID",
        default_value = "atomic-client"
    )]
    pub atomic_client_id: String,
    #[arg(
        long,
        env = "SANDBOX_ATOMIC_CLIENT_SECRET",
        default_value = "atomic-secret",
        hide_env_values = true
    )]
    pub atomic_client_secret: String,
    #[arg(long, default_value_t = 3600)]
    pub atomic_token_ttl_secs: u64,
    #[arg(long)]
    pub require_https: bool,
}

impl From<&SandboxArgs> for SandboxConfig {
    fn from(a: &SandboxArgs) -> Self {
        SandboxConfig {
            atlas_api_key: a.atlas_api_key.clone(),
            smallest_api_key: a.smallest_api_key.clone(),
            atomic_client_id: a.atomic_client_id.clone(),
            atomic_client_secret: a.atomic_client_secret.clone(),
            atomic_token_ttl: Duration::from_secs(a.atomic_token_ttl_secs),
            require_https: a.require_https,
            ..SandboxConfig::default()
        }
    }
}

/// Everything the simulators share.
pub(crate) struct Shared {
    pub(crate) config: SandboxConfig,
    pub(crate) atlas: Mutex<atlas::Store>,
    pub(crate) atomic: Mutex<atomic::Store>,
    pub(crate) smallest: Mutex<smallest::Store>,
    pub(crate) control: Arc<faults::Counters>,
    /// Client for simulated deliveries.
    pub(crate) http: reqwest::Client,
}

pub(crate) type AppState = Arc<Shared>;

/// A running simulator; dropping it stops the server.
pub struct SandboxHandle {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SandboxHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server, cutting open connections (a hung request must not block it).
    pub fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .merge(atlas::router(state.clone()))
        .merge(atomic::router(state.clone()))
        .merge(smallest::router(state.clone()))
        .merge(control::router())
        .with_state(state)
}

/// Serves the simulators on `listener` in a background task.
pub async fn serve(listener: TcpListener, config: SandboxConfig) -> anyhow::Result<SandboxHandle> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(config.delivery_timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let state = Arc::new(Shared {
        config,
        atlas: Mutex::default(),
        atomic: Mutex::default(),
        smallest: Mutex::default(),
        control: Arc::default(),
        http,
    });
    let addr = listener.local_addr()?;
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "sandbox server stopped");
        }
    });
    Ok(SandboxHandle { addr, task })
}

/// `webhook-operator sandbox`: serve until Ctrl-C.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let config = SandboxConfig::from(&args);
    tracing::info!(?config, "sandbox configuration");
    let handle = serve(listener, config).await?;
    let base = handle.base_url();
    println!("provider sandbox listening on {base}");
    println!("  atlas:    {base}/atlas/v1/api   (header api-key)");
    println!("  atomic:   {base}/atomic/{{orgId}}  (token: {base}/atomic/{{orgId}}/auth/token)");
    println!("  smallest: {base}/smallest/atoms/v1  (Authorization: Bearer)");
    println!("  control:  {base}/_control/");
    tokio::signal::ctrl_c().await?;
    handle.shutdown();
    Ok(())
}

/// The string field `field` of a fire request; an error naming it when it is absent.
/// How a simulator authorizes a management call from its headers.
pub(crate) type Authorize = fn(&Shared, &HeaderMap) -> Result<(), Response>;

/// A simulator's management `routes` behind `authorize` and, around it, the faults layer
/// (which counts every call).
pub(crate) fn guarded(
    routes: Router<AppState>,
    state: AppState,
    provider: wire::Provider,
    error: faults::ErrorShape,
    authorize: Authorize,
) -> Router<AppState> {
    routes
        .route_layer(from_fn_with_state((state.clone(), authorize), auth_layer))
        .route_layer(from_fn_with_state(
            (state.control.clone(), provider, error),
            faults::faults_layer,
        ))
}

/// Every management call of a simulator is authorized first (the faults layer around it
/// counts it); a refusal is the simulator's own answer.
pub(crate) async fn auth_layer(
    State((state, authorize)): State<(AppState, Authorize)>,
    req: Request,
    next: Next,
) -> Response {
    match authorize(&state, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal,
    }
}

pub(crate) fn required<'a>(req: &'a serde_json::Value, field: &str) -> Result<&'a str, String> {
    req.get(field)
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("{field} is required"))
}

/// Random lowercase hex of `n` bytes.
pub(crate) fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    hex::encode(bytes)
}

pub(crate) fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Sends one simulated delivery; the receiver's status, or 0 when it could not be reached.
/// A webhook's own headers and then its signature header, as a delivery sends them.
pub(crate) fn signed_headers(
    own: &std::collections::BTreeMap<String, String>,
    signature: (String, String),
) -> Vec<(String, String)> {
    own.iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([signature])
        .collect()
}

/// Whether header `name` is `prefix` followed by `secret` (compared in constant time).
pub(crate) fn presents(h: &HeaderMap, name: &str, prefix: &[u8], secret: &str) -> bool {
    h.get(name)
        .and_then(|v| v.as_bytes().strip_prefix(prefix))
        .is_some_and(|v| bool::from(v.ct_eq(secret.as_bytes())))
}

pub(crate) async fn deliver(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> u16 {
    let mut req = http
        .request(method, url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match req.body(body).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// A JSON body that failed to parse is answered in each provider's own 400 shape.
pub(crate) fn parse_body(body: &[u8]) -> Option<serde_json::Value> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(|v| v.is_object())
}

pub(crate) fn valid_hook_url(s: &str, require_https: bool) -> bool {
    match url::Url::parse(s) {
        Ok(u) => {
            u.host().is_some()
                && (u.scheme() == "https" || (!require_https && u.scheme() == "http"))
        }
        Err(_) => false,
    }
}
