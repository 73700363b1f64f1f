//! The embedded queue alone: 64 tasks enqueue one 1 KiB event at a time, each with a
//! random dedupe key (as provider ids are), while one loop leases and acks them. Reports
//! the events through the queue, the bytes it wrote per event and the slowest enqueue in
//! each slice, so that anything growing with the keys it remembers shows (a stall of the
//! writer holds every enqueue), and the time to reopen the file with all of them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::mark;
use webhook_operator::queue::{EndpointKey, NewEvent, Queue, RedbQueue, RedbQueueOptions};

const ENQUEUERS: usize = 64;
const EVENT_BYTES: usize = 1024;

pub struct QueueResults {
    seconds: u64,
    slice: Duration,
    /// Events acked per second, KiB written per acked event and the slowest enqueue (ms)
    /// of each slice.
    slices: Vec<(f64, f64, f64)>,
    keys: u64,
    reopen: Duration,
}

/// This process's `write_bytes` (what it caused to be written to storage).
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn event(endpoint: &EndpointKey, payload: &bytes::Bytes) -> NewEvent {
    NewEvent {
        endpoint: endpoint.clone(),
        subscription: "bench".into(),
        event_type: "call_completed".into(),
        dedupe_key: format!("{:032x}", rand::random::<u128>()),
        dedupe_window: None,
        payload: payload.clone(),
        received: SystemTime::now(),
        traceparent: None,
        headers: String::new(),
    }
}

pub async fn run(duration: Duration, slice: Duration) -> anyhow::Result<QueueResults> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("queue.redb");
    let queue = Arc::new(RedbQueue::open(&path, RedbQueueOptions::default())?);
    let endpoint = EndpointKey::new("bench", "queue");
    let payload = bytes::Bytes::from(vec![b'x'; EVENT_BYTES]);
    let acked = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..ENQUEUERS {
        let (queue, endpoint, payload) = (queue.clone(), endpoint.clone(), payload.clone());
        let slowest_us = slowest_us.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let started = Instant::now();
                queue.enqueue(vec![event(&endpoint, &payload)]).await?;
                slowest_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    {
        let (queue, endpoint, acked) = (queue.clone(), endpoint.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let leased = queue.lease(&endpoint, 256, SystemTime::now()).await?;
                if leased.is_empty() {
                    queue.wait_due(&endpoint, Duration::from_millis(5)).await;
                    continue;
                }
                let acks = leased.iter().map(|e| queue.ack(e));
                for r in futures::future::join_all(acks).await {
                    r?;
                }
                acked.fetch_add(leased.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let mut slices = Vec::new();
    let (mut last_acked, mut last_written) = (0, written_bytes());
    while Instant::now() + slice <= stop + Duration::from_millis(100) {
        tokio::time::sleep(slice).await;
        let (now_acked, now_written) = (acked.load(Ordering::Relaxed), written_bytes());
        let n = now_acked - last_acked;
        slices.push((
            n as f64 / slice.as_secs_f64(),
            (now_written - last_written) as f64 / 1024.0 / n.max(1) as f64,
            slowest_us.swap(0, Ordering::Relaxed) as f64 / 1000.0,
        ));
        (last_acked, last_written) = (now_acked, now_written);
    }
    for t in tasks {
        t.await??;
    }
    drop(queue);
    let started = Instant::now();
    let reopened = RedbQueue::open(&path, RedbQueueOptions::default())?;
    let reopen = started.elapsed();
    // Read after the reopen: at the key bound the writer may still expire some before
    // it stops.
    let keys = reopened.dedupe_stats().map_or(0, |(keys, _)| keys);
    anyhow::ensure!(keys > 0, "the reopened queue remembers no key");
    Ok(QueueResults {
        seconds: duration.as_secs(),
        slice,
        slices,
        keys,
        reopen,
    })
}

impl QueueResults {
    pub fn report(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "### Embedded queue alone ({ENQUEUERS} enqueuers, random dedupe keys, 1 KiB events, {} s, {} s slices)\n",
            self.seconds,
            self.slice.as_secs()
        );
        let _ = writeln!(
            s,
            "| slice | events/s | KiB written per event | slowest enqueue ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|");
        for (i, (rate, kib, slowest)) in self.slices.iter().enumerate() {
            let _ = writeln!(s, "| {} | {rate:.0} | {kib:.1} | {slowest:.1} |", i + 1);
        }
        let _ = writeln!(
            s,
            "\nReopened with the {} keys it remembers in {:.2} s.\n",
            self.keys,
            self.reopen.as_secs_f64()
        );
        let (Some(first), Some(last)) = (self.slices.first(), self.slices.last()) else {
            return;
        };
        let _ = writeln!(s, "| target | measured | |\n|---|---|---|");
        let growth = last.1 / first.1.max(f64::MIN_POSITIVE);
        let _ = writeln!(
            s,
            "| bytes written per event do not grow with the keys remembered (last slice ≤ 1.1 of the first) | {growth:.2} ({:.1} / {:.1} KiB) | {} |",
            last.1,
            first.1,
            mark(growth <= 1.1)
        );
        let _ = writeln!(s);
    }
}
