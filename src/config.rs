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
    /// Allow delivery to loopback and unspecified addresses (127.0.0.0/8, ::1, 0.0.0.0):
    /// the operator's own pod. For the local demo and tests only (off: refused).
    #[arg(long, env = "WEBHOOK_OPERATOR_ALLOW_LOOPBACK")]
    pub allow_loopback: bool,
    /// Let deliveries go through the proxy named by `HTTP_PROXY` / `HTTPS_PROXY` (off: the
    /// environment's proxy settings are ignored, since a proxy bypasses the address policy).
    #[arg(long, env = "WEBHOOK_OPERATOR_DELIVERY_PROXY_FROM_ENV")]
    pub delivery_proxy_from_env: bool,
    /// Allow an endpoint to deliver to a Service in another namespace (off: refused with
    /// `Ready=False`, reason `CrossNamespaceRefDenied`).
    #[arg(long, env = "WEBHOOK_OPERATOR_ALLOW_CROSS_NAMESPACE_REFS")]
    pub allow_cross_namespace_refs: bool,
    /// Read a Secret named in `headers[].secretKeyRef`, `signing.secretRef` or
    /// `credentialsRef` only when it carries the label
    /// `hooks.webhook-operator.dev/referable=true` (off: any Secret of the namespace).
    #[arg(long, env = "WEBHOOK_OPERATOR_REQUIRE_SECRET_LABEL")]
    pub require_secret_label: bool,
    /// Resolve a destination `host:port` to another address, e.g.
    /// `consumer.apps.svc:8080=127.0.0.1:18080` (for running outside a cluster). Repeatable.
    /// The address passes the address policy: loopback needs `--allow-loopback`.
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
    /// Export spans of each event (receive, store, deliver, attempts) to this OTLP/HTTP
    /// endpoint, e.g. `http://otel-collector.observability:4318` (spans go to its
    /// `/v1/traces`). Reads the standard `OTEL_EXPORTER_OTLP_ENDPOINT`. Unset: no spans.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    pub otlp_endpoint: Option<url::Url>,
    /// Log as JSON lines.
    #[arg(long, env = "WEBHOOK_OPERATOR_LOG_JSON")]
    pub log_json: bool,
    /// Passes each controller (endpoints, subscriptions) runs at once. A start or resync
    /// of thousands of objects queues them instead of opening thousands of provider and
    /// API-server requests together. A pass makes several requests one after the other,
    /// so fewer than a hundred or so fall behind objects created as fast as the API
    /// server takes them (BENCHMARKS.md).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_CONCURRENT_RECONCILES",
        default_value_t = 128,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub max_concurrent_reconciles: u16,
    /// Where events wait for delivery: `embedded` (a file on --data-dir; one replica) or
    /// `jetstream` (NATS JetStream at --nats-url; several replicas share it).
    #[arg(long, env = "WEBHOOK_OPERATOR_QUEUE", value_enum, default_value_t = QueueBackend::Embedded)]
    pub queue: QueueBackend,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub leader: LeaderArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Bounds under floods: what may wait, what the disk keeps free, what the ingress serves
/// at once. At a bound the ingress answers 503 with `Retry-After`; nothing stored is dropped.
#[derive(Args, Clone, Debug)]
pub struct LimitArgs {
    /// Events that may wait for delivery across all endpoints (0: unbounded).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_QUEUED_EVENTS",
        default_value_t = 1_000_000
    )]
    pub max_queued_events: u64,
    /// Events that may wait for one endpoint, unless its `spec.maxQueuedEvents` says
    /// otherwise (0: unbounded).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_ENDPOINT_QUEUED_EVENTS",
        default_value_t = 100_000
    )]
    pub max_endpoint_queued_events: u64,
    /// Stored bytes of the events that may wait across all endpoints (embedded queue;
    /// 0: unbounded).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_QUEUED_BYTES",
        default_value_t = 512 * 1024 * 1024
    )]
    pub max_queued_bytes: u64,
    /// Stored bytes of the events that may wait for one endpoint, unless its
    /// `spec.maxQueuedBytes` says otherwise (embedded queue; 0: unbounded).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_ENDPOINT_QUEUED_BYTES",
        default_value_t = 128 * 1024 * 1024
    )]
    pub max_endpoint_queued_bytes: u64,
    /// Free bytes the embedded queue's filesystem keeps; below, new events get 503 (0: off).
    #[arg(long, env = "WEBHOOK_OPERATOR_MIN_FREE_DISK_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub min_free_disk_bytes: u64,
    /// Ingress requests handled at once; more get 503 at once.
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_CONCURRENT_REQUESTS",
        default_value_t = 1024
    )]
    pub max_concurrent_requests: usize,
    /// Open connections per listener; more wait to be accepted.
    #[arg(long, env = "WEBHOOK_OPERATOR_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A request's headers must arrive within this, or the connection is closed.
    #[arg(long, env = "WEBHOOK_OPERATOR_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// Most dedupe keys the embedded queue keeps (about 100 bytes of disk and up to 40 of
    /// memory each); past it the oldest are forgotten before the 24 h window ends (metric
    /// `webhook_operator_dedupe_evicted_keys`).
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_MAX_DEDUPE_KEYS",
        default_value_t = 2_000_000
    )]
    pub max_dedupe_keys: u64,
    /// A request's body must arrive within this after its headers, or it gets 408.
    #[arg(long, env = "WEBHOOK_OPERATOR_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_read_timeout: std::time::Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueBackend {
    Embedded,
    Jetstream,
}

/// NATS JetStream settings (`--queue jetstream`). Credentials come from files (a mounted
/// Secret), never from flags, and are never printed.
#[derive(Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated. Credentials in the URL are accepted but
    /// redacted when the configuration is printed; prefer the files below.
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: NatsUrl,
    /// A NATS `.creds` file (user JWT + nkey seed).
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_CREDENTIALS_FILE")]
    pub nats_credentials_file: Option<PathBuf>,
    /// A file holding a NATS token.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// NATS user; the password is read from --nats-password-file.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// Prefix of the subjects and (upper-cased) streams the operator uses.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_PREFIX", default_value = "webhook")]
    pub nats_prefix: String,
    /// Lease timeout of a delivery attempt: the events a replica that died was delivering
    /// are redelivered (to any replica) after this. A live replica renews its leases every
    /// third of it, so a delivery timeout may be longer.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_ACK_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub nats_ack_wait: std::time::Duration,
    /// Copies of each stream in a NATS cluster (1, 3 or 5); applied to existing streams at
    /// start-up.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_replicas: u64,
    /// Stream storage: `file` (kept across server restarts) or `memory` (lost with the
    /// server). Fixed once a stream exists.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_STORAGE", value_enum, default_value_t = NatsStorage::File)]
    pub nats_storage: NatsStorage,
    /// Most bytes of waiting events the events stream holds; past it the ingress answers
    /// 503 (the server refuses new events, never drops stored ones). -1: unlimited.
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_MAX_BYTES", default_value_t = -1, allow_negative_numbers = true)]
    pub nats_max_bytes: i64,
    /// The server removes dead letters older than this (Go duration; 0: kept until pruned
    /// by `deadLetter.retention`).
    #[arg(long, env = "WEBHOOK_OPERATOR_NATS_DEAD_LETTER_MAX_AGE", default_value = "0s", value_parser = parse_duration)]
    pub nats_dead_letter_max_age: std::time::Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatsStorage {
    File,
    Memory,
}

/// A NATS URL whose `Debug` hides any user info.
#[derive(Clone)]
pub struct NatsUrl(pub String);

impl std::str::FromStr for NatsUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err("empty NATS URL".into());
        }
        Ok(NatsUrl(s.to_string()))
    }
}

impl std::fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .0
            .split(',')
            .map(|u| match (u.find("://"), u.rfind('@')) {
                (Some(s), Some(at)) if at > s => {
                    format!("{}<redacted>@{}", &u[..s + 3], &u[at + 1..])
                }
                (None, Some(at)) => format!("<redacted>@{}", &u[at + 1..]),
                _ => u.to_string(),
            })
            .collect();
        write!(f, "{:?}", shown.join(","))
    }
}

/// Leader election: with several replicas, only the holder of a `coordination.k8s.io/v1`
/// Lease runs the reconcilers; every replica serves the ingress and delivers.
#[derive(Args, Clone, Debug)]
pub struct LeaderArgs {
    #[arg(long, env = "WEBHOOK_OPERATOR_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the Lease (default: --namespace, else `POD_NAMESPACE`, else `default`).
    #[arg(long, env = "WEBHOOK_OPERATOR_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_LEASE_NAME",
        default_value = "webhook-operator"
    )]
    pub lease_name: String,
    /// A replica that sees no renewal for this long takes the Lease over.
    #[arg(long, env = "WEBHOOK_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse_go_duration(s).map_err(|e| e.to_string())
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
    /// Path of the Atlas list call under the API base (not in Atlas' documents: an
    /// assumption). If Atlas answers it with an error, subscriptions report
    /// `CannotObserve` instead of being re-created.
    #[arg(
        long,
        env = "WEBHOOK_OPERATOR_ATLAS_LIST_PATH",
        default_value = crate::providers::atlas::DEFAULT_LIST_PATH
    )]
    pub atlas_list_path: String,
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
        e.atlas_list_path = self.atlas_list_path.clone();
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

fn parse_otlp_endpoint(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    crate::spans::otlp::traces_url(&url).map_err(|e| e.to_string())?;
    Ok(url)
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
    /// Every `--resolve` address passes the address policy, as a resolved name would: the
    /// flag cannot map a destination to loopback (the operator's own ports) or to a
    /// metadata address unless that class is allowed too.
    pub fn check_resolve_overrides(&self) -> anyhow::Result<()> {
        use crate::delivery::address_policy::AddressClass;
        let policy = self.address_policy();
        for (host, addr) in &self.resolve_overrides {
            if let Err(class) = policy.check(addr.ip()) {
                let flag = match class {
                    AddressClass::Loopback | AddressClass::Unspecified => "--allow-loopback",
                    AddressClass::LinkLocal | AddressClass::Metadata => "--allow-link-local",
                };
                anyhow::bail!(
                    "--resolve {host}={addr}: {addr} is a {}, refused by the address policy; add {flag} to allow it",
                    class.describe()
                );
            }
        }
        Ok(())
    }

    pub fn address_policy(&self) -> crate::delivery::AddressPolicy {
        crate::delivery::AddressPolicy {
            allow_loopback: self.allow_loopback,
            allow_link_local: self.allow_link_local,
        }
    }

    pub fn data_plane(&self) -> crate::dataplane::DataPlaneConfig {
        crate::dataplane::DataPlaneConfig {
            queue_path: self.data_dir.join("queue.redb"),
            max_body_bytes: self.max_body_bytes,
            address_policy: self.address_policy(),
            proxy_from_env: self.delivery_proxy_from_env,
            resolve_overrides: self.resolve_overrides.clone(),
            health: crate::health::HealthConfig {
                window: self.health_window,
                ..Default::default()
            },
            max_queued_events: self.limits.max_queued_events,
            max_endpoint_queued_events: self.limits.max_endpoint_queued_events,
            max_queued_bytes: self.limits.max_queued_bytes,
            max_endpoint_queued_bytes: self.limits.max_endpoint_queued_bytes,
            min_free_disk_bytes: self.limits.min_free_disk_bytes,
            max_concurrent_requests: self.limits.max_concurrent_requests,
            body_read_timeout: self.limits.body_read_timeout,
            max_dedupe_keys: self.limits.max_dedupe_keys,
            otlp_endpoint: self.otlp_endpoint.clone(),
            ..Default::default()
        }
    }

    /// Bounds of the ingress and ops listeners.
    pub fn server_limits(&self) -> crate::dataplane::server::ServerLimits {
        crate::dataplane::server::ServerLimits {
            max_connections: self.limits.max_connections,
            header_read_timeout: self.limits.header_read_timeout,
            ..Default::default()
        }
    }
}

impl OperatorConfig {
    /// The JetStream queue settings; reads the credential files.
    pub fn jetstream(&self) -> anyhow::Result<crate::queue::JetStreamOptions> {
        use crate::queue::NatsAuth;
        let read = |p: &PathBuf| -> anyhow::Result<String> {
            Ok(std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?
                .trim()
                .to_string())
        };
        let n = &self.nats;
        let auth = if let Some(p) = &n.nats_credentials_file {
            NatsAuth::CredentialsFile(p.clone())
        } else if let Some(p) = &n.nats_token_file {
            NatsAuth::Token(read(p)?)
        } else if let Some(user) = &n.nats_user {
            let password = match &n.nats_password_file {
                Some(p) => read(p)?,
                None => anyhow::bail!("--nats-user needs --nats-password-file"),
            };
            NatsAuth::UserPassword(user.clone(), password)
        } else {
            NatsAuth::None
        };
        Ok(crate::queue::JetStreamOptions {
            url: n.nats_url.0.clone(),
            auth,
            prefix: n.nats_prefix.clone(),
            ack_wait: n.nats_ack_wait,
            dedupe_window: self.data_plane().dedupe_window,
            replicas: n.nats_replicas as usize,
            storage: match n.nats_storage {
                NatsStorage::File => async_nats::jetstream::stream::StorageType::File,
                NatsStorage::Memory => async_nats::jetstream::stream::StorageType::Memory,
            },
            max_bytes: n.nats_max_bytes,
            dead_letter_max_age: n.nats_dead_letter_max_age,
            ..Default::default()
        })
    }

    /// Leader election settings for this replica.
    pub fn leader_config(&self, identity: String) -> crate::leader::LeaderConfig {
        let namespace = self
            .leader
            .leader_election_namespace
            .clone()
            .or_else(|| self.namespace.clone())
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        crate::leader::LeaderConfig::new(
            namespace,
            self.leader.lease_name.clone(),
            identity,
            self.leader.lease_duration,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::NatsUrl;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: super::OperatorConfig,
    }

    #[test]
    fn otlp_endpoint_is_off_by_default_and_checked_when_set() {
        use clap::Parser;
        let parse = |args: &[&str]| Cli::try_parse_from([&["op"], args].concat());
        // The variable is read too; the test must not see one from its environment.
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
            let off = parse(&[]).unwrap();
            assert_eq!(off.config.data_plane().otlp_endpoint, None);
        }
        let on = parse(&[
            "--otlp-endpoint",
            "http://otel-collector.observability:4318",
        ])
        .unwrap();
        assert_eq!(
            on.config.data_plane().otlp_endpoint.unwrap().as_str(),
            "http://otel-collector.observability:4318/"
        );
        for bad in ["otel-collector:4318", "grpc://c:4317", "http://u:p@c:4318"] {
            assert!(parse(&["--otlp-endpoint", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolve_overrides_pass_the_address_policy() {
        use clap::Parser;
        let check = |args: &[&str]| {
            Cli::try_parse_from([&["op"], args].concat())
                .unwrap()
                .config
                .check_resolve_overrides()
                .map_err(|e| e.to_string())
        };
        let to_loopback = ["--resolve", "consumer.apps.svc:8080=127.0.0.1:18080"];
        let refused = check(&to_loopback).unwrap_err();
        assert!(
            refused.contains("consumer.apps.svc:8080") && refused.contains("--allow-loopback"),
            "{refused}"
        );
        check(&[&to_loopback[..], &["--allow-loopback"]].concat()).unwrap();
        let to_metadata = ["--resolve", "c.apps.svc:80=169.254.169.254:80"];
        let refused = check(&to_metadata).unwrap_err();
        assert!(refused.contains("--allow-link-local"), "{refused}");
        check(&[&to_metadata[..], &["--allow-link-local"]].concat()).unwrap();
        check(&["--resolve", "c.apps.svc:80=10.0.0.5:80"]).unwrap();
        check(&[]).unwrap();
    }

    #[test]
    fn nats_url_debug_hides_credentials() {
        let u: NatsUrl = "nats://user:hunter2@nats-1:4222,tls://tok@nats-2:4222,nats://n3:4222"
            .parse()
            .unwrap();
        let shown = format!("{u:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok@"),
            "{shown}"
        );
        assert!(
            shown.contains("nats-1:4222") && shown.contains("nats://n3:4222"),
            "{shown}"
        );
    }
}
