//! The release's lifecycle with events flowing: the simulators fire a steady stream at the
//! operator's ingress Service while a `helm upgrade` rolls the pod, `kubectl delete pod`
//! deletes it, and an eviction (through the Eviction API, which honours the
//! PodDisruptionBudget) evicts it; then the custom resources are deleted and the release is
//! uninstalled. Afterwards every event the ingress answered 2xx reached the consumer (by
//! its webhook id), no hook URL was answered 404, and no webhook is left at the simulators.
//! With one embedded-queue replica the ingress refuses connections while the pod restarts:
//! the test measures and prints that window per step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::install::{apply_examples, fire, helm_install, signing_secret, workloads};
use crate::support::{Cluster, cluster, http, text, wait_for};

const NS: &str = "lifecycle";
const FULL: &str = "life-webhook-operator";

/// One fire at a simulator: when, which step was running, and the status its delivery to
/// the hook URL got (0: the connection failed).
pub struct Shot {
    pub at: Instant,
    pub step: &'static str,
    pub provider: &'static str,
    pub status: u16,
}

/// Fires Atlas, Atomic and Smallest events in turn, one every 100 ms, until stopped.
pub struct Stream {
    stop: Arc<AtomicBool>,
    step: Arc<Mutex<&'static str>>,
    shots: Arc<Mutex<Vec<Shot>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    pub fn start(sandbox: String, events: Vec<(&'static str, Value)>) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let step = Arc::new(Mutex::new("steady"));
        let shots = Arc::new(Mutex::new(Vec::new()));
        let (s, st, sh) = (stop.clone(), step.clone(), shots.clone());
        // One shot every 100 ms, each in a thread of its own, so a shot that hangs while
        // the pod restarts does not hold the next ones back.
        let thread = std::thread::spawn(move || {
            let events = Arc::new(events);
            let mut shooters = Vec::new();
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                let (events, sandbox, st, sh) =
                    (events.clone(), sandbox.clone(), st.clone(), sh.clone());
                let n = i;
                i += 1;
                shooters.push(std::thread::spawn(move || {
                    let (provider, event) = &events[n % events.len()];
                    let step = *st.lock().unwrap();
                    let at = Instant::now();
                    let statuses = fire(&sandbox, provider, event);
                    // A fire the simulator could not answer counts as one refused delivery.
                    let statuses = if statuses.is_empty() {
                        vec![0]
                    } else {
                        statuses
                    };
                    let mut shots = sh.lock().unwrap();
                    for status in statuses {
                        shots.push(Shot {
                            at,
                            step,
                            provider,
                            status,
                        });
                    }
                }));
                std::thread::sleep(Duration::from_millis(100));
            }
            for t in shooters {
                t.join().unwrap();
            }
        });
        Stream {
            stop,
            step,
            shots,
            thread: Some(thread),
        }
    }

    pub fn step(&self, name: &'static str) {
        *self.step.lock().unwrap() = name;
    }

    pub fn finish(mut self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.shots.lock().unwrap())
    }
}

/// The webhook ids the consumer verified per path (`/atlas`, ...), read from its log.
/// Waits (90 s at most) until the consumer in `ns` holds, for each of `providers`, at
/// least as many distinct event ids as `accepted` says were answered 2xx; returns them.
pub fn wait_all_delivered(
    c: &Cluster,
    ns: &str,
    providers: &[&str],
    accepted: impl Fn(&str) -> usize,
    diag: impl Fn() -> String,
) -> BTreeMap<String, BTreeSet<String>> {
    wait_for(
        Duration::from_secs(90),
        "every accepted event delivered",
        diag,
        || {
            let ids = delivered_ids(c, ns);
            providers
                .iter()
                .all(|p| ids.get(&format!("/{p}")).map_or(0, BTreeSet::len) >= accepted(p))
                .then_some(ids)
        },
    )
}

pub fn delivered_ids(c: &Cluster, ns: &str) -> BTreeMap<String, BTreeSet<String>> {
    let log = c.kubectl_ok(&["-n", ns, "logs", "deploy/demo-consumer", "--tail=-1"]);
    let field = |l: &str, name: &str| -> Option<String> {
        let rest = &l[l.find(&format!(" {name}="))? + name.len() + 2..];
        Some(
            rest.split_whitespace()
                .next()?
                .trim_matches('"')
                .to_string(),
        )
    };
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in log.lines().filter(|l| l.contains("delivery verified")) {
        if let (Some(path), Some(id)) = (field(l, "path"), field(l, "id")) {
            ids.entry(path).or_default().insert(id);
        }
    }
    ids
}

fn pod_uid(c: &Cluster) -> String {
    c.kubectl_ok(&[
        "-n",
        NS,
        "get",
        "pod",
        &format!("{FULL}-0"),
        "-o",
        "jsonpath={.metadata.uid}",
    ])
}

/// Waits until pod 0 is a pod other than `old` and Ready.
fn wait_replaced(c: &Cluster, old: &str, what: &str) -> Duration {
    let t = Instant::now();
    wait_for(
        Duration::from_secs(180),
        what,
        || c.diagnostics(NS),
        || {
            let out = c.kubectl(&[
                "-n",
                NS,
                "get",
                "pod",
                &format!("{FULL}-0"),
                "-o",
                r#"jsonpath={.metadata.uid} {.status.conditions[?(@.type=="Ready")].status}"#,
            ]);
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            (out.status.success() && !s.starts_with(old) && s.ends_with("True")).then_some(())
        },
    );
    t.elapsed()
}

fn evict(c: &Cluster) -> std::process::Output {
    let body = json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": format!("{FULL}-0"), "namespace": NS},
    });
    let file = c.dir.join("eviction.json");
    std::fs::write(&file, body.to_string()).unwrap();
    c.kubectl(&[
        "create",
        "--raw",
        &format!("/api/v1/namespaces/{NS}/pods/{FULL}-0/eviction"),
        "-f",
        file.to_str().unwrap(),
    ])
}

/// How long the ingress accepted nothing in a step with refused deliveries: from the start
/// of the last shot answered 2xx before the first refusal to the start of the first one
/// answered 2xx after the last refusal (None: none refused); shots start every 100 ms.
pub fn refused_window(shots: &[Shot], step: &str) -> Option<Duration> {
    let mut shots: Vec<&Shot> = shots.iter().collect();
    shots.sort_by_key(|s| s.at);
    let ok = |s: &&&Shot| (200..300).contains(&s.status);
    let first = shots.iter().position(|s| s.step == step && s.status == 0)?;
    let last = shots
        .iter()
        .rposition(|s| s.step == step && s.status == 0)?;
    let before = shots[..first]
        .iter()
        .rev()
        .find(ok)
        .map_or(shots[first].at, |s| s.at);
    let after = shots[last..]
        .iter()
        .find(ok)
        .map_or(shots[last].at, |s| s.at);
    Some(after.saturating_duration_since(before))
}

#[test]
fn lifecycle_upgrade_delete_evict_uninstall_lose_nothing() {
    let c = cluster();
    let diag = || c.diagnostics(NS);
    c.kubectl_ok(&["create", "namespace", NS]);
    c.apply(NS, &workloads(&c.image_ref(), &signing_secret()));
    for d in ["sandbox", "demo-consumer"] {
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
    helm_install(c, NS, "life", &[]);
    apply_examples(c, NS);
    let sandbox = format!("http://{}:8080", c.cluster_ip(NS, "sandbox"));
    let events = crate::install::provider_events(c, NS)
        .into_iter()
        .filter(|(p, _)| *p != "atllas")
        .collect::<Vec<_>>();
    // The routes are in place before the stream starts (the ingress answers 503 until then).
    for (p, e) in &events {
        wait_for(Duration::from_secs(30), p, diag, || {
            fire(&sandbox, p, e)
                .iter()
                .all(|s| (200..300).contains(s))
                .then_some(())
        });
    }

    let stream = Stream::start(sandbox.clone(), events);
    std::thread::sleep(Duration::from_secs(3));

    stream.step("upgrade");
    let old = pod_uid(c);
    let took = helm_install(c, NS, "life", &["--set", "podAnnotations.rolled=upgrade"]);
    wait_replaced(c, &old, "the upgrade to roll the pod");
    eprintln!(
        "node: helm upgrade --wait rolled the pod in {:.1}s",
        took.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));

    stream.step("delete");
    let old = pod_uid(c);
    c.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "pod",
        &format!("{FULL}-0"),
        "--wait=false",
    ]);
    let took = wait_replaced(c, &old, "the deleted pod to be replaced");
    eprintln!(
        "node: kubectl delete pod: replaced and Ready in {:.1}s",
        took.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));

    stream.step("evict");
    // With maxUnavailable 0 the PodDisruptionBudget refuses the eviction (429) ...
    helm_install(
        c,
        NS,
        "life",
        &[
            "--set",
            "podAnnotations.rolled=upgrade",
            "--set",
            "podDisruptionBudget.maxUnavailable=0",
        ],
    );
    let refused = evict(c);
    assert!(
        !refused.status.success(),
        "eviction allowed despite the budget"
    );
    assert!(
        text(&refused).contains("disruption budget"),
        "{}",
        text(&refused)
    );
    // ... and with the chart's default (maxUnavailable 1) it goes through.
    helm_install(c, NS, "life", &["--set", "podAnnotations.rolled=upgrade"]);
    let old = pod_uid(c);
    let out = evict(c);
    assert!(out.status.success(), "eviction: {}", text(&out));
    let took = wait_replaced(c, &old, "the evicted pod to be replaced");
    eprintln!(
        "node: eviction: replaced and Ready in {:.1}s",
        took.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    let shots = stream.finish();

    // Every event answered 2xx reaches the consumer: per provider, as many distinct
    // webhook ids at its path as 2xx answers (Atomic's batches may hold more).
    let count = |f: &dyn Fn(&Shot) -> bool| shots.iter().filter(|s| f(s)).count();
    let accepted = |p: &str| count(&|s| s.provider == p && (200..300).contains(&s.status));
    let not_found = count(&|s| s.status == 404);
    let refused = count(&|s| s.status == 0);
    let other = count(&|s| s.status != 0 && !(200..300).contains(&s.status) && s.status != 404);
    let providers = ["atlas", "atomic", "smallest"];
    let report = |ids: &BTreeMap<String, BTreeSet<String>>| {
        providers
            .iter()
            .map(|p| {
                let got = ids.get(&format!("/{p}")).map_or(0, BTreeSet::len);
                format!("{p}: 2xx {} delivered {got}", accepted(p))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "node: lifecycle: sent {} / 2xx {} / 404 {not_found} / refused {refused} / other {other}",
        shots.len(),
        count(&|s| (200..300).contains(&s.status))
    );
    let all_delivered = wait_all_delivered(c, NS, &providers, accepted, || {
        format!("{}\n{}", report(&delivered_ids(c, NS)), diag())
    });
    let lost: usize = providers
        .iter()
        .map(|p| {
            accepted(p).saturating_sub(all_delivered.get(&format!("/{p}")).map_or(0, BTreeSet::len))
        })
        .sum();
    eprintln!("node: lifecycle: {} / lost {lost}", report(&all_delivered));
    for step in ["upgrade", "delete", "evict"] {
        let n = count(&|s| s.step == step && s.status == 0);
        match refused_window(&shots, step) {
            Some(w) => eprintln!("node: {step}: {n} refused, window {:.1}s", w.as_secs_f64()),
            None => eprintln!("node: {step}: none refused"),
        }
    }
    assert_eq!(not_found, 0, "the ingress answered 404 for a hook URL");

    // Uninstall in the README's order: the custom resources first (the operator removes
    // its webhooks at the providers), then the release.
    c.kubectl_ok(&[
        "-n",
        NS,
        "delete",
        "webhooksubscriptions,webhookendpoints",
        "--all",
        "--timeout=120s",
    ]);
    for p in ["atlas", "atomic", "smallest"] {
        let (status, body) = http(
            "GET",
            &format!("{sandbox}/_control/{p}/subscriptions"),
            None,
        );
        assert_eq!(status, 200, "{p}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        // Atomic's API disables a webhook rather than deleting it.
        let live = v["subscriptions"]
            .as_array()
            .into_iter()
            .chain(v["webhooks"].as_array())
            .flatten()
            .filter(|w| w["webhook"]["enabled"] != json!(false))
            .count();
        assert_eq!(
            live, 0,
            "{p}: webhooks left after the resources were deleted: {body}"
        );
    }
    let out = c.helm(&[
        "uninstall",
        "life",
        "--namespace",
        NS,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(out.status.success(), "helm uninstall: {}", text(&out));
    let left = c.kubectl_ok(&[
        "-n",
        NS,
        "get",
        "sts,svc,sa,pdb",
        "-l",
        "app.kubernetes.io/instance=life",
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "left after uninstall: {left}");
    // The CRDs stay (Helm never deletes what it installed from crds/).
    c.kubectl_ok(&["get", "crd", "webhookendpoints.hooks.webhook-operator.dev"]);
}
