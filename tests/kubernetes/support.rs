//! One real control plane (etcd + kube-apiserver, `hack/controlplane.sh`) per test binary,
//! a fresh namespace per test, and waits on conditions instead of sleeps.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::process::output_ok;

pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub bin_dir: PathBuf,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the control plane on first use (it stops when this test process exits) and
/// installs the CRDs generated from the Rust types. Concurrent callers wait for the first.
pub async fn control_plane() -> &'static ControlPlane {
    tokio::task::spawn_blocking(|| CONTROL_PLANE.get_or_init(start_control_plane))
        .await
        .expect("control plane start task")
}

fn start_control_plane() -> ControlPlane {
    start_control_plane_named("wo-cp")
}

/// A control plane of the caller's own in `<tmp>/<name>-<pid>` (for a test that stops its
/// API server); it stops when this test process exits.
pub fn start_control_plane_named(name: &str) -> ControlPlane {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let script = repo_root().join("hack/controlplane.sh");
    let run = |args: &[&str]| {
        let out = output_ok(
            std::process::Command::new("bash").arg(&script).args(args),
            "run hack/controlplane.sh",
            &format!("hack/controlplane.sh {args:?} failed:\n"),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let bin_dir = PathBuf::from(run(&["build"]));
    run(&[
        "start",
        dir.to_str().unwrap(),
        &std::process::id().to_string(),
    ]);
    let cp = ControlPlane {
        kubeconfig: dir.join("kubeconfig"),
        dir,
        bin_dir,
    };
    install_crds(&cp);
    cp
}

impl ControlPlane {
    /// Runs the matching kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .output()
            .expect("run kubectl")
    }
}

fn install_crds(cp: &ControlPlane) {
    let file = cp.dir.join("crds.yaml");
    std::fs::write(&file, webhook_operator::api::crds_yaml()).expect("write CRDs");
    let ok = |out: std::process::Output, what: &str| {
        assert!(
            out.status.success(),
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    ok(
        cp.kubectl(&["apply", "-f", file.to_str().unwrap()]),
        "apply CRDs",
    );
    ok(
        cp.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "webhookendpoints.hooks.webhook-operator.dev",
            "webhooksubscriptions.hooks.webhook-operator.dev",
        ]),
        "wait for CRDs Established",
    );
    // Established is not enough: wait until discovery serves the group/version too.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = cp.kubectl(&["get", "--raw", "/apis/hooks.webhook-operator.dev/v1alpha1"]);
        let body = String::from_utf8_lossy(&out.stdout);
        if out.status.success()
            && body.contains("webhookendpoints")
            && body.contains("webhooksubscriptions")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "discovery never served the group"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // kubectl cached discovery from before the CRDs existed; drop it.
    let _ = std::fs::remove_dir_all(cp.dir.join("kubectl-cache"));
}

pub async fn client_for(cp: &ControlPlane) -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(&cp.kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

/// A client and a namespace of its own for one test.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub cp: &'static ControlPlane,
}

pub async fn test_env(prefix: &str) -> TestEnv {
    let cp = control_plane().await;
    let client = client_for(cp).await;
    let namespace = format!("{prefix}-{:08x}", rand::random::<u32>());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(namespace.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");
    TestEnv {
        client,
        namespace,
        cp,
    }
}

#[allow(dead_code)] // not every test module waits
/// Polls `check` until it yields a value, panicking with `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
