//! JetStream mode on the node: nats-server as a pod (the binary set-up builds), two operator
//! replicas with the chart's JetStream values and a PodDisruptionBudget (minAvailable 1).
//! Under a steady stream, the pod holding the Lease is deleted (another takes over; the
//! takeover time is printed) and a `helm upgrade` rolls both replicas one at a time behind
//! the Service: no connection refused during the upgrade, and every event answered 2xx
//! reaches the consumer.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::install::{
    apply_examples, fire, helm_install, provider_events, signing_secret, uninstall, workloads,
};
use crate::lifecycle::{Stream, refused_window, wait_all_delivered};
use crate::support::{cluster, repo_root, text, wait_for};

const NS: &str = "jetstream";

fn nats_manifest(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: nats}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: nats}}}}
  template:
    metadata: {{labels: {{app: nats}}}}
    spec:
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532}}
      containers:
      - name: nats
        image: {image}
        imagePullPolicy: Never
        args: [-js, -sd, /data, -p, "4222"]
        ports: [{{name: client, containerPort: 4222}}]
        readinessProbe: {{tcpSocket: {{port: 4222}}, periodSeconds: 1}}
        volumeMounts: [{{name: data, mountPath: /data}}]
      volumes: [{{name: data, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: nats}}
spec:
  selector: {{app: nats}}
  ports: [{{name: client, port: 4222, targetPort: client}}]
"#
    )
}

fn lease_holder(c: &crate::support::Cluster) -> String {
    let out = c.kubectl(&[
        "-n",
        NS,
        "get",
        "lease",
        "webhook-operator",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn jetstream_two_replicas_leader_deleted_and_upgrade_under_load() {
    let c = cluster();
    let diag = || c.diagnostics(NS);
    let nats_bin = PathBuf::from(std::env::var("HOME").unwrap())
        .join(".cache/webhook-operator/bin/nats-server");
    let nats_bin = std::env::var("XDG_CACHE_HOME")
        .map(|d| PathBuf::from(d).join("webhook-operator/bin/nats-server"))
        .unwrap_or(nats_bin);
    let archive = c.dir.join("nats.oci.tar");
    for args in [
        vec![
            "interim-image",
            nats_bin.to_str().unwrap(),
            archive.to_str().unwrap(),
            "localhost/nats-server:node-test",
        ],
        vec![
            "load",
            c.dir.to_str().unwrap(),
            archive.to_str().unwrap(),
            "localhost/nats-server",
        ],
    ] {
        let out = std::process::Command::new("bash")
            .arg(repo_root().join("hack/cluster.sh"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "cluster.sh {args:?}: {}", text(&out));
    }
    c.kubectl_ok(&["create", "namespace", NS]);
    c.apply(NS, &nats_manifest("localhost/nats-server:node-test"));
    c.apply(NS, &workloads(&c.image_ref(), &signing_secret()));
    for d in ["nats", "sandbox", "demo-consumer"] {
        let out = c.kubectl(&[
            "-n",
            NS,
            "rollout",
            "status",
            &format!("deploy/{d}"),
            "--timeout=120s",
        ]);
        assert!(out.status.success(), "{d}: {}\n{}", text(&out), diag());
    }
    let js = [
        "--set",
        "queue.mode=jetstream",
        "--set",
        "queue.jetstream.natsURL=nats://nats.jetstream.svc:4222",
        "--set",
        "podDisruptionBudget.minAvailable=1",
    ];
    helm_install(c, NS, "js", &js);
    apply_examples(c, NS);
    let sandbox = format!("http://{}:8080", c.cluster_ip(NS, "sandbox"));
    let events: Vec<_> = provider_events(c, NS)
        .into_iter()
        .filter(|(p, _)| *p != "atllas")
        .collect();
    for (p, e) in &events {
        wait_for(Duration::from_secs(30), p, diag, || {
            fire(&sandbox, p, e)
                .iter()
                .all(|s| (200..300).contains(s))
                .then_some(())
        });
    }

    let stream = Stream::start(sandbox, events);
    std::thread::sleep(Duration::from_secs(3));
    stream.step("leader");
    let leader = lease_holder(c);
    assert!(
        leader.starts_with("js-webhook-operator-"),
        "lease holder: {leader:?}"
    );
    let t = Instant::now();
    c.kubectl_ok(&["-n", NS, "delete", "pod", &leader, "--wait=false"]);
    let new = wait_for(
        Duration::from_secs(120),
        "another replica to take the Lease",
        diag,
        || {
            let h = lease_holder(c);
            (!h.is_empty() && h != leader).then_some(h)
        },
    );
    let takeover = t.elapsed();
    eprintln!(
        "node: jetstream: leader {leader} deleted, {new} took over in {:.1}s",
        takeover.as_secs_f64()
    );
    wait_for(
        Duration::from_secs(120),
        "two replicas Ready again",
        diag,
        || {
            let out = c.kubectl(&[
                "-n",
                NS,
                "get",
                "deploy",
                "js-webhook-operator",
                "-o",
                "jsonpath={.status.readyReplicas}",
            ]);
            (String::from_utf8_lossy(&out.stdout) == "2").then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));

    stream.step("upgrade");
    let mut upgrade = js.to_vec();
    upgrade.extend(["--set", "podAnnotations.rolled=upgrade"]);
    let took = helm_install(c, NS, "js", &upgrade);
    eprintln!(
        "node: jetstream: helm upgrade --wait in {:.1}s",
        took.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    let shots = stream.finish();

    let count = |f: &dyn Fn(&crate::lifecycle::Shot) -> bool| shots.iter().filter(|s| f(s)).count();
    let accepted = |p: &str| count(&|s| s.provider == p && (200..300).contains(&s.status));
    let providers = ["atlas", "atomic", "smallest"];
    let delivered = wait_all_delivered(c, NS, &providers, accepted, diag);
    let got: usize = providers
        .iter()
        .map(|p| delivered.get(&format!("/{p}")).map_or(0, BTreeSet::len))
        .sum();
    let refused_upgrade = count(&|s| s.step == "upgrade" && s.status == 0);
    eprintln!(
        "node: jetstream: sent {} / 2xx {} / delivered (distinct ids) {got} / lost 0 / 404 {} / refused: leader {} (window {:?}), upgrade {refused_upgrade}",
        shots.len(),
        count(&|s| (200..300).contains(&s.status)),
        count(&|s| s.status == 404),
        count(&|s| s.step == "leader" && s.status == 0),
        refused_window(&shots, "leader"),
    );
    // Uninstalled before the last checks, so a failure here leaves no operator running
    // for the next test.
    uninstall(c, NS, "js");
    assert_eq!(count(&|s| s.status == 404), 0, "404 for a hook URL");
    assert_eq!(
        refused_upgrade, 0,
        "the rolling upgrade refused connections"
    );
}
