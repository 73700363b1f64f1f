//! Section 4: reconcile at scale. A real etcd + kube-apiserver (`hack/controlplane.sh`),
//! the provider simulators in-process, and the operator as a child process
//! (`webhook-operator run`). N WebhookSubscriptions (Atlas, Atomic, Smallest, Atllas in
//! turn) are created at once through a bounded pool; a watch times until every one is
//! Ready, and we count provider calls (the simulators' counters), API-server requests (the
//! apiserver's `apiserver_request_total`, less the benchmark's own) and the operator's peak
//! RSS. Then the operator is restarted on the same cluster with nothing changed: the resync
//! of all N must make no provider write and no status write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proc_stats::{CpuReading, vm_hwm_mib_of};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};
use webhook_sandbox::{self as sandbox, SandboxConfig};

const NAMESPACE: &str = "bench";
const CREATE_POOL: usize = 32;

pub struct ReconcileResults {
    pub subscriptions: usize,
    /// From the first create to the last create's answer: the API server holds them all.
    pub created_seconds: f64,
    /// From the first create until every subscription is Ready.
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
    /// CPU seconds per process from the first create until all were Ready.
    pub cpu: String,
    pub apiserver_version: String,
    pub resync: Option<Resync>,
}

/// The operator restarted with every subscription already in place and unchanged.
pub struct Resync {
    /// From the restart until every subscription has had a pass (the operator's
    /// `subscription_synced` series, one per subscription, reset by the restart).
    pub seconds: f64,
    pub complete: bool,
    pub provider_reads: u64,
    pub provider_writes: u64,
    /// PATCH/APPLY of `webhooksubscriptions/status` and `webhookendpoints/status`.
    pub status_writes: u64,
    /// Every operator request on its resources, by verb and resource.
    pub operator_requests_by: BTreeMap<String, u64>,
    pub rss_peak_mib: f64,
    /// CPU seconds per process from the restart until every subscription had a pass.
    pub cpu: String,
}

impl ReconcileResults {
    /// This section of the generated block in BENCHMARKS.md.
    pub fn report(&self, s: &mut String) {
        let r = self;
        let mark = crate::mark;
        let provider_total: u64 = r.provider_calls.values().sum();
        let per_sub = provider_total as f64 / r.subscriptions as f64;
        let api_per_sub = r.operator_requests as f64 / r.subscriptions as f64;
        let after_created = r.ready_seconds - r.created_seconds;
        let _ = writeln!(
            s,
            "### Reconcile at scale ({} WebhookSubscriptions, Atlas/Atomic/Smallest/Atllas in turn, created {CREATE_POOL} at a time)\n",
            r.subscriptions
        );
        let _ = writeln!(s, "| measure | value |\n|---|---|");
        let _ = writeln!(
            s,
            "| all created (the API server holds them) | {:.2} s after the first create |",
            r.created_seconds
        );
        let _ = writeln!(
            s,
            "| all Ready | {:.2} s after the first create, {after_created:.2} s after the last{} |",
            r.ready_seconds,
            if r.all_ready { "" } else { " (timed out)" }
        );
        let calls: Vec<String> = r
            .provider_calls
            .iter()
            .map(|(p, c)| format!("{p} {c}"))
            .collect();
        let _ = writeln!(
            s,
            "| provider management calls | {provider_total} ({}), {per_sub:.2} per subscription; Atomic token calls {} |",
            calls.join(", "),
            r.atomic_token_calls
        );
        let _ = writeln!(
            s,
            "| operator API-server requests | {} ({api_per_sub:.2} per subscription): {} |",
            r.operator_requests,
            joined(&r.operator_requests_by)
        );
        let _ = writeln!(
            s,
            "| every API-server request in the window less the benchmark's own | {} |",
            r.all_requests_less_ours
        );
        let _ = writeln!(
            s,
            "| operator peak RSS (VmHWM) | {:.1} MiB |",
            r.rss_peak_mib
        );
        let _ = writeln!(
            s,
            "| CPU from the first create until all Ready (what bounds the time) | {} |",
            r.cpu
        );
        if let Some(x) = &r.resync {
            let _ = writeln!(
                s,
                "| restart (SIGTERM) and resync of all, nothing changed | every subscription had a pass {:.2} s after the restart{}; provider reads {}, writes {}; status writes {}; requests: {}; peak RSS {:.1} MiB; CPU {} |",
                x.seconds,
                if x.complete { "" } else { " (timed out)" },
                x.provider_reads,
                x.provider_writes,
                x.status_writes,
                joined(&x.operator_requests_by),
                x.rss_peak_mib,
                x.cpu
            );
        }
        let _ = writeln!(s, "\n| target | measured | |\n|---|---|---|");
        let _ = writeln!(
            s,
            "| all {} Ready ≤ 15 s after the API server holds them | {after_created:.2} s | {} |",
            r.subscriptions,
            mark(r.all_ready && after_created <= 15.0)
        );
        let _ = writeln!(
            s,
            "| ≤ 2.5 provider calls per subscription at creation | {per_sub:.2} | {} |",
            mark(per_sub <= 2.5)
        );
        let _ = writeln!(
            s,
            "| ≤ 6 API-server requests per subscription at creation | {api_per_sub:.2} | {} |",
            mark(api_per_sub <= 6.0)
        );
        let _ = writeln!(
            s,
            "| operator RSS ≤ 200 MiB | {:.1} MiB | {} |",
            r.rss_peak_mib,
            mark(r.rss_peak_mib <= 200.0)
        );
        let resync_ok = r
            .resync
            .as_ref()
            .is_some_and(|x| x.complete && x.provider_writes == 0 && x.status_writes == 0);
        let _ = writeln!(
            s,
            "| a resync of all with nothing changed writes nothing (provider or status) | {} | {} |",
            r.resync.as_ref().map_or("not run".to_string(), |x| format!(
                "{} provider writes, {} status writes",
                x.provider_writes, x.status_writes
            )),
            mark(resync_ok)
        );
        s.push('\n');
    }
}

fn joined(by: &BTreeMap<String, u64>) -> String {
    by.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
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

/// One `apiserver_request_total` series, less the labels we do not split by.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RequestKey {
    verb: String,
    group: String,
    resource: String,
    subresource: String,
}

/// `apiserver_request_total` summed by (verb, group, resource, subresource).
async fn request_totals(client: &Client) -> anyhow::Result<BTreeMap<RequestKey, u64>> {
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
        let key = RequestKey {
            verb: label("verb"),
            group: label("group"),
            resource: label("resource"),
            subresource: label("subresource"),
        };
        *out.entry(key).or_default() += v as u64;
    }
    Ok(out)
}

/// The operator's requests between two readings, by "VERB resource[/subresource]".
fn operator_requests(
    before: &BTreeMap<RequestKey, u64>,
    after: &BTreeMap<RequestKey, u64>,
) -> (BTreeMap<String, u64>, u64) {
    let mut by = BTreeMap::new();
    let mut all = 0u64;
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0);
        all += d;
        if d > 0 && is_operator_resource(&k.group, &k.resource) {
            let name = if k.subresource.is_empty() {
                format!("{} {}", k.verb, k.resource)
            } else {
                format!("{} {}/{}", k.verb, k.resource, k.subresource)
            };
            *by.entry(name).or_insert(0) += d;
        }
    }
    (by, all)
}

fn is_status_write(name: &str) -> bool {
    name.ends_with("/status") && (name.starts_with("PATCH ") || name.starts_with("APPLY "))
        || name.starts_with("UPDATE ") && name.ends_with("/status")
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

/// The providers in turn: Atlas, Atomic, Smallest (managed) and Atllas (receive-only).
fn spec(i: usize) -> Value {
    match i % 4 {
        0 => json!({"provider": "atlas", "credentialsRef": {"name": "atlas-creds"},
            "events": ["call_completed"], "atlas": {"campaignId": format!("camp-{i}")},
            "endpointRef": {"name": "orders"}}),
        1 => json!({"provider": "atomic", "credentialsRef": {"name": "atomic-creds"},
            "events": ["card-published", "card-completed"],
            // The Atomic simulator allows 100 webhooks per environment: ten per environment here.
            "atomic": {"organizationId": "org1", "environmentId": format!("env{}", i / 40)},
            "endpointRef": {"name": "orders"}}),
        2 => json!({"provider": "smallest", "credentialsRef": {"name": "smallest-creds"},
            "events": ["post-conversation"],
            "smallest": {"agentIds": [format!("65f0c0ffee{i:014x}")]},
            "endpointRef": {"name": "orders"}}),
        _ => json!({"provider": "atllas", "events": ["call.finished"],
            "atllas": {"headerName": "X-Webhook-Token"},
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

/// The kube-apiserver's and etcd's pids, from the files `hack/controlplane.sh` writes.
fn control_plane_pids(dir: &Path) -> anyhow::Result<(u32, u32)> {
    let read = |name: &str| -> anyhow::Result<u32> {
        Ok(std::fs::read_to_string(dir.join(name))?.trim().parse()?)
    };
    Ok((read("apiserver.pid")?, read("etcd.pid")?))
}

/// The processes whose CPU time the report splits: the control plane, the operator, and
/// the benchmark itself (the creates, the provider simulators, the Ready watch).
fn cpu_parts((apiserver, etcd): (u32, u32), operator: u32) -> [(&'static str, u32); 4] {
    [
        ("kube-apiserver", apiserver),
        ("etcd", etcd),
        ("operator", operator),
        ("benchmark (creates, simulators, watch)", std::process::id()),
    ]
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

    let data_dir = tempfile::tempdir()?;
    let cmd = OperatorCommand {
        kubeconfig: kubeconfig.clone(),
        sandbox_url: sandbox.base_url(),
        consumer: consumer_addr,
        data_dir: data_dir.path().to_path_buf(),
        ingress_port: free_port()?,
        ops_port: free_port()?,
    };
    let operator = cmd.spawn()?;
    let pid = operator.id();
    cleanup.operator = Some(operator);
    let control_plane = control_plane_pids(&dir)?;

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
    reset_sandbox_calls(&http, &base).await?;
    let subs: Api<WebhookSubscription> = Api::namespaced(client.clone(), NAMESPACE);
    // One watch (started before the first reading, so its LIST is not counted; its WATCH
    // is still open at the last reading, so it is not counted either).
    let ready_count = watch_ready(subs.clone()).await?;
    let before = request_totals(&client).await?;

    eprintln!("bench: creating {n} WebhookSubscriptions ({CREATE_POOL} at a time)");
    let cpu = CpuReading::now(&cpu_parts(control_plane, pid));
    let start = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| {
            let subs = subs.clone();
            async move {
                let obj: WebhookSubscription = serde_json::from_value(json!({
                    "apiVersion": "hooks.webhook-operator.dev/v1alpha1",
                    "kind": "WebhookSubscription",
                    "metadata": {"name": format!("sub-{i:05}")},
                    "spec": spec(i),
                }))?;
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
    let created_seconds = start.elapsed().as_secs_f64();
    eprintln!("bench: created in {created_seconds:.2}s; waiting for Ready");
    let all_ready = wait_for(ready_count, n, Instant::now() + timeout).await;
    let ready_seconds = start.elapsed().as_secs_f64();
    let cpu = cpu.used_since();
    if all_ready {
        eprintln!("bench: all Ready in {ready_seconds:.2}s; settling {settle:?}");
    } else {
        eprintln!(
            "bench: not all Ready {timeout:?} after the last create: {:#?}",
            not_ready_reasons(&subs).await?
        );
    }
    tokio::time::sleep(settle).await;

    let after = request_totals(&client).await?;
    let (mut by, all) = operator_requests(&before, &after);
    // Ours among those: the creates; the `/metrics` read that took `before` is counted in
    // `after` (a non-resource GET).
    if let Some(v) = by.get_mut("POST webhooksubscriptions") {
        *v = v.saturating_sub(n as u64);
    }
    by.retain(|_, v| *v > 0);
    let operator_requests = by.values().sum();
    let all_requests_less_ours = all.saturating_sub(n as u64 + 1);
    let calls = provider_calls(&base).await?;
    let rss_peak_mib = vm_hwm_mib_of(pid).unwrap_or(f64::NAN);

    let resync = if all_ready {
        Some(
            restart_and_resync(
                &mut cleanup,
                &cmd,
                control_plane,
                &client,
                &http,
                &base,
                n,
                settle,
                timeout,
            )
            .await?,
        )
    } else {
        None
    };
    drop(cleanup);
    Ok(ReconcileResults {
        subscriptions: n,
        created_seconds,
        ready_seconds,
        all_ready,
        provider_calls: calls.management,
        atomic_token_calls: calls.atomic_tokens,
        operator_requests,
        operator_requests_by: by,
        all_requests_less_ours,
        rss_peak_mib,
        cpu,
        apiserver_version,
        resync,
    })
}

/// The operator's command line: the same on every start, so a restart finds its queue.
struct OperatorCommand {
    kubeconfig: PathBuf,
    sandbox_url: String,
    consumer: std::net::SocketAddr,
    data_dir: PathBuf,
    ingress_port: u16,
    ops_port: u16,
}

impl OperatorCommand {
    fn spawn(&self) -> anyhow::Result<Child> {
        let ingress = format!("127.0.0.1:{}", self.ingress_port);
        Ok(Command::new(env!("CARGO_BIN_EXE_webhook-operator"))
            .arg("run")
            .arg("--allow-loopback")
            .args(["--ingress-addr", &ingress])
            .args(["--ops-addr", &format!("127.0.0.1:{}", self.ops_port)])
            .args(["--public-base-url", &format!("http://{ingress}")])
            .args(["--provider-sandbox-url", &self.sandbox_url])
            .args([
                "--resolve",
                &format!("consumer.{NAMESPACE}.svc:8080={}", self.consumer),
            ])
            .args(["--namespace", NAMESPACE])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// How many subscriptions the running operator has had a pass for: one
    /// `subscription_synced` series each, set by the pass, gone with the process.
    async fn subscriptions_passed(&self, http: &reqwest::Client) -> usize {
        let url = format!("http://127.0.0.1:{}/metrics", self.ops_port);
        let Ok(r) = http.get(url).send().await else {
            return 0;
        };
        r.text().await.map_or(0, |t| {
            t.lines()
                .filter(|l| l.starts_with("webhook_operator_subscription_synced{"))
                .count()
        })
    }
}

/// SIGTERM, then up to 30 s for a clean exit, then SIGKILL.
fn stop(child: &mut Child) -> anyhow::Result<()> {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Restarts the operator with every subscription in place and nothing changed, and counts
/// what the resync of all `n` costs: it must write nothing, to the providers or to status.
#[allow(clippy::too_many_arguments)]
async fn restart_and_resync(
    cleanup: &mut Cleanup,
    cmd: &OperatorCommand,
    control_plane: (u32, u32),
    client: &Client,
    http: &reqwest::Client,
    base: &str,
    n: usize,
    settle: Duration,
    timeout: Duration,
) -> anyhow::Result<Resync> {
    eprintln!("bench: restarting the operator (SIGTERM) for a resync of {n} unchanged");
    if let Some(mut old) = cleanup.operator.take() {
        stop(&mut old)?;
    }
    reset_sandbox_calls(http, base).await?;
    let before = request_totals(client).await?;
    let start = Instant::now();
    let operator = cmd.spawn()?;
    let pid = operator.id();
    let cpu = CpuReading::now(&cpu_parts(control_plane, pid));
    cleanup.operator = Some(operator);
    let complete = loop {
        if cmd.subscriptions_passed(http).await >= n {
            break true;
        }
        if start.elapsed() > timeout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu.used_since();
    eprintln!(
        "bench: every subscription had a pass {seconds:.2}s after the restart; settling {settle:?}"
    );
    tokio::time::sleep(settle).await;
    let after = request_totals(client).await?;
    let (mut by, _) = operator_requests(&before, &after);
    by.retain(|_, v| *v > 0);
    let status_writes = by
        .iter()
        .filter(|(k, _)| is_status_write(k))
        .map(|(_, v)| v)
        .sum();
    let calls = provider_calls(base).await?;
    Ok(Resync {
        seconds,
        complete,
        provider_reads: calls.management.values().sum::<u64>() - calls.writes,
        provider_writes: calls.writes,
        status_writes,
        operator_requests_by: by,
        rss_peak_mib: vm_hwm_mib_of(pid).unwrap_or(f64::NAN),
        cpu,
    })
}

struct ProviderCalls {
    management: BTreeMap<&'static str, u64>,
    writes: u64,
    atomic_tokens: u64,
}

async fn reset_sandbox_calls(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for p in ["atlas", "atomic", "smallest"] {
        http.delete(format!("{base}/_control/{p}/calls"))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

async fn provider_calls(base: &str) -> anyhow::Result<ProviderCalls> {
    let mut out = ProviderCalls {
        management: BTreeMap::new(),
        writes: 0,
        atomic_tokens: 0,
    };
    for p in ["atlas", "atomic", "smallest"] {
        let c = sandbox_calls(base, p).await?;
        out.management
            .insert(p, c["management"].as_u64().unwrap_or(0));
        out.writes += c["writes"].as_u64().unwrap_or(0);
        if p == "atomic" {
            out.atomic_tokens = c["token"].as_u64().unwrap_or(0);
        }
    }
    Ok(out)
}

/// Watches the namespace's subscriptions; the receiver holds how many are Ready.
async fn watch_ready(
    subs: Api<WebhookSubscription>,
) -> anyhow::Result<tokio::sync::watch::Receiver<usize>> {
    use kube::runtime::{WatchStreamExt, watcher};
    let (tx, rx) = tokio::sync::watch::channel(0);
    let mut stream = Box::pin(watcher(subs, watcher::Config::default()).applied_objects());
    tokio::spawn(async move {
        let mut ready_names = std::collections::HashSet::new();
        while let Some(ev) = stream.next().await {
            let Ok(sub) = ev else { continue };
            let name = sub.metadata.name.clone().unwrap_or_default();
            if ready(&sub) {
                ready_names.insert(name);
            } else {
                ready_names.remove(&name);
            }
            if tx.send(ready_names.len()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Until `count` reaches `n` (true) or the deadline passes (false).
async fn wait_for(
    mut count: tokio::sync::watch::Receiver<usize>,
    n: usize,
    deadline: Instant,
) -> bool {
    let until = tokio::time::Instant::from_std(deadline);
    tokio::time::timeout_at(until, count.wait_for(|c| *c >= n))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Why the subscriptions that are not Ready are not: reason → how many.
async fn not_ready_reasons(
    subs: &Api<WebhookSubscription>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut why = BTreeMap::<String, usize>::new();
    for s in subs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|s| !ready(s))
    {
        let reason = s
            .status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready"))
            .map_or("no Ready condition".to_string(), |c| {
                format!("{} {}: {}", c.status, c.reason, c.message)
            });
        *why.entry(reason).or_default() += 1;
    }
    Ok(why)
}
