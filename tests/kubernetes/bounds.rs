//! Bounds under floods and faults, through the real binary: a backlogged endpoint is
//! refused with 503 and says so in its status, a disk below its watermark refuses new
//! events, a full disk makes `/healthz` fail and a restart recovers without losing an
//! acknowledged event, a restart with a backlog longer than the queue's memory window
//! delivers each event once, and slow or too many clients are cut off.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::delivery_e2e::*;
use crate::ports::free_port;
use crate::process::output_ok;
use crate::support::wait_until;

/// An Atlas event whose customer number pads it to about `pad` bytes.
fn padded_event(call_id: &str, pad: usize) -> serde_json::Value {
    json!([{"callId": call_id, "campaignId": "camp-1", "triggerName": "call_completed",
        "customerNumber": "+15550100", "notes": "x".repeat(pad)}])
}

async fn post(url: &str, body: &serde_json::Value) -> reqwest::Response {
    send_json(url, body).await.expect("the ingress answers")
}

/// The status of a POST, or 0 when nothing listens (yet).
async fn status_of(url: &str, body: &serde_json::Value) -> u16 {
    match reqwest::Client::new().post(url).json(body).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// `webhook_operator_ingress_rejected_total{reason=...}` as the ops server reports it.
async fn rejected(ops_port: u16, reason: &str) -> u64 {
    let label = format!("reason=\"{reason}\"");
    metric_sum(ops_port, |l| l.contains("rejected") && l.contains(&label)).await
}

/// `webhook_operator_ingress_requests_in_flight` as the ops server reports it.
async fn in_flight(ops_port: u16) -> u64 {
    metric_sum(ops_port, |l| {
        l.starts_with("webhook_operator_ingress_requests_in_flight ")
    })
    .await
}

/// The ops server's `/metrics` text, or `None` when it does not answer (yet).
async fn metrics_text(ops_port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{ops_port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The sum of the sample lines of a `/metrics` text that `pick` selects.
fn sample_sum(text: &str, pick: impl Fn(&str) -> bool) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && pick(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The sum of the ops server's sample lines that `pick` selects.
async fn metric_sum(ops_port: u16, pick: impl Fn(&str) -> bool) -> u64 {
    let text = metrics_text(ops_port)
        .await
        .expect("the ops server answers /metrics");
    sample_sum(&text, pick)
}

async fn healthz(ops_port: u16) -> Option<u16> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{ops_port}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    Some(r.status().as_u16())
}

/// Bytes of the files directly in `dir` (the queue file and its companions).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

async fn wait_delivered(consumer: &Consumer, accepted: &BTreeSet<String>) {
    // The consumer refused for a while: its circuit breaker may be open for a cooldown
    // (30 s) before the first probe succeeds.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !accepted.is_subset(&call_ids(consumer)) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = call_ids(consumer);
    let missing: Vec<_> = accepted.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never delivered: {missing:?}"
    );
}

#[tokio::test]
async fn a_backlogged_endpoint_answers_503_says_so_and_drains_without_loss() {
    let ops = free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    let spec = json!({"destination": consumer_destination(), "maxQueuedEvents": 5,
        "delivery": {"retry": {"initialDelay": "100ms", "maxDelay": "200ms"}}});
    let (env, _sandbox, consumer, operator, data_dir, _) =
        setup_with("backlog", spec, &["--ops-addr", &ops_flag]).await;
    let url = atlas_ready_url(&env).await;

    // The consumer refuses, so every accepted event keeps waiting.
    consumer.answer(503);
    let mut accepted = BTreeSet::new();
    for n in 0..5 {
        let id = format!("bl-{n}");
        assert_eq!(post(&url, &atlas_event(&id)).await.status(), 200);
        accepted.insert(id);
    }
    let refused = post(&url, &atlas_event("bl-over")).await;
    assert_eq!(refused.status(), 503, "the sixth event is over the bound");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert!(rejected(ops, "endpoint_backlogged").await >= 1);

    // A flood over the bound, 32 MiB offered in 8 KiB events: every one is refused, and
    // neither the store nor the process grows with what was offered.
    let pid = operator.child.id();
    let (disk_before, rss_before) = (dir_bytes(data_dir.path()), rss_kib(pid));
    let statuses: Vec<u16> = {
        use futures::StreamExt;
        futures::stream::iter(0..4000)
            .map(|n| {
                let url = url.clone();
                async move {
                    let mut ev = atlas_event(&format!("flood-{n}"));
                    ev[0]["padding"] = json!("x".repeat(8192));
                    status_of(&url, &ev).await
                }
            })
            .buffer_unordered(16)
            .collect()
            .await
    };
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(refused, 4000, "every flood request is refused at the bound");
    let (disk_after, rss_after) = (dir_bytes(data_dir.path()), rss_kib(pid));
    assert!(
        disk_after < disk_before + 4 * 1024 * 1024,
        "the store grew from {disk_before} to {disk_after} bytes under a refused flood"
    );
    assert!(
        rss_after < rss_before + 24 * 1024,
        "the operator's RSS grew from {rss_before} to {rss_after} KiB under a refused flood"
    );

    let ep = wait_false(
        &env,
        "orders",
        "Healthy=False Backlogged",
        "Healthy",
        "Backlogged",
    )
    .await;
    let message = condition_of(ep, "Healthy").message;
    assert!(
        message.contains("5 events waiting for this endpoint (limit 5)"),
        "{message}"
    );

    // Deliveries resume: nothing accepted was dropped, and the ingress accepts again.
    consumer.answer(200);
    wait_delivered(&consumer, &accepted).await;
    assert!(!call_ids(&consumer).contains("bl-over"));
    wait_until(Duration::from_secs(30), "accepted again", || {
        let url = url.clone();
        async move { (status_of(&url, &atlas_event("bl-after")).await == 200).then_some(()) }
    })
    .await;
    wait_endpoint(&env, "orders", "no longer Backlogged", |ep| {
        condition(ep, "Healthy").is_some_and(|(_, r)| r != "Backlogged")
    })
    .await;
}

/// A size-limited tmpfs the test mounts (we are root in the test container), unmounted on
/// drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        output_ok(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
                .arg(dir.path()),
            "run mount",
            "mounting a tmpfs failed: ",
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Writes a filler file until at most `leave` bytes are free (0: the disk is full).
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while self.free() > leave {
            let want = (self.free() - leave).min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..want.max(1)]).is_err() {
                break;
            }
            let _ = f.flush();
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn disk_watermark_refuses_and_a_full_disk_recovers_by_restart_without_loss() {
    let disk = SmallDisk::mount(24);
    let data = disk.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ops = free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    // The consumer refuses for the whole test: enough attempts that nothing is
    // dead-lettered meanwhile (the breaker holds most of them back anyway).
    let spec = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"maxAttempts": 100, "initialDelay": "100ms", "maxDelay": "200ms"}}});
    let (env, sandbox, consumer, mut operator, _dir, port) = setup_with(
        "disk",
        spec,
        &["--ops-addr", &ops_flag, "--min-free-disk-bytes", "4194304"],
    )
    .await;
    // `setup_with` started the operator on its own data dir: restart it on the small disk.
    operator.kill9();
    let start = |extra: &[&str]| {
        let mut args = vec!["--ops-addr", ops_flag.as_str()];
        args.extend_from_slice(extra);
        OperatorProcess::start_with(&env, &sandbox, &consumer, port, &data, &args)
    };
    let mut operator = start(&["--min-free-disk-bytes", "4194304"]);
    let url = atlas_ready_url(&env).await;
    consumer.answer(503);
    let mut accepted = BTreeSet::new();
    wait_until(Duration::from_secs(30), "ingress on the small disk", || {
        let url = url.clone();
        async move { (status_of(&url, &atlas_event("d-0")).await == 200).then_some(()) }
    })
    .await;
    accepted.insert("d-0".to_string());

    // Below the watermark: refused before the disk is full, counted, said in the status.
    let filler = disk.fill(2 * 1024 * 1024);
    let refused = post(&url, &atlas_event("d-low")).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(rejected(ops, "disk_low").await >= 1);
    wait_endpoint(&env, "orders", "Backlogged by the disk", |ep| {
        ep.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.reason == "Backlogged" && c.message.contains("disk"))
        })
    })
    .await;
    std::fs::remove_file(&filler).unwrap();
    // Free space is read at most every 250 ms.
    wait_until(
        Duration::from_secs(5),
        "accepted once space returns",
        || {
            let url = url.clone();
            async move { (status_of(&url, &atlas_event("d-1")).await == 200).then_some(()) }
        },
    )
    .await;
    accepted.insert("d-1".to_string());

    // Watermark off: fill the disk for real. The first failed write is a 503, and the
    // store cannot write again in this process: /healthz fails so Kubernetes restarts it.
    operator.kill9();
    let mut operator = start(&["--min-free-disk-bytes", "0"]);
    wait_until(Duration::from_secs(30), "ingress back", || {
        let url = url.clone();
        async move { (status_of(&url, &atlas_event("d-2")).await == 200).then_some(()) }
    })
    .await;
    accepted.insert("d-2".to_string());
    assert_eq!(healthz(ops).await, Some(200));
    let filler = disk.fill(0);
    let mut full = false;
    for n in 0..200 {
        let id = format!("d-fill-{n}");
        let status = post(&url, &padded_event(&id, 64 * 1024)).await.status();
        if status.is_success() {
            accepted.insert(id);
        } else {
            assert_eq!(
                status, 503,
                "a full disk is a 503, never a 2xx or a 5xx crash"
            );
            full = true;
            break;
        }
    }
    assert!(full, "the disk filled up");
    wait_until(Duration::from_secs(15), "/healthz fails", || async {
        (healthz(ops).await == Some(503)).then_some(())
    })
    .await;
    // Space returns; the restart Kubernetes does after the failed liveness probe.
    std::fs::remove_file(&filler).unwrap();
    operator.kill9();
    let _operator = start(&["--min-free-disk-bytes", "0"]);
    wait_until(
        Duration::from_secs(30),
        "healthy after the restart",
        || async { (healthz(ops).await == Some(200)).then_some(()) },
    )
    .await;
    wait_until(Duration::from_secs(30), "writes succeed again", || {
        let url = url.clone();
        async move { (status_of(&url, &atlas_event("d-3")).await == 200).then_some(()) }
    })
    .await;
    accepted.insert("d-3".to_string());
    consumer.answer(200);
    wait_delivered(&consumer, &accepted).await;
    println!(
        "full disk: {} acknowledged events, all delivered",
        accepted.len()
    );
}

/// Opens a connection to the ingress and sends `head` (request line and headers, or part
/// of them).
async fn connect(port: u16, head: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Sends one byte a second until the server answers or closes; returns what it answered
/// (empty: closed without an answer) and when.
async fn trickle(mut s: tokio::net::TcpStream, byte: u8, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    loop {
        assert!(
            started.elapsed() < limit,
            "still connected after {limit:?} of one byte a second"
        );
        tokio::select! {
            n = s.read(&mut buf) => {
                let n = n.unwrap_or(0);
                return (String::from_utf8_lossy(&buf[..n]).into_owned(), started.elapsed());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if s.write_all(&[byte]).await.is_err() {
                    return (String::new(), started.elapsed());
                }
            }
        }
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_excess_requests_refused() {
    let ops = free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    let (env, _sandbox, consumer, _operator, _dir, port) = setup_to_consumer(
        "slowclient",
        &[
            "--ops-addr",
            &ops_flag,
            "--header-read-timeout",
            "3s",
            "--body-read-timeout",
            "4s",
            "--max-concurrent-requests",
            "2",
        ],
    )
    .await;
    let url = atlas_ready_url(&env).await;
    let path = url::Url::parse(&url).unwrap().path().to_string();

    // Headers one byte a second: the connection is closed at the header deadline.
    let s = connect(port, &format!("POST {path} HTTP/1.1\r\nHost: x\r\n")).await;
    let (answer, took) = trickle(s, b'x', Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(6),
        "cut off after {took:?}: {answer}"
    );
    wait_until(Duration::from_secs(5), "header timeout counted", || async {
        (rejected(ops, "header_timeout").await >= 1).then_some(())
    })
    .await;

    // A body one byte a second: 408 at the body deadline, counted, nothing queued.
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    );
    let s = connect(port, &head).await;
    let (answer, took) = trickle(s, b' ', Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(7), "{took:?}");
    assert!(rejected(ops, "body_timeout").await >= 1);

    // Two requests in flight (slow bodies): a third is refused at once with 503. The held
    // slots last until their body deadline, so the third is sent as soon as the ops
    // server shows both held, by a client built beforehand.
    let http = reqwest::Client::new();
    assert_eq!(in_flight(ops).await, 0);
    let held: Vec<_> = futures::future::join_all((0..2).map(|_| connect(port, &head))).await;
    wait_until(
        Duration::from_secs(2),
        "both slow requests in flight",
        || async { (in_flight(ops).await == 2).then_some(()) },
    )
    .await;
    let refused = post_event(&http, &url, "c-over").await;
    assert_eq!(refused.status(), 503, "third request while two are held");
    assert!(refused.headers().contains_key("retry-after"));
    assert!(rejected(ops, "overloaded").await >= 1);
    drop(held);
    wait_until(
        Duration::from_secs(10),
        "accepted once the slots free",
        || {
            let url = url.clone();
            async move { (status_of(&url, &atlas_event("c-ok")).await == 200).then_some(()) }
        },
    )
    .await;
    wait_until(Duration::from_secs(5), "every slot given back", || async {
        (in_flight(ops).await == 0).then_some(())
    })
    .await;
    wait_until(
        Duration::from_secs(30),
        "the accepted event arrives",
        || {
            let ok = call_ids(&consumer).contains("c-ok");
            async move { ok.then_some(()) }
        },
    )
    .await;
    assert!(!call_ids(&consumer).contains("c-over"));
}

/// One `webhook-operator run --leader-election` process; its log lines with the moment
/// each arrived.
struct Candidate {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl Candidate {
    fn start(kubeconfig: &Path, namespace: &str, name: &str, data: &Path) -> Candidate {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-operator"))
            .arg("run")
            .args(["--ingress-addr", "127.0.0.1:0", "--ops-addr", "127.0.0.1:0"])
            .args(["--namespace", namespace, "--leader-election"])
            .args(["--lease-duration", "6s"])
            .arg("--data-dir")
            .arg(data)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("RUST_LOG", "webhook_operator=info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start operator");
        let lines: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>> = Default::default();
        let sink = lines.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Candidate { child, lines }
    }

    /// When this replica's reconcilers started and stopped: (start, stop or None).
    fn leading(&self) -> Vec<(Instant, Option<Instant>)> {
        let mut spans: Vec<(Instant, Option<Instant>)> = Vec::new();
        for (at, line) in self.lines.lock().unwrap().iter() {
            if line.contains("became leader") {
                spans.push((*at, None));
            } else if line.contains("reconcilers stopped")
                && let Some(last) = spans.last_mut()
                && last.1.is_none()
            {
                last.1 = Some(*at);
            }
        }
        spans
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Resumes the API server even when the test fails half-way.
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

#[tokio::test]
async fn a_leader_whose_api_server_hangs_stops_reconciling_before_its_lease_expires() {
    // Its own control plane: the test freezes this API server, which would stall every
    // other test on the shared one.
    let cp: &'static crate::support::ControlPlane = Box::leak(Box::new(
        tokio::task::spawn_blocking(|| crate::support::start_control_plane_named("wo-cp-hang"))
            .await
            .unwrap(),
    ));
    let client = crate::support::client_for(cp).await;
    let namespace = "leader-hang";
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(client.clone());
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    namespaces.create(&Default::default(), &ns).await.unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let replicas = [
        Candidate::start(&cp.kubeconfig, namespace, "replica-a", dirs[0].path()),
        Candidate::start(&cp.kubeconfig, namespace, "replica-b", dirs[1].path()),
    ];
    let leader = wait_until(Duration::from_secs(60), "a leader", || {
        let found = replicas.iter().position(|r| !r.leading().is_empty());
        async move { found }
    })
    .await;

    // The API server stops answering (no refusal, no reset): every request hangs.
    let pid = std::fs::read_to_string(cp.dir.join("apiserver.pid"))
        .unwrap()
        .trim()
        .to_string();
    signal(&pid, "-STOP");
    let resume = Resume(pid.clone());
    let stopped_at = Instant::now();
    // Lease 6 s, renew deadline 4 s: the leader's last renewal was at most a retry period
    // (0.8 s) before the stop, so nobody may take over before stop + 5.2 s. It must have
    // stopped its reconcilers by then, while the API server still hangs.
    let stepped_down = wait_until(Duration::from_secs(15), "the leader steps down", || {
        let stop = replicas[leader].leading().last().and_then(|s| s.1);
        async move { stop }
    })
    .await;
    let took = stepped_down.duration_since(stopped_at);
    assert!(
        took < Duration::from_millis(5200),
        "reconcilers stopped {took:?} after the API server hung; the Lease may expire at 5.2 s"
    );
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(stopped_at.elapsed())).await;
    signal(&pid, "-CONT");
    drop(resume);

    // Someone leads again once it answers, and no two replicas ever led at the same time.
    wait_until(Duration::from_secs(60), "a leader after the resume", || {
        let now_leading = replicas.iter().any(|r| {
            r.leading()
                .last()
                .is_some_and(|s| s.0 > stopped_at && s.1.is_none())
        });
        async move { now_leading.then_some(()) }
    })
    .await;
    let spans: Vec<(usize, Instant, Instant)> = replicas
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.leading()
                .into_iter()
                .map(move |(a, b)| (i, a, b.unwrap_or_else(Instant::now)))
        })
        .collect();
    for (i, a1, b1) in &spans {
        for (j, a2, b2) in &spans {
            if i != j {
                assert!(
                    b1 <= a2 || b2 <= a1,
                    "replicas {i} and {j} reconciled at the same time: {spans:?}"
                );
            }
        }
    }
}

/// `webhook_operator_queue_depth{state=...}` as the ops server reports it, every state
/// from one scrape: summing two scrapes would count an event that moved from pending to
/// leased (or back, on a refused delivery) in between twice or not at all.
#[derive(Debug, Default, PartialEq)]
struct QueueDepth {
    pending: u64,
    leased: u64,
    dead_lettered: u64,
}

impl QueueDepth {
    /// Events stored and not yet delivered: pending or leased.
    fn waiting(&self) -> u64 {
        self.pending + self.leased
    }
}

async fn queue_depth(ops_port: u16) -> Option<QueueDepth> {
    let text = metrics_text(ops_port).await?;
    let state = |state: &str| {
        let label = format!("state=\"{state}\"");
        sample_sum(&text, |l| {
            l.starts_with("webhook_operator_queue_depth") && l.contains(&label)
        })
    };
    Some(QueueDepth {
        pending: state("pending"),
        leased: state("leased"),
        dead_lettered: state("dead_lettered"),
    })
}

#[tokio::test]
async fn deleting_an_endpoint_deletes_its_queued_events() {
    let ops = free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    let (env, _sandbox, consumer, _operator, _dir, _) =
        setup_to_consumer("purge", &["--ops-addr", &ops_flag]).await;
    let url = atlas_ready_url(&env).await;
    consumer.answer(503);
    for n in 0..3 {
        assert_eq!(
            post(&url, &atlas_event(&format!("p-{n}"))).await.status(),
            200
        );
    }
    wait_until(Duration::from_secs(10), "three events waiting", || async {
        (queue_depth(ops).await?.waiting() == 3).then_some(())
    })
    .await;

    let api: kube::Api<webhook_operator::api::WebhookEndpoint> =
        kube::Api::namespaced(env.client.clone(), &env.namespace);
    api.delete("orders", &Default::default()).await.unwrap();
    wait_until(Duration::from_secs(30), "endpoint gone", || {
        let api = api.clone();
        async move { api.get_opt("orders").await.ok()?.is_none().then_some(()) }
    })
    .await;
    wait_until(Duration::from_secs(10), "its events deleted", || async {
        (queue_depth(ops).await? == QueueDepth::default()).then_some(())
    })
    .await;
}

/// A restart with a backlog longer than the embedded queue's in-memory window (1,024
/// ready events per endpoint): the restarted binary serves again, refills the window from
/// the file as it drains, and delivers every acknowledged event exactly once.
#[tokio::test]
async fn a_restart_with_a_backlog_longer_than_the_window_delivers_each_event_once() {
    use futures::StreamExt;
    const N: usize = 1300;
    let ops = free_port();
    let ops_flag = format!("127.0.0.1:{ops}");
    let spec = json!({"destination": consumer_destination(),
        "delivery": {"retry": {"maxAttempts": 100, "initialDelay": "100ms", "maxDelay": "200ms"}}});
    let (env, sandbox, consumer, mut operator, dir, port) =
        setup_with("restart", spec, &["--ops-addr", &ops_flag]).await;
    let url = atlas_ready_url(&env).await;
    // Refused deliveries are not recorded: before the restart nothing is delivered.
    consumer.answer(503);
    let statuses: Vec<(String, u16)> = futures::stream::iter(0..N)
        .map(|i| {
            let url = url.clone();
            async move {
                let id = format!("r-{i}");
                let status = status_of(&url, &atlas_event(&id)).await;
                (id, status)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|(_, s)| *s == 200),
        "every event is acknowledged"
    );
    let mut accepted: BTreeSet<String> = statuses.into_iter().map(|(id, _)| id).collect();

    operator.kill9();
    let started = Instant::now();
    let _operator = OperatorProcess::start_with(
        &env,
        &sandbox,
        &consumer,
        port,
        dir.path(),
        &["--ops-addr", &ops_flag],
    );
    wait_until(
        Duration::from_secs(30),
        "ingress back after the restart",
        || {
            let url = url.clone();
            async move { (status_of(&url, &atlas_event("r-after")).await == 200).then_some(()) }
        },
    )
    .await;
    accepted.insert("r-after".to_string());
    println!(
        "restart with {N} waiting events: serving after {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        queue_depth(ops).await.map(|d| d.waiting()),
        Some(N as u64 + 1)
    );

    consumer.answer(200);
    wait_delivered(&consumer, &accepted).await;
    wait_until(Duration::from_secs(30), "the queue drained", || async {
        (queue_depth(ops).await?.waiting() == 0).then_some(())
    })
    .await;
    let received = consumer.received();
    let mut per_id = std::collections::BTreeMap::<String, usize>::new();
    for r in &received {
        if let Some(id) = r.body["callId"].as_str() {
            *per_id.entry(id.to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(per_id.len(), accepted.len());
}
