//! The Helm chart against the real API server: `helm lint` and `helm template` pass for
//! the default, distributed and all-optional values and the API server accepts every
//! rendered object; `values.schema.json` refuses bad values; and the operator binary,
//! running with nothing but the chart's RBAC (impersonating its ServiceAccount), goes
//! through create → deliver → delete without a 403.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use webhook_operator::api::{WebhookEndpoint, WebhookSubscription};
use webhook_operator::delivery::SigningSecret;

use crate::fixtures::control;
use crate::ports::free_port;
use crate::support::{TestEnv, test_env, wait_until};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/webhook-operator")
}

/// Runs the project's pinned helm (`hack/helm.sh`).
fn helm(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(repo_root().join("hack/helm.sh"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run hack/helm.sh")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` of the chart as release `release` in `namespace` with `extra` args.
fn render(release: &str, namespace: &str, extra: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rendered objects, as JSON values.
fn objects(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

fn kinds(objs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objs
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

fn find<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

/// Applies `yaml` with kubectl (server-side dry run when `dry_run`), with a discovery
/// cache of its own so CRDs installed during this run are seen.
fn kubectl_apply(env: &TestEnv, yaml: &str, dry_run: bool) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, yaml).unwrap();
    let cache = dir.path().join("cache");
    let mut args = vec![
        "apply",
        "--cache-dir",
        cache.to_str().unwrap(),
        "-f",
        file.to_str().unwrap(),
    ];
    if dry_run {
        args.push("--dry-run=server");
    }
    env.cp.kubectl(&args)
}

/// The container of the rendered workload.
fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

fn assert_restricted(workload: &Value) {
    let pod = &workload["spec"]["template"]["spec"];
    let c = container(workload);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "ops");
    assert!(
        c["resources"]["requests"].is_object(),
        "no resource requests"
    );
    assert_eq!(c["args"], json!(["run"]));
}

/// Minimal CRDs for the optional kinds the chart renders (the Prometheus Operator's
/// ServiceMonitor and PrometheusRule, Gateway API's HTTPRoute), so the API server can
/// judge them.
const OPTIONAL_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              groups:
                type: array
                items:
                  type: object
                  required: [name, rules]
                  properties:
                    name: {type: string}
                    rules:
                      type: array
                      items:
                        type: object
                        required: [expr]
                        properties:
                          alert: {type: string}
                          expr: {x-kubernetes-int-or-string: true}
                          for: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
                          labels: {type: object, additionalProperties: {type: string}}
                          annotations: {type: object, additionalProperties: {type: string}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, listKind: ServiceMonitorList, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [selector, endpoints]
            properties:
              selector: {type: object, x-kubernetes-preserve-unknown-fields: true}
              endpoints:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: string}
                    path: {type: string}
                    interval: {type: string, pattern: '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: httproutes.gateway.networking.k8s.io
  # *.k8s.io groups need this; the real Gateway API CRDs carry the same.
  annotations: {api-approved.kubernetes.io: "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
spec:
  group: gateway.networking.k8s.io
  names: {kind: HTTPRoute, listKind: HTTPRouteList, plural: httproutes, singular: httproute}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              parentRefs:
                type: array
                items:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string}
                    namespace: {type: string}
              hostnames: {type: array, items: {type: string}}
              rules:
                type: array
                items:
                  type: object
                  properties:
                    matches:
                      type: array
                      items:
                        type: object
                        properties:
                          path:
                            type: object
                            properties:
                              type: {type: string, enum: [Exact, PathPrefix, RegularExpression]}
                              value: {type: string}
                    backendRefs:
                      type: array
                      items:
                        type: object
                        required: [name]
                        properties:
                          name: {type: string}
                          port: {type: integer, minimum: 1, maximum: 65535}
"#;

#[tokio::test]
async fn lint_and_template_pass_and_the_api_server_accepts_every_object() {
    let env = test_env("chart-render").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir();
    let distributed = chart.join("ci/distributed-values.yaml");
    let optional = chart.join("ci/optional-values.yaml");

    // The optional kinds need their CRDs for the server to judge them.
    let out = kubectl_apply(&env, OPTIONAL_CRDS, false);
    assert!(out.status.success(), "optional CRDs: {}", text(&out));
    let out = env.cp.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/httproutes.gateway.networking.k8s.io",
    ]);
    assert!(
        out.status.success(),
        "optional CRDs established: {}",
        text(&out)
    );

    let cases: [(&str, Vec<&str>); 3] = [
        ("default", vec![]),
        ("distributed", vec!["-f", distributed.to_str().unwrap()]),
        ("optional", vec!["-f", optional.to_str().unwrap()]),
    ];
    for (name, values) in &cases {
        let mut lint = vec!["lint", "--strict", chart.to_str().unwrap()];
        lint.extend_from_slice(values);
        let out = helm(&lint);
        assert!(out.status.success(), "helm lint ({name}):\n{}", text(&out));

        let mut extra = vec!["--include-crds"];
        extra.extend_from_slice(values);
        let yaml = render(name, ns, &extra);
        let objs = objects(&yaml);
        let out = kubectl_apply(&env, &yaml, true);
        assert!(
            out.status.success(),
            "API server refused the {name} rendering:\n{}",
            text(&out)
        );
        let applied = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            applied
                .lines()
                .filter(|l| l.contains("(server dry run)"))
                .count(),
            objs.len(),
            "every object goes through the dry run ({name}):\n{applied}"
        );

        let kinds = kinds(&objs);
        let present = |k: &str| kinds.iter().any(|x| x == k);
        assert!(present("CustomResourceDefinition"), "{name}: {kinds:?}");
        assert!(
            present("ServiceAccount") && present("PodDisruptionBudget"),
            "{name}: {kinds:?}"
        );
        assert_eq!(
            find(&objs, "Service").len(),
            2,
            "ingress + metrics Services ({name})"
        );
        match *name {
            "distributed" => {
                assert!(!present("StatefulSet"), "{kinds:?}");
                let deploy = find(&objs, "Deployment")[0];
                assert_eq!(deploy["spec"]["replicas"], 3);
                assert_restricted(deploy);
                let c = container(deploy);
                assert_eq!(env_value(c, "WEBHOOK_OPERATOR_QUEUE"), Some("jetstream"));
                assert_eq!(
                    env_value(c, "WEBHOOK_OPERATOR_NATS_URL"),
                    Some("nats://nats.nats.svc:4222")
                );
                assert_eq!(
                    env_value(c, "WEBHOOK_OPERATOR_LEADER_ELECTION"),
                    Some("true")
                );
                let lease_role = find(&objs, "Role")
                    .into_iter()
                    .find(|r| r["rules"][0]["apiGroups"] == json!(["coordination.k8s.io"]))
                    .expect("a Role for the Lease");
                assert_eq!(lease_role["metadata"]["namespace"], ns);
            }
            _ => {
                assert!(!present("Deployment"), "{kinds:?}");
                let sts = find(&objs, "StatefulSet")[0];
                assert_eq!(sts["spec"]["replicas"], 1);
                assert_eq!(
                    sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
                    "data"
                );
                assert_restricted(sts);
                assert!(
                    find(&objs, "Role").is_empty(),
                    "no Lease Role without leader election"
                );
            }
        }
        let optional_kinds = ["Ingress", "HTTPRoute", "ServiceMonitor", "PrometheusRule"];
        for k in optional_kinds {
            assert_eq!(
                present(k),
                *name == "optional",
                "{k} in the {name} rendering"
            );
        }
    }
}

#[tokio::test]
async fn the_atlas_list_path_value_reaches_the_operator_flag() {
    let workload = |extra: &[&str]| {
        let objs = objects(&render("atlas", "default", extra));
        let sts = find(&objs, "StatefulSet")[0].clone();
        let value = env_value(container(&sts), "WEBHOOK_OPERATOR_ATLAS_LIST_PATH");
        value.map(str::to_owned)
    };
    // Unset, the binary's own default applies.
    assert_eq!(workload(&[]), None);
    assert_eq!(
        workload(&[
            "--set",
            "operator.providers.atlasListPath=/v2/triggers/list"
        ]),
        Some("/v2/triggers/list".to_owned())
    );
}

#[tokio::test]
async fn the_reconcile_concurrency_value_reaches_the_operator() {
    let value = |extra: &[&str]| {
        let objs = objects(&render("bounded", "default", extra));
        let sts = find(&objs, "StatefulSet")[0].clone();
        env_value(
            container(&sts),
            "WEBHOOK_OPERATOR_MAX_CONCURRENT_RECONCILES",
        )
        .map(str::to_owned)
    };
    assert_eq!(value(&[]), Some("128".to_owned()));
    assert_eq!(
        value(&["--set", "operator.maxConcurrentReconciles=8"]),
        Some("8".to_owned())
    );
}

#[tokio::test]
async fn values_schema_refuses_wrong_values() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    // The defaults pass, so a failure below is the schema's doing.
    let out = helm(&["template", "ok", chart]);
    assert!(out.status.success(), "{}", text(&out));
    // Span export: off by default, the standard variable when set.
    let otlp = |extra: &[&str]| {
        let objs = objects(&render("traced", "default", extra));
        let sts = find(&objs, "StatefulSet")[0];
        env_value(container(sts), "OTEL_EXPORTER_OTLP_ENDPOINT").map(str::to_owned)
    };
    assert_eq!(otlp(&[]), None);
    assert_eq!(
        otlp(&[
            "--set",
            "operator.tracing.otlpEndpoint=http://otel-collector.observability:4318"
        ])
        .as_deref(),
        Some("http://otel-collector.observability:4318")
    );

    let bad: [(&[&str], &str); 10] = [
        (
            &["--set-json", "queue.jetstream.replicas=\"three\""],
            "replicas",
        ),
        (&["--set", "queue.mode=kafka"], "mode"),
        (&["--set-json", "operator.logJSON=\"yes\""], "logJSON"),
        (&["--set", "queue.mode=jetstream"], "natsURL"),
        (&["--set", "servicee.port=80"], "servicee"),
        (
            &["--set", "operator.tracing.otlpEndpoint=collector:4317"],
            "otlpEndpoint",
        ),
        (
            &["--set", "operator.providers.atlasListPath=no-slash"],
            "atlasListPath",
        ),
        (
            &["--set", "operator.maxConcurrentReconciles=0"],
            "maxConcurrentReconciles",
        ),
        (
            &["--set", "prometheusRule.commitSlowSeconds=0"],
            "commitSlowSeconds",
        ),
        (
            &["--set", "prometheusRule.for.queueCommitsSlow=soon"],
            "queueCommitsSlow",
        ),
    ];
    for (args, field) in bad {
        let mut all = vec!["template", "bad", chart];
        all.extend_from_slice(args);
        let out = helm(&all);
        let msg = text(&out);
        assert!(!out.status.success(), "helm accepted {args:?}");
        assert!(
            msg.contains("values don't meet the specifications of the schema")
                && msg.contains(field),
            "{args:?}: the schema should name {field}:\n{msg}"
        );
    }
}

/// Stops the operator process when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A kubeconfig that acts as ServiceAccount `sa` of the test namespace (admin token +
/// impersonation), returned once the API server enforces it: what the chart grants works,
/// anything else is refused.
async fn act_as_service_account(env: &TestEnv, sa: &str, dir: &Path) -> PathBuf {
    let ns = &env.namespace;
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&env.cp.kubeconfig).unwrap()).unwrap();
    kubeconfig["users"][0]["user"]["as"] = user.into();
    let sa_kubeconfig = dir.join("kubeconfig");
    std::fs::write(&sa_kubeconfig, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();
    let sa_client = {
        let kc = Kubeconfig::read_from(&sa_kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    };
    let sa_endpoints: Api<WebhookEndpoint> = Api::namespaced(sa_client.clone(), ns);
    wait_until(Duration::from_secs(20), "RBAC in force", || {
        let api = sa_endpoints.clone();
        async move { api.list(&ListParams::default()).await.ok() }
    })
    .await;
    let configmaps: Api<ConfigMap> = Api::namespaced(sa_client, ns);
    match configmaps.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("the ServiceAccount should not list ConfigMaps: {other:?}"),
    }
    sa_kubeconfig
}

/// SIGTERM, then the exit status, waited for with a deadline.
async fn sigterm(child: &mut std::process::Child) -> std::process::ExitStatus {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    wait_until(
        Duration::from_secs(30),
        "the operator exits after SIGTERM",
        || {
            let status = child.try_wait().unwrap();
            async move { status }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_under_the_chart_rbac_creates_delivers_and_deletes_without_403() {
    let env = test_env("chart-rbac").await;
    let ns = env.namespace.clone();
    let release = ns.as_str();

    // The chart's ServiceAccount and RBAC, as the chart renders them, for real.
    let yaml = render(
        release,
        &ns,
        &[
            "--set",
            "operator.publicBaseURL=http://127.0.0.1",
            "-s",
            "templates/serviceaccount.yaml",
            "-s",
            "templates/rbac.yaml",
        ],
    );
    let objs = objects(&yaml);
    assert_eq!(
        kinds(&objs),
        ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"]
    );
    let sa = find(&objs, "ServiceAccount")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let out = kubectl_apply(&env, &yaml, false);
    assert!(out.status.success(), "apply RBAC: {}", text(&out));

    let dir = tempfile::tempdir().unwrap();
    let sa_kubeconfig = act_as_service_account(&env, &sa, dir.path()).await;

    // Peers: the provider simulator and a consumer that verifies signatures.
    let sandbox = webhook_sandbox::serve(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        webhook_sandbox::SandboxConfig::default(),
    )
    .await
    .unwrap();
    let consumer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let consumer_addr = consumer.local_addr().unwrap();
    let ingress_port = free_port();

    // Objects, created by an administrator as a user would.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "atlas-creds"},
                "stringData": {"apiKey": "atlas-test-key"}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &ns);
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &ns);
    endpoints
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookEndpoint",
                "metadata": {"name": "orders"},
                "spec": {"destination": {"service": {"name": "consumer", "port": 8080, "path": "/hook"}}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    subs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1", "kind": "WebhookSubscription",
            "metadata": {"name": "calls"},
            "spec": {"provider": "atlas", "credentialsRef": {"name": "atlas-creds"},
                     "events": ["call_completed"], "atlas": {"campaignId": "camp-1"},
                     "endpointRef": {"name": "orders"}}
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    let log_path = dir.path().join("operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut operator = Child(
        Command::new(env!("CARGO_BIN_EXE_webhook-operator"))
            // The consumer is on loopback (through --resolve); the chart itself does not
            // allow loopback.
            .args(["run", "--allow-loopback", "--namespace", &ns])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--ops-addr", "127.0.0.1:0"])
            .arg("--ingress-addr")
            .arg(format!("127.0.0.1:{ingress_port}"))
            .arg("--public-base-url")
            .arg(format!("http://127.0.0.1:{ingress_port}"))
            .arg("--provider-sandbox-url")
            .arg(sandbox.base_url())
            .arg("--resolve")
            .arg(format!("consumer.{ns}.svc:8080={consumer_addr}"))
            .env("KUBECONFIG", &sa_kubeconfig)
            .env("RUST_LOG", "info,webhook_operator=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start operator"),
    );
    // A permission error fails the test at once, with the operator's words.
    let no_403 = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.to_lowercase().contains("forbidden"))
            .collect();
        assert!(
            bad.is_empty(),
            "the operator hit a permission error under the chart's RBAC:\n{}",
            bad.join("\n")
        );
    };
    let log_tail = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Create: the endpoint gets its generated signing Secret (created by the operator).
    let dynamic = |kind: &str, plural: &str| {
        let ar = ApiResource {
            group: "hooks.webhook-operator.dev".into(),
            version: "v1alpha1".into(),
            api_version: "hooks.webhook-operator.dev/v1alpha1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        Api::<DynamicObject>::namespaced_with(env.client.clone(), &ns, &ar)
    };
    let ep_api = dynamic("WebhookEndpoint", "webhookendpoints");
    let sub_api = dynamic("WebhookSubscription", "webhooksubscriptions");
    let ready = |api: Api<DynamicObject>, name: &'static str| async move {
        wait_until(Duration::from_secs(60), &format!("{name} Ready"), || {
            let api = api.clone();
            no_403();
            async move {
                let obj = api.get(name).await.ok()?;
                obj.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    .then_some(())
            }
        })
        .await
    };
    ready(ep_api.clone(), "orders").await;
    ready(sub_api.clone(), "calls").await;
    assert!(
        operator.0.try_wait().unwrap().is_none(),
        "operator exited:\n{}",
        log_tail()
    );

    let signing = secrets
        .get("orders-signing")
        .await
        .expect("generated signing Secret");
    let key = signing.data.unwrap()["secret"].0.clone();
    let router = webhook_operator::demo_consumer::router(SigningSecret::parse(&key).unwrap());
    tokio::spawn(async move { axum::serve(consumer, router).await });

    // Deliver: the simulator posts an event to the hook URL; the consumer verifies it.
    let http = reqwest::Client::new();
    wait_until(
        Duration::from_secs(30),
        "the event reaches the ingress",
        || {
            let http = http.clone();
            let url = format!("{}/_control/atlas/fire", sandbox.base_url());
            async move {
                let r: Value = http
                    .post(url)
                    .json(&json!({"event": "call_completed", "campaignId": "camp-1"}))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let d = r["deliveries"].as_array()?;
                (!d.is_empty() && d.iter().all(|x| x["status"] == 200 || x["status"] == 202))
                    .then_some(())
            }
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "a verified delivery", || {
        let http = http.clone();
        async move {
            let counts: Value = http
                .get(format!("http://{consumer_addr}/_counts"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (counts["/hook"].as_u64()? >= 1).then_some(())
        }
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "status.delivery.delivered >= 1",
        || {
            let api = ep_api.clone();
            async move {
                let ep = api.get("orders").await.ok()?;
                (ep.data["status"]["delivery"]["delivered"].as_u64()? >= 1).then_some(())
            }
        },
    )
    .await;

    // Delete: the operator removes the upstream subscription and both finalizers.
    subs.delete("calls", &DeleteParams::default())
        .await
        .unwrap();
    endpoints
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), "both objects gone", || {
        let (subs, endpoints) = (subs.clone(), endpoints.clone());
        async move {
            let gone = subs.get_opt("calls").await.ok()?.is_none()
                && endpoints.get_opt("orders").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
    let upstream = control(&sandbox, reqwest::Method::GET, "atlas/subscriptions", None).await;
    assert_eq!(
        upstream["subscriptions"].as_array().map(Vec::len),
        Some(0),
        "upstream subscription left behind: {upstream}"
    );

    // The Events the operator recorded were accepted too.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &ns);
    let recorded = events.list(&ListParams::default()).await.unwrap();
    assert!(
        recorded
            .items
            .iter()
            .any(|e| e.reporting_controller.as_deref() == Some("webhook-operator")),
        "no Event from the operator"
    );

    let status = sigterm(&mut operator.0).await;
    assert!(
        status.success(),
        "operator exited with {status}:\n{}",
        log_tail()
    );
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("reconciled"), "operator log is empty?\n{log}");
    no_403();
}

/// The distributed (JetStream) mode under exactly what the chart renders for it: the
/// ServiceAccount, the Role for the kinds, the Lease Role, and the Deployment's own
/// configuration (its `args` and `env`), with only addresses and the test peers swapped
/// for loopback ones. It watches the test namespace (`operator.watchNamespace`): a
/// cluster-wide operator would act on the other tests' objects in this API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_under_the_chart_rbac_in_jetstream_mode_holds_the_lease_and_delivers() {
    let env = test_env("chart-js").await;
    let ns = env.namespace.clone();
    let nats = crate::nats::NatsServer::start();
    let ingress_port = free_port();
    let values = [
        "queue.mode=jetstream".to_string(),
        format!("queue.jetstream.natsURL={}", nats.url()),
        format!("operator.publicBaseURL=http://127.0.0.1:{ingress_port}"),
        format!("operator.watchNamespace={ns}"),
    ];
    let mut args: Vec<&str> = values.iter().flat_map(|v| ["--set", v.as_str()]).collect();
    args.extend([
        "-s",
        "templates/serviceaccount.yaml",
        "-s",
        "templates/rbac.yaml",
        "-s",
        "templates/deployment.yaml",
    ]);
    let yaml = render(&ns, &ns, &args);
    let objs = objects(&yaml);
    assert_eq!(
        kinds(&objs),
        [
            "Deployment",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "ServiceAccount"
        ]
    );
    let lease_role = find(&objs, "Role")
        .into_iter()
        .find(|r| r["rules"].to_string().contains("leases"))
        .expect("a Role for the Lease");
    assert_eq!(lease_role["metadata"]["namespace"], ns.as_str());
    let out = kubectl_apply(&env, &yaml, false);
    assert!(out.status.success(), "apply: {}", text(&out));
    let sa = find(&objs, "ServiceAccount")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let sa_kubeconfig = act_as_service_account(&env, &sa, dir.path()).await;

    let sandbox = crate::fixtures::sandbox().await;
    let consumer = crate::delivery_e2e::Consumer::start().await;
    crate::fixtures::create_secret(&env, "atlas-creds", json!({"apiKey": "atlas-test-key"})).await;
    crate::fixtures::apply_endpoint(
        &env,
        "orders",
        json!({"destination": crate::delivery_e2e::consumer_destination()}),
    )
    .await;
    crate::fixtures::apply_subscription(&env, "calls", crate::fixtures::specs()[0].1.clone()).await;

    // The Deployment's container, run as a process: its args and env as rendered.
    let deployment = find(&objs, "Deployment")[0];
    let c = container(deployment);
    let pod_name = "webhook-operator-0";
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_webhook-operator"));
    for a in c["args"].as_array().unwrap() {
        cmd.arg(a.as_str().unwrap());
    }
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (
            name,
            e["value"].as_str(),
            e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            ("WEBHOOK_OPERATOR_INGRESS_ADDR", _, _) => format!("127.0.0.1:{ingress_port}"),
            ("WEBHOOK_OPERATOR_OPS_ADDR", _, _) => "127.0.0.1:0".into(),
            ("WEBHOOK_OPERATOR_DATA_DIR", _, _) => dir.path().join("data").display().to_string(),
            (_, Some(v), _) => v.to_string(),
            (_, None, Some("metadata.name")) => pod_name.into(),
            (_, None, Some("metadata.namespace")) => ns.clone(),
            other => panic!("unexpected env entry {other:?}"),
        };
        cmd.env(name, value);
    }
    let log_path = dir.path().join("operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut operator = Child(
        cmd.arg("--provider-sandbox-url")
            .arg(sandbox.base_url())
            // The test's consumer is on loopback, which the chart's address policy refuses.
            .arg("--allow-loopback")
            .arg("--resolve")
            .arg(format!(
                "consumer.{ns}.svc:8080=127.0.0.1:{}",
                consumer.port
            ))
            .env("KUBECONFIG", &sa_kubeconfig)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start operator"),
    );
    let no_403 = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let bad: Vec<&str> = log
            .lines()
            .filter(|l| l.to_lowercase().contains("forbidden"))
            .collect();
        assert!(
            bad.is_empty(),
            "the operator hit a permission error under the chart's RBAC:\n{}",
            bad.join("\n")
        );
    };

    // It takes the Lease the chart's Role names, then reconciles as the leader.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), &ns);
    wait_until(
        Duration::from_secs(60),
        "the Lease held by this pod",
        || {
            no_403();
            let leases = leases.clone();
            async move {
                let lease = leases.get_opt("webhook-operator").await.ok()??;
                (lease.spec?.holder_identity.as_deref() == Some(pod_name)).then_some(())
            }
        },
    )
    .await;
    let url = format!(
        "{}/calls",
        crate::delivery_e2e::ingress_url(&env, "orders").await
    );
    *consumer.secret.lock().unwrap() =
        Some(crate::delivery_e2e::signing_secret(&env, "orders").await);
    crate::fixtures::wait_condition(&env, "calls", "Ready", "True", None).await;
    let r = crate::delivery_e2e::send_json(&url, &crate::delivery_e2e::atlas_event("js-1"))
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let received = wait_until(Duration::from_secs(60), "the delivery", || {
        no_403();
        let got = consumer.received();
        async move { (!got.is_empty()).then_some(got) }
    })
    .await;
    assert!(received[0].verified, "signed with the endpoint's secret");
    assert_eq!(received[0].body["callId"], "js-1");

    let status = sigterm(&mut operator.0).await;
    assert!(status.success(), "operator exited with {status}");
    no_403();
}
