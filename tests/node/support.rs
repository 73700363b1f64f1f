//! One real single-node cluster (`hack/cluster.sh`: the control plane of
//! `hack/controlplane.sh` plus kube-controller-manager, kube-scheduler, kubelet, kube-proxy,
//! CoreDNS, containerd) per test binary, the operator's image loaded into it, and the
//! commands the tests drive it with: kubectl, the pinned helm, curl from the machine to
//! ClusterIPs (the machine routes the cluster's ranges into the node's network namespace).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub bin_dir: PathBuf,
    /// The operator image's repository and tag, loaded into the node's containerd.
    pub image: (String, String),
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Starts the cluster on first use; it stops when this test process exits.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(start)
}

fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo_root().join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start() -> Cluster {
    let dir = std::env::temp_dir().join(format!("wo-node-{}", std::process::id()));
    let pid = std::process::id().to_string();
    let t = Instant::now();
    let exports = script("hack/cluster.sh", &["start", dir.to_str().unwrap(), &pid]);
    eprintln!("node: cluster ready in {:.1}s", t.elapsed().as_secs_f64());
    let field = |key: &str| {
        exports
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {exports}"))
            .to_string()
    };
    let kubeconfig = PathBuf::from(field("KUBECONFIG="));
    let bin_dir = PathBuf::from(field("PATH=").split(':').next().unwrap());
    let image = operator_image(&dir);
    Cluster {
        dir,
        kubeconfig,
        bin_dir,
        image,
    }
}

/// The image `hack/image.sh build` makes from the Dockerfile; with
/// `WEBHOOK_OPERATOR_NODE_IMAGE=interim`, a stand-in packaged from this build's binary
/// (`hack/cluster.sh interim-image`), for working on the node while the Dockerfile changes.
/// Loaded into the node.
fn operator_image(dir: &Path) -> (String, String) {
    let interim = std::env::var("WEBHOOK_OPERATOR_NODE_IMAGE").is_ok_and(|v| v == "interim");
    let (archive, repo, tag) = if !interim {
        let archive = script("hack/image.sh", &["build"]);
        let archive = archive.lines().last().unwrap_or_default().to_string();
        (archive, "localhost/webhook-operator", "dev")
    } else {
        let archive = dir.join("operator-interim.oci.tar");
        script(
            "hack/cluster.sh",
            &[
                "interim-image",
                env!("CARGO_BIN_EXE_webhook-operator"),
                archive.to_str().unwrap(),
                "localhost/webhook-operator-interim:node-test",
            ],
        );
        (
            archive.to_str().unwrap().to_string(),
            "localhost/webhook-operator-interim",
            "node-test",
        )
    };
    script(
        "hack/cluster.sh",
        &["load", dir.to_str().unwrap(), &archive, repo],
    );
    (repo.to_string(), tag.to_string())
}

impl Cluster {
    pub fn image_ref(&self) -> String {
        format!("{}:{}", self.image.0, self.image.1)
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// kubectl apply of a manifest given as text.
    pub fn apply(&self, namespace: &str, manifest: &str) {
        let file = self
            .dir
            .join(format!("apply-{}.yaml", rand::random::<u32>()));
        std::fs::write(&file, manifest).expect("write manifest");
        self.kubectl_ok(&["-n", namespace, "apply", "-f", file.to_str().unwrap()]);
    }

    /// The project's pinned helm against this cluster.
    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(repo_root().join("hack/helm.sh"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(repo_root())
            .output()
            .expect("run hack/helm.sh")
    }

    pub fn cluster_ip(&self, namespace: &str, service: &str) -> String {
        self.kubectl_ok(&[
            "-n",
            namespace,
            "get",
            "svc",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
    }

    /// What went wrong, for a failed assertion: pods, events and the operator's log.
    pub fn diagnostics(&self, namespace: &str) -> String {
        let mut s = String::new();
        for args in [
            vec!["get", "pods,svc,pvc,deploy,sts", "-o", "wide"],
            vec!["get", "events", "--sort-by=.lastTimestamp"],
            vec!["get", "webhooks", "-o", "wide"],
            vec![
                "logs",
                "-l",
                "app.kubernetes.io/name=webhook-operator",
                "--tail=40",
            ],
        ] {
            let mut all = vec!["-n", namespace];
            all.extend(args);
            s.push_str(&text(&self.kubectl(&all)));
        }
        s
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An HTTP request from the machine with curl: (status, body). Status 0: no connection.
pub fn http(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-m", "10", "-X", method, "-w", "\n%{http_code}", url]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "-d", b]);
    }
    let out = cmd.output().expect("run curl");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", s.as_str()));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Polls `check` until it yields a value, panicking with `what` (and `diag()`) after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    diag: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
