//! Restart with a backlog (issue 15): how long the embedded queue takes to serve again, and
//! how much memory it holds, against the number of events stored when it stops.
//!
//! The parent fills a queue file through the queue API (1 KiB payloads, large batches, one
//! endpoint, a tenth of them dead-lettered like a long outage leaves them), closes it, then
//! starts a CHILD process (this binary again, with [`CHILD_FLAG`]) that opens the file the
//! way the data plane does and leases the first event. The child reports the time from its
//! start to that first lease and its peak RSS (VmHWM), so the figures are the store's,
//! not the generator's.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::proc_stats::vm_hwm_mib;
use bytes::Bytes;
use webhook_operator::queue::{EndpointKey, NewEvent, Queue, RedbQueue, RedbQueueOptions};

/// The hidden flag that makes the bench binary the child that reopens a file.
pub const CHILD_FLAG: &str = "--backlog-child";

const BATCH: usize = 4096;
const PAYLOAD: usize = 1024;

pub struct BacklogRow {
    pub events: u64,
    pub file_mib: f64,
    pub fill_seconds: f64,
    /// Child start to the first lease answered.
    pub serving_seconds: f64,
    pub rss_peak_mib: f64,
    /// What the reopened queue counted: pending + dead letters.
    pub counted: u64,
}

pub struct BacklogResults {
    pub rows: Vec<BacklogRow>,
}

fn endpoint() -> EndpointKey {
    EndpointKey::new("bench", "backlog")
}

/// The data plane's queue options (see `DataPlane::open`): the defaults.
fn options() -> RedbQueueOptions {
    RedbQueueOptions::default()
}

async fn fill(path: &Path, n: u64) -> anyhow::Result<()> {
    let q = RedbQueue::open(path, options())?;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let key = endpoint();
    let received = SystemTime::now();
    let mut written = 0u64;
    while written < n {
        let take = (n - written).min(BATCH as u64);
        let batch = (0..take)
            .map(|i| NewEvent {
                endpoint: key.clone(),
                subscription: "sub".into(),
                event_type: "call_completed".into(),
                dedupe_key: format!("evt-{}", written + i),
                dedupe_window: None,
                payload: payload.clone(),
                received,
                traceparent: None,
                headers: String::new(),
            })
            .collect();
        q.enqueue(batch).await?;
        written += take;
    }
    // A tenth dead-lettered: dead letters are history the restart must not hold either.
    let dead = n / 10;
    let far = SystemTime::now() + Duration::from_secs(3600);
    let mut done = 0u64;
    while done < dead {
        let leased = q
            .lease(&key, (dead - done).min(BATCH as u64) as usize, far)
            .await?;
        if leased.is_empty() {
            break;
        }
        let acks = leased.iter().map(|e| q.dead_letter(e, "bench: dead"));
        for r in futures::future::join_all(acks).await {
            r?;
        }
        done += leased.len() as u64;
    }
    q.close();
    Ok(())
}

/// The child: opens `path`, leases one event, prints `serving_seconds counted peak_rss_mib`
/// (its own VmHWM as it finishes: a quick child may exit before the parent samples it).
pub fn child(path: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let path = path.to_owned();
        let q = tokio::task::spawn_blocking(move || RedbQueue::open(path, options())).await??;
        let first = q.lease(&endpoint(), 1, SystemTime::now()).await?;
        anyhow::ensure!(first.len() == 1, "the reopened queue leased nothing");
        let serving = start.elapsed().as_secs_f64();
        let d = q.depth();
        let counted = d.pending + d.leased + d.dead_lettered;
        let hwm = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| vm_hwm_mib(&s))
            .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))?;
        println!("{serving} {counted} {hwm}");
        anyhow::Ok(())
    })
}

/// Runs the child on `path` and reads its peak RSS just before it exits.
fn reopen(path: &Path) -> anyhow::Result<(f64, u64, f64)> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut hwm = 0.0f64;
    // VmHWM only grows: the last reading before the child exits is its peak.
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(v) = vm_hwm_mib(&s)
        {
            hwm = hwm.max(v);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the backlog child did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "the backlog child failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let serving: f64 = it.next().unwrap_or_default().parse()?;
    let counted: u64 = it.next().unwrap_or_default().parse()?;
    let own_hwm: f64 = it.next().unwrap_or_default().parse()?;
    Ok((serving, counted, hwm.max(own_hwm)))
}

pub async fn run(sizes: &[u64]) -> anyhow::Result<BacklogResults> {
    let mut rows = Vec::new();
    for &n in sizes {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("queue.redb");
        let t = Instant::now();
        fill(&path, n).await?;
        let fill_seconds = t.elapsed().as_secs_f64();
        let file_mib = std::fs::metadata(&path)?.len() as f64 / 1024.0 / 1024.0;
        let p = path.clone();
        let (serving_seconds, counted, rss_peak_mib) =
            tokio::task::spawn_blocking(move || reopen(&p)).await??;
        eprintln!(
            "bench: backlog {n}: serving after {serving_seconds:.2} s, peak RSS {rss_peak_mib:.1} MiB"
        );
        rows.push(BacklogRow {
            events: n,
            file_mib,
            fill_seconds,
            serving_seconds,
            rss_peak_mib,
            counted,
        });
    }
    Ok(BacklogResults { rows })
}
