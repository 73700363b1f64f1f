//! The delivery path on loopback. A load generator POSTs 1 KiB provider-shaped events
//! (Atlas arrays and signed Smallest envelopes) to the real ingress of the data plane (real
//! `ProviderParser`, a real redb file, or a real nats-server with JetStream); a loopback
//! consumer counts deliveries and reads the send time embedded in each payload. The same
//! load then goes through nginx as a keep-alive reverse proxy, and straight to the consumer.
//! The data plane runs in a process of its own (this binary started again), as nginx runs
//! in its own, so each phase can report the CPU of what sits between the two ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::commits::{CommitTotals, Commits};
use crate::mark;
use crate::proc_stats::{machine_cpu_seconds, tree_cpu_seconds};
use webhook_operator::dataplane::{
    DataPlane, DataPlaneConfig, EndpointConfig, EndpointKey, SubscriptionRoute,
};
use webhook_operator::delivery::{Destination, Policy, SigningSecret};
use webhook_operator::inbound::VerificationKeys;
use webhook_operator::providers::Provider;
use webhook_operator::providers::{ProviderParser, sign_hex};
use webhook_operator::queue::{JetStreamOptions, JetStreamQueue};

#[allow(dead_code)] // the tests' helper; the benchmark uses start and url only
#[path = "../../tests/common/nats.rs"]
mod nats;
#[path = "../../tests/common/ports.rs"]
mod ports;

const EVENT_BYTES: usize = 1024;
const SMALLEST_SECRET: &[u8] = b"bench-smallest-signing-secret";
const SEND_MARK: &[u8] = b"\"benchSentUs\":";

/// Microseconds since the process's first call: generator and consumer share the clock.
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Latencies in microseconds; quantiles and max in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut v: Vec<u32>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Latency {
            count: v.len(),
            p50_ms: at(0.50) as f64 / 1000.0,
            p99_ms: at(0.99) as f64 / 1000.0,
            p999_ms: at(0.999) as f64 / 1000.0,
            max_ms: *v.last().unwrap() as f64 / 1000.0,
        }
    }
}

/// The loopback consumer: counts deliveries, records send-to-receipt latency.
#[derive(Default)]
struct Consumer {
    delivered: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

impl Consumer {
    fn record(&self, body: &[u8]) {
        let now = now_us();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(sent) = sent_us(body) {
            let lat = now.saturating_sub(sent).min(u32::MAX as u64) as u32;
            self.latencies.lock().unwrap().push(lat);
        }
    }

    fn take_latencies(&self) -> Vec<u32> {
        std::mem::take(&mut *self.latencies.lock().unwrap())
    }
}

fn sent_us(body: &[u8]) -> Option<u64> {
    let at = body.windows(SEND_MARK.len()).position(|w| w == SEND_MARK)? + SEND_MARK.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

async fn serve(router: axum::Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

async fn start_consumer(consumer: Arc<Consumer>) -> anyhow::Result<SocketAddr> {
    serve(axum::Router::new().fallback(move |body: Bytes| {
        let c = consumer.clone();
        async move {
            c.record(&body);
            "ok"
        }
    }))
    .await
}

/// One request's worth of load: URL, extra header, body.
struct Shot {
    url: String,
    signature: Option<String>,
    body: Vec<u8>,
}

/// Builds the n-th event: even n an Atlas array of one event, odd n a signed Smallest
/// envelope; both padded to [`EVENT_BYTES`] and carrying the send time.
struct Shots {
    base: String,
    run: u64,
}

impl Shots {
    /// `sent`: when the event was due to leave (open loop) or left (closed loop), in
    /// [`now_us`] time; the consumer measures latency from it.
    fn shot(&self, n: u64, sent: u64) -> Shot {
        let pad = |head: &str, tail: &str| {
            let fill = EVENT_BYTES.saturating_sub(head.len() + tail.len());
            let mut s = String::with_capacity(EVENT_BYTES);
            s.push_str(head);
            s.extend(std::iter::repeat_n('x', fill));
            s.push_str(tail);
            s.into_bytes()
        };
        if n.is_multiple_of(2) {
            let head = format!(
                "[{{\"callId\":\"r{}-c{n}\",\"campaignId\":\"camp-bench\",\"triggerName\":\"call_completed\",\
                 \"customerNumber\":\"+15550100\",\"benchSentUs\":{sent},\"transcript\":\"",
                self.run
            );
            Shot {
                url: format!("{}/atlas", self.base),
                signature: None,
                body: pad(&head, "\"}]"),
            }
        } else {
            let head = format!(
                "{{\"id\":\"r{}-d{n}\",\"event\":\"65f0c0ffee00000000000001.post-conversation\",\
                 \"url\":\"https://hooks.example/x\",\"description\":\"bench\",\"metadata\":{{\
                 \"agentId\":\"65f0c0ffee00000000000001\",\"eventType\":\"post-conversation\",\
                 \"conversationType\":\"outbound\",\"callId\":\"c{n}\",\"benchSentUs\":{sent}}},\"summary\":\"",
                self.run
            );
            let body = pad(&head, "\"}");
            Shot {
                url: format!("{}/smallest", self.base),
                signature: Some(sign_hex(SMALLEST_SECRET, &body)),
                body,
            }
        }
    }
}

/// Where the load goes and what to count.
struct Target {
    client: reqwest::Client,
    shots: Shots,
    /// What sits between the generator and the consumer; none when the load goes
    /// straight through.
    between: Option<Between>,
    next: AtomicU64,
    accepted: AtomicU64,
    failed: AtomicU64,
    /// From each accepted event's send time to its 2xx answer (the durable ack), µs.
    answered: Mutex<Vec<u32>>,
}

/// What sits between the generator and the consumer: its process (the data plane's,
/// nginx's master), whose CPU the phase reports, and for a data plane its ops server,
/// whose queue-commit histograms the phase reports.
#[derive(Clone, Copy, Debug)]
struct Between {
    pid: u32,
    metrics: Option<SocketAddr>,
}

impl Target {
    async fn fire(&self, sent: u64) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let shot = self.shots.shot(n, sent);
        let mut req = self
            .client
            .post(&shot.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(shot.body);
        if let Some(sig) = shot.signature {
            req = req.header("x-signature", sig);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                let took = now_us().saturating_sub(sent).min(u32::MAX as u64) as u32;
                self.answered.lock().unwrap().push(took);
                // Read the (small) answer so the connection goes back to the pool.
                let _ = r.bytes().await;
                self.accepted.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What one load phase measured.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    pub offered_per_s: Option<f64>,
    pub accepted: u64,
    pub failed: u64,
    pub accepted_per_s: f64,
    /// Deliveries that reached the consumer during the load window, per second.
    pub delivered_per_s: f64,
    /// The window slice by slice.
    pub slices: Slices,
    /// Deliveries in all, the drain after the window included.
    pub delivered_total: u64,
    /// From the end of the load window until every accepted event was delivered.
    pub drain_seconds: f64,
    /// Send to delivery.
    pub latency: Latency,
    /// Send to the ingress's 2xx (stored durably): the part of `latency` before the queue.
    pub answered: Latency,
    /// The machine's CPU over the load window.
    pub cpu: MachineCpu,
    /// CPU µs per delivered event of the process between the generator and the consumer
    /// (with its children: nginx's workers), over the load window.
    pub between_us_per_event: Option<f64>,
    /// The embedded queue's group commits over the load window (none for nginx, the
    /// direct phase and JetStream).
    pub commits: Option<Commits>,
}

/// The whole machine's CPU over a load window: the generator and the consumer are in every
/// phase, so phases differ by what sits between them.
#[derive(Clone, Copy, Debug)]
pub struct MachineCpu {
    /// Busy share of all cores (idle and I/O wait are not busy).
    pub busy_share: f64,
    /// Busy CPU microseconds per event delivered in the window.
    pub us_per_event: f64,
}

/// Unknown: `/proc/stat` unreadable, or nothing delivered.
impl Default for MachineCpu {
    fn default() -> Self {
        MachineCpu {
            busy_share: f64::NAN,
            us_per_event: f64::NAN,
        }
    }
}

impl MachineCpu {
    /// From two `(busy, total)` readings of [`machine_cpu_seconds`] around `events`.
    fn over(start: Option<(f64, f64)>, end: Option<(f64, f64)>, events: u64) -> Option<Self> {
        let ((busy0, all0), (busy1, all1)) = (start?, end?);
        if all1 <= all0 {
            return None;
        }
        Some(MachineCpu {
            busy_share: (busy1 - busy0) / (all1 - all0),
            us_per_event: us_per_event(busy1 - busy0, events)?,
        })
    }

    fn busy_percent(&self) -> f64 {
        self.busy_share * 100.0
    }
}

/// The start of a load window: when, the consumer's count, the machine's CPU seconds and
/// those of the process between.
struct WindowStart {
    at: Instant,
    delivered: u64,
    cpu: Option<(f64, f64)>,
    between: Option<(u32, f64)>,
    commits: Option<(SocketAddr, CommitTotals)>,
}

/// A load window as it ended.
struct Window {
    delivered: (u64, u64),
    elapsed: Duration,
    cpu: MachineCpu,
    between_us_per_event: Option<f64>,
    commits: Option<Commits>,
}

impl WindowStart {
    fn now(consumer: &Consumer, between: Option<Between>) -> Self {
        let metrics = between.and_then(|b| b.metrics);
        WindowStart {
            delivered: consumer.delivered.load(Ordering::Relaxed),
            cpu: machine_cpu_seconds(),
            between: between.and_then(|b| Some((b.pid, tree_cpu_seconds(b.pid)?))),
            commits: metrics.and_then(|m| Some((m, crate::commits::read(m)?))),
            at: Instant::now(),
        }
    }

    fn end(&self, consumer: &Consumer) -> Window {
        let elapsed = self.at.elapsed();
        let d1 = consumer.delivered.load(Ordering::Relaxed);
        let events = d1.saturating_sub(self.delivered);
        let cpu = MachineCpu::over(self.cpu, machine_cpu_seconds(), events).unwrap_or_default();
        let between_us_per_event = self
            .between
            .and_then(|(pid, before)| us_per_event(tree_cpu_seconds(pid)? - before, events));
        let commits = self.commits.and_then(|(metrics, before)| {
            Commits::over(before, crate::commits::read(metrics)?, elapsed)
        });
        Window {
            delivered: (self.delivered, d1),
            elapsed,
            cpu,
            between_us_per_event,
            commits,
        }
    }
}

/// CPU microseconds per event; none when no event was delivered.
fn us_per_event(cpu_seconds: f64, events: u64) -> Option<f64> {
    (events > 0).then(|| cpu_seconds * 1e6 / events as f64)
}

/// A phase slice by slice.
#[derive(Clone, Debug, Default)]
pub struct Slices {
    /// Delivered/s in each slice, in order (the last may be shorter).
    pub rates: Vec<f64>,
    /// CPU µs per delivered event of the process between, in each slice (empty when the
    /// load goes straight through). nginx's, which keeps no state, shows what the host
    /// alone does to it; the operator's rising further would be work that grows.
    pub between_us: Vec<f64>,
}

/// Records the consumer's delivered/s, and the CPU per event of the process `between`,
/// per `slice` until `end`.
fn sample_slices(
    consumer: Arc<Consumer>,
    between: Option<u32>,
    start: Instant,
    duration: Duration,
    slice: Duration,
) -> tokio::task::JoinHandle<Slices> {
    tokio::spawn(async move {
        let mut slices = Slices::default();
        let cpu = || between.and_then(tree_cpu_seconds);
        let mut last = (start, consumer.delivered.load(Ordering::Relaxed), cpu());
        let end = start + duration;
        while last.0 < end {
            let next = (last.0 + slice).min(end);
            tokio::time::sleep_until(next.into()).await;
            let (d, used) = (consumer.delivered.load(Ordering::Relaxed), cpu());
            slices
                .rates
                .push((d - last.1) as f64 / (next - last.0).as_secs_f64());
            if let (Some(before), Some(after)) = (last.2, used)
                && let Some(us) = us_per_event(after - before, d - last.1)
            {
                slices.between_us.push(us);
            }
            last = (next, d, used);
        }
        slices
    })
}

/// How a phase is timed.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub duration: Duration,
    pub slice: Duration,
}

/// Closed loop: `concurrency` senders, each sends its next event when the last answered.
/// What every operator phase pair shares: the consumer, the closed loop's senders, the
/// warm-up and the phase timing.
struct Load<'a> {
    consumer: &'a Arc<Consumer>,
    concurrency: usize,
    warm_up: Timing,
    timing: Timing,
}

/// A short warm-up (so connection set-up and first allocations fall outside the window),
/// a closed loop at saturation named `names.0`, then an open loop named `names.1` at half
/// the rate it delivered; stops the plane.
async fn saturation_then_half(
    plane: ChildPlane,
    names: (&'static str, &'static str),
    target: &mut impl FnMut(String, Option<Between>) -> Arc<Target>,
    load: &Load<'_>,
) -> [Phase; 2] {
    let (consumer, concurrency) = (load.consumer, load.concurrency);
    closed_loop(
        "warm-up",
        target(plane.base.clone(), Some(plane.between())),
        consumer,
        concurrency,
        load.warm_up,
    )
    .await;
    let saturated = closed_loop(
        names.0,
        target(plane.base.clone(), Some(plane.between())),
        consumer,
        concurrency,
        load.timing,
    )
    .await;
    let half_rate = (saturated.delivered_per_s / 2.0).max(1.0);
    let half = open_loop(
        names.1,
        target(plane.base.clone(), Some(plane.between())),
        consumer,
        half_rate,
        load.timing,
    )
    .await;
    plane.stop().await;
    [saturated, half]
}

async fn closed_loop(
    name: &'static str,
    target: Arc<Target>,
    consumer: &Arc<Consumer>,
    concurrency: usize,
    timing: Timing,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    consumer.take_latencies();
    let start = WindowStart::now(consumer, target.between);
    let slices = sample_slices(
        consumer.clone(),
        target.between.map(|b| b.pid),
        start.at,
        timing.duration,
        timing.slice,
    );
    let senders: Vec<_> = (0..concurrency)
        .map(|_| {
            let (t, stop) = (target.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    t.fire(now_us()).await;
                }
            })
        })
        .collect();
    tokio::time::sleep_until((start.at + timing.duration).into()).await;
    stop.store(true, Ordering::Relaxed);
    let window = start.end(consumer);
    for s in senders {
        let _ = s.await;
    }
    let slices = slices.await.unwrap_or_default();
    finish(name, &target, consumer, window, None, slices).await
}

/// Most requests of the open loop in flight; past it an event counts as refused.
const OPEN_LOOP_IN_FLIGHT: u32 = 4096;

/// Open loop: event n is due at `start + n / rate` whatever the answers do, and carries
/// that scheduled time, so a stall delays the latencies of every event due during it
/// (no coordinated omission).
async fn open_loop(
    name: &'static str,
    target: Arc<Target>,
    consumer: &Arc<Consumer>,
    rate: f64,
    timing: Timing,
) -> Phase {
    consumer.take_latencies();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_IN_FLIGHT as usize));
    let window_start = WindowStart::now(consumer, target.between);
    let start = window_start.at;
    let start_us = now_us();
    let slices = sample_slices(
        consumer.clone(),
        target.between.map(|b| b.pid),
        start,
        timing.duration,
        timing.slice,
    );
    let total = (timing.duration.as_secs_f64() * rate) as u64;
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let scheduled = start_us + (sent as f64 * 1e6 / rate) as u64;
            sent += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                // Over the in-flight bound: the system is not keeping up; count it as failed.
                target.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let t = target.clone();
            tokio::spawn(async move {
                t.fire(scheduled).await;
                drop(permit);
            });
        }
    }
    let window = window_start.end(consumer);
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        in_flight.acquire_many(OPEN_LOOP_IN_FLIGHT),
    )
    .await;
    let slices = slices.await.unwrap_or_default();
    finish(name, &target, consumer, window, Some(rate), slices).await
}

/// Waits (bounded) for the accepted events to be delivered and sums up.
async fn finish(
    name: &'static str,
    target: &Target,
    consumer: &Consumer,
    window: Window,
    offered: Option<f64>,
    slices: Slices,
) -> Phase {
    let (d0, d1) = window.delivered;
    let accepted = target.accepted.swap(0, Ordering::Relaxed);
    let failed = target.failed.swap(0, Ordering::Relaxed);
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(60);
    while consumer.delivered.load(Ordering::Relaxed) - d0 < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delivered_total = consumer.delivered.load(Ordering::Relaxed) - d0;
    let secs = window.elapsed.as_secs_f64();
    let phase = Phase {
        name,
        seconds: secs,
        offered_per_s: offered,
        accepted,
        failed,
        accepted_per_s: accepted as f64 / secs,
        delivered_per_s: (d1 - d0) as f64 / secs,
        slices,
        delivered_total,
        drain_seconds: drain_start.elapsed().as_secs_f64(),
        latency: Latency::of(consumer.take_latencies()),
        answered: Latency::of(std::mem::take(&mut *target.answered.lock().unwrap())),
        cpu: window.cpu,
        between_us_per_event: window.between_us_per_event,
        commits: window.commits,
    };
    let commits = phase
        .commits
        .map_or(String::new(), |c| format!(", commits {c}"));
    eprintln!(
        "bench: {name}: accepted {:.0}/s, delivered {:.0}/s, slices {:.0?}, p99 {:.2} ms, CPU {:.0} % busy, {:.1} µs per event, between {:.1} µs ({:.1?} per slice){commits}",
        phase.accepted_per_s,
        phase.delivered_per_s,
        phase.slices.rates,
        phase.latency.p99_ms,
        phase.cpu.busy_percent(),
        phase.cpu.us_per_event,
        phase.between_us_per_event.unwrap_or(f64::NAN),
        phase.slices.between_us
    );
    phase
}

/// nginx as a keep-alive reverse proxy to the consumer, in a temp prefix, killed on drop.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// Where Debian's package puts nginx (`hack/setup.sh` installs it), or `$NGINX`.
fn nginx_bin() -> Option<std::path::PathBuf> {
    let candidates = std::env::var_os("NGINX")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(["/usr/sbin/nginx", "/usr/local/sbin/nginx"].map(Into::into));
    candidates.into_iter().find(|p| p.is_file())
}

/// `nginx -v` (it prints to stderr), or why there is none.
pub fn nginx_version() -> String {
    nginx_bin()
        .and_then(|bin| std::process::Command::new(bin).arg("-v").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_else(|| "nginx not found (run hack/setup.sh)".into())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (bounded) until something listens on the loopback `port`.
async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not listen in 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

impl Nginx {
    async fn start(upstream: SocketAddr) -> anyhow::Result<Nginx> {
        let bin = nginx_bin().ok_or_else(|| {
            anyhow::anyhow!(
                "nginx not found in /usr/sbin or $NGINX: the nginx baseline needs Debian's nginx, \
                 which hack/setup.sh installs"
            )
        })?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let d = dir.path().display();
        // One worker per core, keep-alive on both sides, nothing logged per request.
        let conf = format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             upstream sink {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
             proxy_pass http://sink;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = std::process::Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let nginx = Nginx {
            child,
            port,
            _dir: dir,
        };
        wait_listening(port, "nginx").await?;
        Ok(nginx)
    }

    /// The master (its workers are its children); no queue to read commits from.
    fn between(&self) -> Between {
        Between {
            pid: self.child.id(),
            metrics: None,
        }
    }
}

impl Drop for Nginx {
    /// SIGTERM: the master stops its workers (a SIGKILL would orphan them), then exits.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nats-server's version, or why there is none.
pub fn nats_version() -> String {
    let bin = nats::nats_server_bin();
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "nats-server not found (run hack/setup.sh)".into())
}

/// A data plane on a queue, with its ingress served and its delivery running (inside the
/// child process of [`ChildPlane`]).
struct Plane {
    base: String,
    metrics: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    delivery: tokio::task::JoinHandle<()>,
}

/// The hidden flag that makes the bench binary the data plane's own process:
/// `--plane-child CONSUMER_ADDR MAX_IN_FLIGHT QUEUE`, QUEUE a redb file path or a
/// `nats://` URL. It prints its ingress base URL and its ops server's address on one
/// line, serves until its stdin closes, then stops its delivery and exits.
pub const PLANE_CHILD_FLAG: &str = "--plane-child";

/// The data plane in a process of its own, as the operator runs in its pod and nginx in
/// its workers: the load generator and the consumer do not share its threads.
struct ChildPlane {
    base: String,
    /// Its ops server (`/metrics`).
    metrics: SocketAddr,
    child: std::process::Child,
}

impl ChildPlane {
    fn start(consumer: SocketAddr, max_in_flight: u32, queue: &str) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        // `BENCH_PLANE_WRAPPER="valgrind --tool=callgrind"` and the like run the data
        // plane under a profiler: the generator and the consumer stay at full speed.
        let wrapper = std::env::var("BENCH_PLANE_WRAPPER").unwrap_or_default();
        let mut command = wrapper.split_whitespace();
        let mut launcher = match command.next() {
            Some(program) => {
                let mut c = std::process::Command::new(program);
                c.args(command).arg(std::env::current_exe()?);
                c
            }
            None => std::process::Command::new(std::env::current_exe()?),
        };
        let mut child = launcher
            .args([
                PLANE_CHILD_FLAG,
                &consumer.to_string(),
                &max_in_flight.to_string(),
                queue,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let started = line
            .split_once(' ')
            .filter(|(base, _)| base.starts_with("http://"))
            .and_then(|(base, metrics)| Some((base.to_string(), metrics.trim().parse().ok()?)));
        let Some((base, metrics)) = started else {
            anyhow::bail!("the data plane's process did not start (it printed {line:?})");
        };
        Ok(ChildPlane {
            base,
            metrics,
            child,
        })
    }

    fn between(&self) -> Between {
        Between {
            pid: self.child.id(),
            metrics: Some(self.metrics),
        }
    }

    /// Closes the child's stdin (its signal to stop) and waits for it, bounded; past
    /// that, the drop kills it.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildPlane {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's side of [`ChildPlane`]: a runtime of its own, the plane, its base URL on
/// stdout, a stop when stdin closes.
pub fn plane_child(args: &[String]) -> anyhow::Result<()> {
    let [consumer, max_in_flight, queue] = args else {
        anyhow::bail!("{PLANE_CHILD_FLAG} CONSUMER_ADDR MAX_IN_FLIGHT QUEUE");
    };
    let consumer: SocketAddr = consumer.parse()?;
    let max_in_flight: u32 = max_in_flight.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        webhook_operator::providers::install_crypto_provider();
        let dp = if queue.starts_with("nats://") {
            // `with_queue` opens no file: the path is never used.
            let config = plane_config(consumer, std::path::PathBuf::new());
            let js = JetStreamQueue::connect(JetStreamOptions {
                url: queue.clone(),
                ..Default::default()
            })
            .await?;
            DataPlane::with_queue(config, Arc::new(ProviderParser), Arc::new(js))?
        } else {
            let config = plane_config(consumer, queue.into());
            DataPlane::open(config, Arc::new(ProviderParser)).await?
        };
        let plane = start_plane(dp, max_in_flight).await?;
        println!("{} {}", plane.base, plane.metrics);
        // Stdin closes when the parent is done with this plane (or dies).
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await?;
        plane.stop().await;
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn plane_config(consumer: SocketAddr, queue_path: std::path::PathBuf) -> DataPlaneConfig {
    DataPlaneConfig {
        queue_path,
        resolve_overrides: vec![("consumer.bench.svc:8080".into(), consumer)],
        address_policy: webhook_operator::delivery::AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// One endpoint to the consumer, an Atlas and a signed Smallest subscription.
async fn start_plane(dp: Arc<DataPlane>, max_in_flight: u32) -> anyhow::Result<Plane> {
    let key = EndpointKey::new("bench", "orders");
    dp.upsert_endpoint(EndpointConfig {
        key: key.clone(),
        token: "benchtoken".into(),
        destination: Destination::Service {
            name: "consumer".into(),
            namespace: "bench".into(),
            port: 8080,
            path: "/in".into(),
        },
        policy: Policy {
            max_in_flight,
            ..Policy::default()
        },
        signing_secrets: vec![SigningSecret::parse(b"bench-delivery-signing-secret")?],
        headers: vec![],
        max_queued_events: None,
        max_queued_bytes: None,
        ingress_rate_limit: None,
        event_types: vec![],
        format: Default::default(),
        filter: None,
        dedupe: None,
        tls: None,
    })?;
    dp.upsert_subscription(SubscriptionRoute {
        endpoint: key.clone(),
        name: "atlas".into(),
        provider: Provider::Atlas,
        keys: VerificationKeys::default(),
    });
    dp.upsert_subscription(SubscriptionRoute {
        endpoint: key,
        name: "smallest".into(),
        provider: Provider::Smallest,
        keys: VerificationKeys {
            secrets: vec![SMALLEST_SECRET.to_vec()],
            header_name: None,
            ..Default::default()
        },
    });
    let ingress = serve(dp.ingress_router()).await?;
    let metrics = serve(dp.ops_router()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = dp.start_delivery(async move {
        let _ = stopped.await;
    });
    Ok(Plane {
        base: format!("http://{ingress}/hooks/benchtoken"),
        metrics,
        stop,
        delivery,
    })
}

impl Plane {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), self.delivery).await;
    }
}

pub struct DeliveryResults {
    pub phases: Vec<Phase>,
    pub max_in_flight: u32,
    pub concurrency: usize,
    /// Why the nginx phase did not run, when it did not.
    pub nginx_missing: Option<String>,
}

impl DeliveryResults {
    pub fn phase(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }
}

pub const OPERATOR: &str = "operator (redb, durable), closed loop";
pub const NGINX: &str = "nginx keep-alive proxy, closed loop";
pub const DIRECT: &str = "direct to the consumer, closed loop";
/// nginx at the operator's half-load rate: the tail any proxy gets from this host, the
/// generator and the consumer at that rate.
pub const NGINX_HALF: &str = "nginx, the operator's half load, open loop";
pub const HALF: &str = "operator (redb), half load, open loop";
pub const JS: &str = "operator (JetStream), closed loop";
pub const JS_HALF: &str = "operator (JetStream), half load, open loop";

pub async fn run(concurrency: usize, timing: Timing) -> anyhow::Result<DeliveryResults> {
    now_us();
    webhook_operator::providers::install_crypto_provider();
    let consumer = Arc::new(Consumer::default());
    let consumer_addr = start_consumer(consumer.clone()).await?;
    // The in-flight cap matches the offered concurrency (the API default is 16).
    let max_in_flight = concurrency as u32;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .build()?;
    let run_id = rand::random::<u32>() as u64 * 100;
    let mut runs = 0u64;
    let mut target = |base: String, between: Option<Between>| {
        runs += 1;
        Arc::new(Target {
            client: client.clone(),
            shots: Shots {
                base,
                run: run_id + runs,
            },
            between,
            next: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            answered: Mutex::default(),
        })
    };
    let warm_up = Timing {
        duration: Duration::from_millis(500),
        slice: Duration::from_millis(500),
    };
    let mut phases = Vec::new();

    // The embedded queue: saturation, then half its delivered rate, open loop.
    let dir = tempfile::tempdir()?;
    let plane = ChildPlane::start(
        consumer_addr,
        max_in_flight,
        &dir.path().join("queue.redb").to_string_lossy(),
    )?;
    eprintln!("bench: delivery path, {concurrency} senders, {timing:?} per phase");
    let load = Load {
        consumer: &consumer,
        concurrency,
        warm_up,
        timing,
    };
    phases.extend(saturation_then_half(plane, (OPERATOR, HALF), &mut target, &load).await);
    anyhow::ensure!(
        phases
            .iter()
            .any(|p| p.name == OPERATOR && p.commits.is_some()),
        "the embedded queue's data plane exported no commits over its closed loop \
         (webhook_operator_queue_commit_* on its /metrics)"
    );

    // The baselines: nginx in front of the consumer, and the consumer alone.
    let nginx_missing = match Nginx::start(consumer_addr).await {
        Ok(nginx) => {
            let base = format!("http://127.0.0.1:{}", nginx.port);
            closed_loop(
                "warm-up",
                target(base.clone(), Some(nginx.between())),
                &consumer,
                concurrency,
                warm_up,
            )
            .await;
            phases.push(
                closed_loop(
                    NGINX,
                    target(base.clone(), Some(nginx.between())),
                    &consumer,
                    concurrency,
                    timing,
                )
                .await,
            );
            let operator_half = phases
                .iter()
                .find(|p| p.name == HALF)
                .and_then(|p| p.offered_per_s);
            if let Some(rate) = operator_half {
                let half = target(base, Some(nginx.between()));
                phases.push(open_loop(NGINX_HALF, half, &consumer, rate, timing).await);
            }
            None
        }
        Err(e) => {
            eprintln!("bench: NO NGINX BASELINE: {e:#}");
            Some(format!("{e:#}"))
        }
    };
    let direct = format!("http://{consumer_addr}");
    phases.push(closed_loop(DIRECT, target(direct, None), &consumer, concurrency, timing).await);

    // The same phases with the queue on a local nats-server with JetStream.
    let server = nats::NatsServer::start();
    let plane = ChildPlane::start(consumer_addr, max_in_flight, &server.url())?;
    phases.extend(saturation_then_half(plane, (JS, JS_HALF), &mut target, &load).await);

    Ok(DeliveryResults {
        phases,
        max_in_flight,
        concurrency,
        nginx_missing,
    })
}

impl DeliveryResults {
    /// The generated block's delivery section: the phases, the versions, the targets.
    pub fn report(&self, s: &mut String) {
        use std::fmt::Write as _;
        let secs = self.phases.first().map_or(0.0, |p| p.seconds);
        let slice = self
            .phases
            .first()
            .map_or(0.0, |p| p.seconds / p.slices.rates.len().max(1) as f64);
        let _ = writeln!(
            s,
            "### Delivery path ({} senders, {secs:.1} s per phase, 1 KiB events, Atlas and signed Smallest in turn, `maxInFlight` {})\n",
            self.concurrency, self.max_in_flight
        );
        let _ = writeln!(
            s,
            "- nginx: {}\n- nats-server: {}\n",
            nginx_version(),
            nats_version()
        );
        let _ = writeln!(
            s,
            "| phase | offered/s | accepted/s | delivered/s | delivered/s per {slice:.0} s slice | refused | p50 ms | p99 ms | p99.9 ms | max ms | answered p99 ms | drain s | machine CPU busy | machine CPU µs per event | between: CPU µs per event |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for p in &self.phases {
            let slices: Vec<String> = p.slices.rates.iter().map(|r| format!("{r:.0}")).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} % | {:.1} | {} |",
                p.name,
                p.offered_per_s
                    .map_or("max".to_string(), |r| format!("{r:.0}")),
                p.accepted_per_s,
                p.delivered_per_s,
                slices.join(" "),
                p.failed,
                p.latency.p50_ms,
                p.latency.p99_ms,
                p.latency.p999_ms,
                p.latency.max_ms,
                p.answered.p99_ms,
                p.drain_seconds,
                p.cpu.busy_percent(),
                p.cpu.us_per_event,
                p.between_us_per_event
                    .map_or("–".to_string(), |us| format!("{us:.1}")),
            );
        }
        let all: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {} of {}", p.name, p.delivered_total, p.accepted))
            .collect();
        let _ = writeln!(
            s,
            "\nDelivered in all (drain included) of accepted: {}.\n",
            all.join("; ")
        );
        if let Some(why) = &self.nginx_missing {
            let _ = writeln!(s, "**No nginx baseline**: {why}\n");
        }
        let rate = |name| self.phase(name).map_or(0.0, |p| p.delivered_per_s);
        let nginx = rate(NGINX);
        let _ = writeln!(s, "| target | measured | |\n|---|---|---|");
        if let Some(o) = self.phase(OPERATOR) {
            let ratio = o.delivered_per_s / nginx.max(1.0);
            let _ = writeln!(
                s,
                "| operator sustained ≥ 0.5 of nginx | {ratio:.3} ({:.0} / {nginx:.0}) | {} |",
                o.delivered_per_s,
                mark(nginx > 0.0 && ratio >= 0.5)
            );
            let (first, last) = (
                o.slices.rates.first().copied().unwrap_or(0.0),
                o.slices.rates.last().copied().unwrap_or(0.0),
            );
            let _ = writeln!(
                s,
                "| no decay over the phase (last slice ≥ 0.9 of the first) | {:.3} ({last:.0} / {first:.0}) | {} |",
                last / first.max(1.0),
                mark(last >= 0.9 * first)
            );
        }
        if let Some(h) = self.phase(HALF) {
            let _ = writeln!(
                s,
                "| p99 ≤ 10 ms at half load, from the scheduled send time | {:.2} ms (max {:.2} ms) | {} |",
                h.latency.p99_ms,
                h.latency.max_ms,
                mark(h.latency.count > 0 && h.latency.p99_ms <= 10.0)
            );
        }
        if let Some(j) = self.phase(JS) {
            let share = j.delivered_per_s / j.accepted_per_s.max(1.0);
            let _ = writeln!(
                s,
                "| JetStream delivered ≥ 0.9 of accepted at saturation | {share:.3} ({:.0} / {:.0}) | {} |",
                j.delivered_per_s,
                j.accepted_per_s,
                mark(share >= 0.9)
            );
            let ratio = j.delivered_per_s / nginx.max(1.0);
            let _ = writeln!(
                s,
                "| JetStream delivered ≥ 0.3 of nginx | {ratio:.3} ({:.0} / {nginx:.0}) | {} |",
                j.delivered_per_s,
                mark(nginx > 0.0 && ratio >= 0.3)
            );
        }
        if let Some(h) = self.phase(JS_HALF) {
            let _ = writeln!(
                s,
                "| JetStream slowest event at half load ≤ 1 s | {:.2} ms | {} |",
                h.latency.max_ms,
                mark(h.latency.count > 0 && h.latency.max_ms <= 1000.0)
            );
        }
        s.push('\n');
        self.report_tail(s);
        self.report_cpu(s);
        self.report_commits(s);
    }

    /// The embedded queue's group commits in its two phases: what share of the closed
    /// loop's round the writer takes.
    fn report_commits(&self, s: &mut String) {
        use std::fmt::Write as _;
        let described: Vec<String> = [(OPERATOR, "in the closed loop"), (HALF, "at half load")]
            .into_iter()
            .filter_map(|(name, label)| {
                let c = self.phase(name)?.commits?;
                Some(format!("{label} {c}"))
            })
            .collect();
        if !described.is_empty() {
            let _ = writeln!(
                s,
                "The embedded queue's group commits (its `webhook_operator_queue_commit_*` \
                 histograms, read at the window's edges): {}. An event is two operations, its \
                 enqueue and its ack; each closed-loop sender waits for the commit under way and \
                 then its own before it sends again.\n",
                described.join("; ")
            );
        }
    }

    /// The half-load tail beside nginx's at the same offered rate, in the same run.
    fn report_tail(&self, s: &mut String) {
        use std::fmt::Write as _;
        let (Some(o), Some(n)) = (self.phase(HALF), self.phase(NGINX_HALF)) else {
            return;
        };
        let _ = writeln!(
            s,
            "The half-load tail beside nginx's at the same offered rate ({:.0}/s, open loop): \
             p99 {:.2} ms for the operator and {:.2} ms through nginx (answered p99 {:.2} and \
             {:.2} ms, max {:.2} and {:.2} ms). nginx's figure is what the host, the generator \
             and the consumer give any proxy at this rate; the rest of the operator's is its own.\n",
            o.offered_per_s.unwrap_or(0.0),
            o.latency.p99_ms,
            n.latency.p99_ms,
            o.answered.p99_ms,
            n.answered.p99_ms,
            o.latency.max_ms,
            n.latency.max_ms,
        );
    }

    /// What bounds the ratio to nginx: the machine's CPU per event in the closed loops.
    fn report_cpu(&self, s: &mut String) {
        use std::fmt::Write as _;
        let (Some(o), Some(n), Some(d)) =
            (self.phase(OPERATOR), self.phase(NGINX), self.phase(DIRECT))
        else {
            return;
        };
        let (op, nginx, direct) = (o.cpu.us_per_event, n.cpu.us_per_event, d.cpu.us_per_event);
        let (op_added, nginx_added) = (op - direct, nginx - direct);
        let _ = writeln!(
            s,
            "CPU per delivered event, the whole machine (generator and consumer in every phase): \
             operator {:.1} µs at {:.0} % busy, nginx {:.1} µs at {:.0} % busy, direct {:.1} µs. \
             Beyond the direct phase the operator takes {:.1} µs per event and nginx {:.1} µs \
             ({:.1} times). At the same busy CPU, 0.5 of nginx needs the operator at {:.1} µs \
             or less for the whole machine.\n",
            op,
            o.cpu.busy_percent(),
            nginx,
            n.cpu.busy_percent(),
            direct,
            op_added,
            nginx_added,
            op_added / nginx_added,
            2.0 * nginx,
        );
        if let (Some(op), Some(nginx)) = (o.between_us_per_event, n.between_us_per_event) {
            let _ = writeln!(
                s,
                "The processes between, on their own (the data plane runs in a process of its \
                 own, as nginx runs in its master and workers): the operator's used {op:.1} µs of \
                 CPU per event, nginx's {nginx:.1} µs ({:.1} times).\n",
                op / nginx
            );
        }
        let per_slice = |p: &Phase| {
            let us: Vec<String> = p
                .slices
                .between_us
                .iter()
                .map(|u| format!("{u:.1}"))
                .collect();
            us.join(" ")
        };
        if !o.slices.between_us.is_empty() && !n.slices.between_us.is_empty() {
            let _ = writeln!(
                s,
                "The same per slice, in µs per event: the operator's process {}; nginx's {}. \
                 nginx keeps no state from one request to the next, so its figures show what \
                 the host alone does to the CPU an event costs; operator figures that rise \
                 further than nginx's over a phase are work per event that grows.\n",
                per_slice(o),
                per_slice(n)
            );
        }
    }
}
