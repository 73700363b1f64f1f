//! `helm install` of charts/webhook-operator on a real node, as a user installs it: the
//! chart's defaults plus the image and the public base URL (and the simulators' API URL,
//! since the providers here are the simulators). The pod becomes Ready through its own
//! probes, its queue's claim is bound to a PersistentVolume, it reaches the API with its
//! ServiceAccount only, and events fired at each provider simulator (a Deployment) reach
//! the operator through its ingress Service and the consumer (a Deployment) through its
//! Service, both by cluster DNS name. No `--resolve`, no `--allow-loopback`.

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{Cluster, cluster, http, repo_root, text, wait_for};

const RELEASE: &str = "wo";
const FULLNAME: &str = "wo-webhook-operator";

/// The simulators and the demo consumer, from the operator's image, each a Deployment
/// with a Service on port 8080; the consumer's signing secret in `demo-signing`.
pub fn workloads(image: &str, secret: &str) -> String {
    let security = r#"
        securityContext:
          runAsNonRoot: true
          runAsUser: 65532
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}"#;
    let deployment = |name: &str, args: &str, extra: &str| {
        format!(
            r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - name: {name}
        image: {image}
        imagePullPolicy: Never
        args: {args}
        env: [{{name: NO_COLOR, value: "1"}}]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 1{security}{extra}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080, targetPort: http}}]
"#
        )
    };
    let mut s = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: demo-signing}}\nstringData: {{secret: \"{secret}\"}}\n"
    );
    s.push_str(&deployment(
        "sandbox",
        r#"[sandbox, --listen, "0.0.0.0:8080"]"#,
        "",
    ));
    s.push_str(&deployment(
        "demo-consumer",
        r#"[demo-consumer, --listen, "0.0.0.0:8080", --secret-file, /etc/demo/secret]"#,
        r#"
        volumeMounts: [{name: signing, mountPath: /etc/demo, readOnly: true}]
      volumes: [{name: signing, secret: {secretName: demo-signing}}]"#,
    ));
    s
}

pub fn signing_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// `helm install` (or upgrade with `--install`) with the chart's defaults plus the values a
/// user sets, and `extra`; waits (bounded) for the release's pods to be Ready.
pub fn helm_install(c: &Cluster, ns: &str, release: &str, extra: &[&str]) -> Duration {
    let chart = repo_root().join("charts/webhook-operator");
    let image_repo = format!("image.repository={}", c.image.0);
    let image_tag = format!("image.tag={}", c.image.1);
    let base = format!("operator.publicBaseURL=http://{release}-webhook-operator-ingress.{ns}.svc");
    let sandbox = format!("operator.providers.sandboxURL=http://sandbox.{ns}.svc:8080");
    let mut args = vec![
        "upgrade",
        "--install",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        ns,
        "--set",
        &image_repo,
        "--set",
        &image_tag,
        "--set",
        &base,
        "--set",
        &sandbox,
        "--wait",
        "--timeout",
        "240s",
    ];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let out = c.helm(&args);
    assert!(
        out.status.success(),
        "helm {args:?}:\n{}\n{}",
        text(&out),
        c.diagnostics(ns)
    );
    t.elapsed()
}

/// Applies examples/ and waits until every endpoint and subscription is Ready.
pub fn apply_examples(c: &Cluster, ns: &str) {
    let ex = repo_root().join("examples");
    for f in ["credentials.yaml", "endpoints.yaml", "subscriptions.yaml"] {
        c.kubectl_ok(&["-n", ns, "apply", "-f", ex.join(f).to_str().unwrap()]);
    }
    let out = c.kubectl(&[
        "-n",
        ns,
        "wait",
        "--for=condition=Ready",
        "--timeout=180s",
        "webhookendpoints,webhooksubscriptions",
        "--all",
    ]);
    assert!(
        out.status.success(),
        "examples not Ready:\n{}\n{}",
        text(&out),
        c.diagnostics(ns)
    );
}

/// The event each provider fires in the demo (Atllas: the manual hook URL and its header).
pub fn provider_events(c: &Cluster, ns: &str) -> Vec<(&'static str, Value)> {
    let jp = |what: &str, path: &str| {
        c.kubectl_ok(&["-n", ns, "get", what, "-o", &format!("jsonpath={path}")])
    };
    let url = jp("whs/atllas-calls", "{.status.manualSetup.hookURL}");
    let header = jp("whs/atllas-calls", "{.status.manualSetup.headerName}");
    let secret_name = jp("whs/atllas-calls", "{.status.manualSetup.secretName}");
    let value = base64::engine::general_purpose::STANDARD
        .decode(jp(&format!("secret/{secret_name}"), "{.data.value}"))
        .expect("Atllas header value");
    vec![
        (
            "atlas",
            json!({"event": "call_completed", "campaignId": "demo-campaign"}),
        ),
        (
            "atomic",
            json!({"event": "card-completed", "organizationId": "demo-org", "environmentId": "demo-env"}),
        ),
        (
            "smallest",
            json!({"event": "post-conversation", "agentId": "65f0c0ffee00000000000001"}),
        ),
        (
            "atllas",
            json!({"url": url, "event": "call.finished", "headerName": header,
                   "headerValue": String::from_utf8_lossy(&value)}),
        ),
    ]
}

/// Fires one event at a simulator; the statuses its deliveries to the hook URLs got.
pub fn fire(sandbox: &str, provider: &str, event: &Value) -> Vec<u16> {
    let (status, body) = http(
        "POST",
        &format!("{sandbox}/_control/{provider}/fire"),
        Some(&event.to_string()),
    );
    if status != 200 {
        return vec![];
    }
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["deliveries"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|x| x["status"].as_u64().unwrap_or(0) as u16)
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes the custom resources (the operator removes its webhooks at the providers) and
/// then uninstalls the release: every release's operator watches every namespace, so no
/// test may leave one running for the next.
pub fn uninstall(c: &Cluster, ns: &str, release: &str) {
    c.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "webhooksubscriptions,webhookendpoints",
        "--all",
        "--timeout=120s",
    ]);
    let out = c.helm(&[
        "uninstall",
        release,
        "--namespace",
        ns,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(
        out.status.success(),
        "helm uninstall {release}: {}",
        text(&out)
    );
}

pub fn consumer_counts(consumer: &str) -> Value {
    let (status, body) = http("GET", &format!("{consumer}/_counts"), None);
    assert_eq!(status, 200, "consumer /_counts: {body}");
    serde_json::from_str(&body).expect("counts JSON")
}

#[test]
fn helm_install_runs_the_chart_and_delivers_through_services() {
    let c = cluster();
    let ns = "hooks";
    let diag = || c.diagnostics(ns);
    c.kubectl_ok(&["create", "namespace", ns]);
    c.apply(ns, &workloads(&c.image_ref(), &signing_secret()));
    for d in ["sandbox", "demo-consumer"] {
        let out = c.kubectl(&[
            "-n",
            ns,
            "rollout",
            "status",
            &format!("deploy/{d}"),
            "--timeout=120s",
        ]);
        assert!(out.status.success(), "{d}: {}\n{}", text(&out), diag());
    }

    let took = helm_install(c, ns, RELEASE, &[]);
    eprintln!(
        "node: helm install --wait: Ready in {:.1}s",
        took.as_secs_f64()
    );

    // Ready through its own probes, on its own volume.
    let pod: Value = serde_json::from_str(&c.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pod",
        &format!("{FULLNAME}-0"),
        "-o",
        "json",
    ]))
    .unwrap();
    let ready = pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    assert!(ready, "operator pod not Ready: {}", pod["status"]);
    let container = &pod["spec"]["containers"][0];
    assert!(container["readinessProbe"]["httpGet"]["path"] == "/readyz");
    let pvc = c.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "pvc",
        &format!("data-{FULLNAME}-0"),
        "-o",
        "jsonpath={.status.phase} {.spec.volumeName}",
    ]);
    assert!(pvc.starts_with("Bound local-"), "claim: {pvc}");

    // Only its ServiceAccount: no kubeconfig, no flag that would let it reach loopback or
    // resolve names itself.
    assert_eq!(pod["spec"]["serviceAccountName"], FULLNAME);
    let spec = serde_json::to_string(container).unwrap();
    for banned in [
        "--resolve",
        "--allow-loopback",
        "ALLOW_LOOPBACK",
        "RESOLVE",
        "KUBECONFIG",
    ] {
        assert!(
            !spec.contains(banned),
            "operator container has {banned}: {spec}"
        );
    }
    assert_eq!(container["args"], json!(["run"]));
    let can = |verb: &str, what: &str| {
        c.kubectl(&[
            "auth",
            "can-i",
            verb,
            what,
            "--as",
            &format!("system:serviceaccount:{ns}:{FULLNAME}"),
        ])
        .status
        .success()
    };
    assert!(can("watch", "webhookendpoints.hooks.webhook-operator.dev"));
    assert!(
        !can("create", "pods") && !can("delete", "nodes"),
        "the operator's ServiceAccount may do more than the chart's RBAC says"
    );

    apply_examples(c, ns);
    let sandbox = format!("http://{}:8080", c.cluster_ip(ns, "sandbox"));
    let consumer = format!("http://{}:8080", c.cluster_ip(ns, "demo-consumer"));

    // Every hook URL registered at the simulators is the operator's Service.
    let base = format!("http://{FULLNAME}-ingress.{ns}.svc/");
    for p in ["atlas", "atomic", "smallest"] {
        let (status, body) = http(
            "GET",
            &format!("{sandbox}/_control/{p}/subscriptions"),
            None,
        );
        assert_eq!(status, 200, "{p} subscriptions: {body}");
        assert!(
            body.contains(&base),
            "{p}: no hook URL under {base}: {body}"
        );
    }

    let events = provider_events(c, ns);
    for (provider, event) in &events {
        // The route may lag the Ready condition by a moment: the ingress answers 503
        // until it has its routes. Anything else fails at once.
        let statuses = wait_for(Duration::from_secs(30), provider, diag, || {
            let s = fire(&sandbox, provider, event);
            assert!(
                !s.is_empty() && s.iter().all(|&x| (200..300).contains(&x) || x == 503),
                "{provider}: deliveries to the operator's Service answered {s:?}\n{}",
                diag()
            );
            s.iter().all(|&x| (200..300).contains(&x)).then_some(s)
        });
        eprintln!("node: {provider} event accepted by the ingress Service: {statuses:?}");
    }
    let counts = wait_for(
        Duration::from_secs(60),
        "the consumer to verify one delivery per provider",
        diag,
        || {
            let counts = consumer_counts(&consumer);
            ["/atlas", "/atomic", "/smallest", "/atllas"]
                .iter()
                .all(|p| counts[*p].as_u64().unwrap_or(0) >= 1)
                .then_some(counts)
        },
    );
    eprintln!("node: delivered through demo-consumer.{ns}.svc: {counts}");
    uninstall(c, ns, RELEASE);
}
