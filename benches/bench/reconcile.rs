//! Section 4: reconcile at scale. A real etcd + kube-apiserver (`hack/controlplane.sh`),
//! the provider simulators in-process, and the operator as a child process
//! (`webhook-operator run`). N WebhookSubscriptions (Atlas, Atomic, Smallest in turn) are
//! created at once through a bounded pool; we time until every one is Ready and count
//! provider calls (the simulators' counters), API-server requests (the apiserver's
//! `apiserver_request_total`, less the benchmark's own) and the operator's peak RSS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};
use webhook_operator::sandbox::{self, SandboxConfig};

const NAMESPACE: &str = "bench";
const CREATE_POOL: usize = 32;

pub struct ReconcileResults {
    pub subscriptions: usize,
    pub ready_seconds: f64,
    pub all_ready: bool,
    /// Management API calls per provider (atlas, atomic, smallest).
    pub provider_calls: BTreeMap<&'static str, u64>,
    pub atomic_token_calls: u64,
    /// Operator requests in the measured window (hooks group, secrets, events).
    pub operator_requests: u64,
    /// The same, split by verb and resource.
    pub operator_requests_by: BTreeMap<String, u64>,
    /// Every apiserver request in the window less the benchmark's own, for reference.
    pub all_requests_less_ours: u64,
    pub rss_peak_mib: f64,
    pub apiserver_version: String,
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn controlplane(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(repo_root().join("hack/controlplane.sh"))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "hack/controlplane.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Stops the control plane and the operator on every exit path.
struct Cleanup {
    dir: PathBuf,
    operator: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut c) = self.operator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let pids: Vec<String> = ["apiserver.pid", "etcd.pid"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .map(|p| p.trim().to_string())
            .collect();
        let _ = controlplane(&["stop", self.dir.to_str().unwrap_or_default()]);
        // Still ours (its command line names our directory) after a grace: kill it.
        let ours = |pid: &str| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*self.dir.to_string_lossy()))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| ours(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in pids.iter().filter(|p| ours(p)) {
            let _ = Command::new("kill").args(["-KILL", p]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `apiserver_request_total` summed by (verb, group, resource).
async fn request_totals(
    client: &Client,
) -> anyhow::Result<BTreeMap<(String, String, String), u64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split("\",")
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry((label("verb"), label("group"), label("resource")))
            .or_default() += v as u64;
    }
    Ok(out)
}

fn is_operator_resource(group: &str, resource: &str) -> bool {
    group == "hooks.webhook-operator.dev"
        || (group.is_empty() && matches!(resource, "secrets" | "events"))
        || group == "events.k8s.io"
}

fn ready(sub: &WebhookSubscription) -> bool {
    sub.status.as_ref().is_some_and(|st| {
        st.observed_generation == sub.metadata.generation
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn spec(i: usize) -> Value {
    match i % 3 {
        0 => json!({"provider": "atlas", "credentialsRef": {"name": "atlas-creds"},
            "events": ["call_completed"], "atlas": {"campaignId": format!("camp-{i}")},
            "endpointRef": {"name": "orders"}}),
        1 => json!({"provider": "atomic", "credentialsRef": {"name": "atomic-creds"},
            "events": ["card-published", "card-completed"],
            // The Atomic simulator allows 100 webhooks per environment: ten per environment here.
            "atomic": {"organizationId": "org1", "environmentId": format!("env{}", i / 30)},
            "endpointRef": {"name": "orders"}}),
        _ => json!({"provider": "smallest", "credentialsRef": {"name": "smallest-creds"},
            "events": ["post-conversation"],
            "smallest": {"agentIds": [format!("65f0c0ffee{i:014x}")]},
            "endpointRef": {"name": "orders"}}),
    }
}

async fn sandbox_calls(base: &str, provider: &str) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("{base}/_control/{provider}/calls"))
        .await?
        .error_for_status()?
        .json()
        .await?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub async fn run(
    n: usize,
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<ReconcileResults> {
    let dir = std::env::temp_dir().join(format!("wo-bench-cp-{}", std::process::id()));
    eprintln!("bench: starting the control plane in {}", dir.display());
    let bin_dir = PathBuf::from(controlplane(&["build"])?);
    let mut cleanup = Cleanup {
        dir: dir.clone(),
        operator: None,
    };
    controlplane(&[
        "start",
        dir.to_str().unwrap_or_default(),
        &std::process::id().to_string(),
    ])?;
    let kubeconfig = dir.join("kubeconfig");
    let crds = dir.join("crds.yaml");
    std::fs::write(&crds, webhook_operator::api::crds_yaml())?;
    let kubectl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    kubectl(&["apply", "-f", crds.to_str().unwrap_or_default()])?;
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "webhookendpoints.hooks.webhook-operator.dev",
        "webhooksubscriptions.hooks.webhook-operator.dev",
    ])?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    let client = Client::try_from(config)?;
    let apiserver_version = client.apiserver_version().await?.git_version;
    // Discovery must serve the group before typed clients work.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Api::<WebhookSubscription>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "CRDs never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    for (name, data) in [
        ("atlas-creds", json!({"apiKey": "atlas-test-key"})),
        (
            "atomic-creds",
            json!({"clientId": "atomic-client", "clientSecret": "atomic-secret"}),
        ),
        ("smallest-creds", json!({"apiKey": "smallest-test-key"})),
    ] {
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data
        }))?;
        secrets.create(&PostParams::default(), &s).await?;
    }
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(client.clone(), NAMESPACE);
    endpoints
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
                "metadata": {"name": "orders"},
                "spec": {"destination": {"service": {"name": "consumer", "port": 8080}}}
            }))?,
        )
        .await?;

    let sandbox = sandbox::serve(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        SandboxConfig::default(),
    )
    .await?;
    let consumer = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let consumer_addr = consumer.local_addr()?;
    tokio::spawn(async move {
        axum::serve(consumer, axum::Router::new().fallback(|| async { "ok" })).await
    });

    let ingress_port = free_port()?;
    let data_dir = tempfile::tempdir()?;
    let operator = Command::new(env!("CARGO_BIN_EXE_webhook-operator"))
        .arg("run")
        .arg("--allow-loopback")
        .args(["--ingress-addr", &format!("127.0.0.1:{ingress_port}")])
        .args(["--ops-addr", "127.0.0.1:0"])
        .args([
            "--public-base-url",
            &format!("http://127.0.0.1:{ingress_port}"),
        ])
        .args(["--provider-sandbox-url", &sandbox.base_url()])
        .args([
            "--resolve",
            &format!("consumer.{NAMESPACE}.svc:8080={consumer_addr}"),
        ])
        .args(["--namespace", NAMESPACE])
        .arg("--data-dir")
        .arg(data_dir.path())
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = operator.id();
    cleanup.operator = Some(operator);

    eprintln!("bench: waiting for the endpoint to be Ready");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ep = endpoints.get("orders").await?;
        let ok = ep.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ok {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "endpoint never Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let start-up settle, then zero the counters.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = sandbox.base_url();
    let http = reqwest::Client::new();
    for p in ["atlas", "atomic", "smallest"] {
        http.delete(format!("{base}/_control/{p}/calls"))
            .send()
            .await?
            .error_for_status()?;
    }
    let before = request_totals(&client).await?;

    eprintln!("bench: creating {n} WebhookSubscriptions ({CREATE_POOL} at a time)");
    let own = Arc::new(AtomicU64::new(0));
    let subs: Api<WebhookSubscription> = Api::namespaced(client.clone(), NAMESPACE);
    let start = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let (subs, own) = (subs.clone(), own.clone());
            async move {
                let obj: WebhookSubscription = serde_json::from_value(json!({
                    "apiVersion": "hooks.webhook-operator.dev/v1alpha1",
                    "kind": "WebhookSubscription",
                    "metadata": {"name": format!("sub-{i:05}")},
                    "spec": spec(i),
                }))?;
                own.fetch_add(1, Ordering::Relaxed);
                subs.create(&PostParams::default(), &obj).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CREATE_POOL)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let created = start.elapsed();
    eprintln!(
        "bench: created in {:.2}s; waiting for Ready",
        created.as_secs_f64()
    );
    let deadline = start + timeout;
    let all_ready = loop {
        own.fetch_add(1, Ordering::Relaxed);
        let list = subs.list(&ListParams::default()).await?;
        let count = list.items.iter().filter(|s| ready(s)).count();
        if count >= n {
            break true;
        }
        if Instant::now() > deadline {
            let mut why = BTreeMap::<String, usize>::new();
            for s in list.items.iter().filter(|s| !ready(s)) {
                let reason = s
                    .status
                    .as_ref()
                    .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready"))
                    .map_or("no Ready condition".to_string(), |c| {
                        format!("{} {}: {}", c.status, c.reason, c.message)
                    });
                *why.entry(reason).or_default() += 1;
            }
            eprintln!("bench: only {count}/{n} Ready after {timeout:?}: {why:#?}");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ready_seconds = start.elapsed().as_secs_f64();
    eprintln!("bench: all Ready in {ready_seconds:.2}s; settling {settle:?}");
    tokio::time::sleep(settle).await;

    let after = request_totals(&client).await?;
    let own = own.load(Ordering::Relaxed);
    let mut by = BTreeMap::new();
    let mut all = 0u64;
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0);
        all += d;
        let (verb, group, resource) = k;
        if d > 0 && is_operator_resource(group, resource) {
            *by.entry(format!("{verb} {resource}")).or_insert(0) += d;
        }
    }
    // Ours among those: every create and every list of webhooksubscriptions; the
    // `/metrics` read that took `before` is counted in `after` (a non-resource GET).
    let create_key = "POST webhooksubscriptions".to_string();
    let list_key = "LIST webhooksubscriptions".to_string();
    let own_creates = n as u64;
    let own_lists = own - own_creates;
    for (k, mine) in [(&create_key, own_creates), (&list_key, own_lists)] {
        if let Some(v) = by.get_mut(k) {
            *v = v.saturating_sub(mine);
        }
    }
    by.retain(|_, v| *v > 0);
    let operator_requests = by.values().sum();
    let all_requests_less_ours = all.saturating_sub(own + 1);

    let mut provider_calls = BTreeMap::new();
    let mut atomic_token_calls = 0;
    for p in ["atlas", "atomic", "smallest"] {
        let c = sandbox_calls(&base, p).await?;
        provider_calls.insert(p, c["management"].as_u64().unwrap_or(0));
        if p == "atomic" {
            atomic_token_calls = c["token"].as_u64().unwrap_or(0);
        }
    }
    let rss_peak_mib = vm_hwm_mib(pid).unwrap_or(f64::NAN);
    drop(cleanup);
    Ok(ReconcileResults {
        subscriptions: n,
        ready_seconds,
        all_ready,
        provider_calls,
        atomic_token_calls,
        operator_requests,
        operator_requests_by: by,
        all_requests_less_ours,
        rss_peak_mib,
        apiserver_version,
    })
}
