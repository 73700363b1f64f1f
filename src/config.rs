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
    /// Log as JSON lines.
    #[arg(long, env = "WEBHOOK_OPERATOR_LOG_JSON")]
    pub log_json: bool,
}
