//! The operator's configuration: one typed struct, flags with environment overrides.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Settings of `webhook-operator run`. Every flag also reads `WEBHOOK_OPERATOR_<NAME>`.
#[derive(Args, Clone, Debug)]
pub struct OperatorConfig {
    /// Address of the ingress server providers POST to.
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_INGRESS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub ingress_addr: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_OPS_ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub ops_addr: SocketAddr,
    /// Public base URL of the ingress (e.g. https://hooks.example.com). Without it,
    /// `status.ingressURL` holds the path only.
    #[arg(long, env = "WEBHOOK_OPERATOR_PUBLIC_BASE_URL")]
    pub public_base_url: Option<String>,
    /// Directory of the embedded durable queue (a PersistentVolume in the chart).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_DATA_DIR",
        default_value = "/var/lib/webhook-operator"
    )]
    pub data_dir: PathBuf,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "WEBHOOK_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Allow delivery to link-local and cloud metadata addresses (off: refused).
    #[arg(long, env = "WEBHOOK_OPERATOR_ALLOW_LINK_LOCAL")]
    pub allow_link_local: bool,
    /// Resolve a destination `host:port` to another address, e.g.
    /// `consumer.apps.svc:8080=127.0.0.1:18080` (for running outside a cluster). Repeatable.
    #[arg(long = "resolve", env = "WEBHOOK_OPERATOR_RESOLVE", value_delimiter = ',', value_parser = parse_resolve)]
    pub resolve_overrides: Vec<(String, SocketAddr)>,
    /// Larger ingress bodies are refused with 413.
    #[arg(long, env = "WEBHOOK_OPERATOR_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How far back the failure ratio of the `Healthy` condition looks (Go duration).
    #[arg(long, env = "WEBHOOK_OPERATOR_HEALTH_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub health_window: std::time::Duration,
    #[command(flatten)]
    pub providers: ProviderUrls,
    /// Log as JSON lines.
    #[arg(long, env = "WEBHOOK_OPERATOR_LOG_JSON")]
    pub log_json: bool,
}

/// Where the providers' management APIs are. Defaults are the providers' public APIs.
#[derive(Args, Clone, Debug)]
pub struct ProviderUrls {
    /// Point every provider at a simulator (`webhook-operator sandbox`), e.g.
    /// http://127.0.0.1:8090. Individual URLs below override it.
    #[arg(long, env = "WEBHOOK_OPERATOR_PROVIDER_SANDBOX_URL")]
    pub provider_sandbox_url: Option<String>,
    /// Atlas API base URL.
    #[arg(long, env = "WEBHOOK_OPERATOR_ATLAS_API_URL")]
    pub atlas_api_url: Option<String>,
    /// Atomic API base URL template (`{orgId}` is replaced).
    #[arg(long, env = "WEBHOOK_OPERATOR_ATOMIC_API_URL")]
    pub atomic_api_url: Option<String>,
    /// Atomic OAuth2 token URL template (`{orgId}` is replaced).
    #[arg(long, env = "WEBHOOK_OPERATOR_ATOMIC_TOKEN_URL")]
    pub atomic_token_url: Option<String>,
    /// Smallest.ai Atoms API base URL (the older base was https://atoms-api.smallest.ai/api/v1).
    #[arg(long, env = "WEBHOOK_OPERATOR_SMALLEST_API_URL")]
    pub smallest_api_url: Option<String>,
}

impl ProviderUrls {
    pub fn endpoints(&self) -> crate::providers::ProviderEndpoints {
        let mut e = match &self.provider_sandbox_url {
            Some(base) => crate::providers::ProviderClients::sandbox(base),
            None => crate::providers::ProviderEndpoints::default(),
        };
        if let Some(u) = &self.atlas_api_url {
            e.atlas_base = u.clone();
        }
        if let Some(u) = &self.atomic_api_url {
            e.atomic_base = u.clone();
        }
        if let Some(u) = &self.atomic_token_url {
            e.atomic_token_url = u.clone();
        }
        if let Some(u) = &self.smallest_api_url {
            e.smallest_base = u.clone();
        }
        e
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse_go_duration(s).map_err(|e| e.to_string())
}

fn parse_resolve(s: &str) -> Result<(String, SocketAddr), String> {
    let (host, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected host:port=ip:port, got {s:?}"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not ip:port: {e}"))?;
    Ok((host.to_string(), addr))
}

impl OperatorConfig {
    pub fn data_plane(&self) -> crate::dataplane::DataPlaneConfig {
        crate::dataplane::DataPlaneConfig {
            queue_path: self.data_dir.join("queue.redb"),
            max_body_bytes: self.max_body_bytes,
            allow_link_local: self.allow_link_local,
            resolve_overrides: self.resolve_overrides.clone(),
            health: crate::health::HealthConfig {
                window: self.health_window,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}
