//! Acknowledged means durable, even when the process dies mid-commit: a child process
//! enqueues into the embedded queue from several tasks and prints each acknowledged id;
//! the test SIGKILLs it (no destructor, no flush) and reopens the file, where every
//! acknowledged id must be.
//!
//! The child is this same binary started with [`CHILD_ENV`] naming the file, so the test
//! needs no helper program (`harness = false`: `main` is the test).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use webhook_operator::queue::{
    EndpointKey, EnqueueOutcome, NewEvent, Queue, RedbQueue, RedbQueueOptions,
};

const CHILD_ENV: &str = "WEBHOOK_OPERATOR_QUEUE_CRASH_CHILD";

fn endpoint() -> EndpointKey {
    EndpointKey::new("ns", "crash")
}

fn open(path: &std::path::Path) -> RedbQueue {
    RedbQueue::open(path, RedbQueueOptions::default()).expect("open the queue file")
}

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(path) => child_writer(&path),
        Err(_) => {
            acknowledged_events_survive_sigkill();
            println!("test acknowledged_events_survive_sigkill ... ok");
        }
    }
}

/// Enqueues from 8 tasks and prints `ACK <id>` once each enqueue returns, for at most
/// 30 s (the parent kills it long before).
fn child_writer(path: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let q = Arc::new(open(std::path::Path::new(path)));
        let deadline = Instant::now() + Duration::from_secs(30);
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let q = q.clone();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        i += 1;
                        let batch = (0..(1 + i % 3))
                            .map(|j| NewEvent {
                                endpoint: endpoint(),
                                subscription: "sub".into(),
                                event_type: "call_completed".into(),
                                dedupe_key: format!("{t}-{i}-{j}"),
                                dedupe_window: None,
                                payload: Bytes::from(format!("{{\"k\":\"{t}-{i}-{j}\"}}")),
                                received: SystemTime::now(),
                                traceparent: None,
                                headers: String::new(),
                            })
                            .collect();
                        for o in q.enqueue(batch).await.expect("enqueue") {
                            match o {
                                EnqueueOutcome::Accepted { id } => println!("ACK {id}"),
                                EnqueueOutcome::Duplicate => panic!("unexpected duplicate"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer task");
        }
    });
}

fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("crash.redb");
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("ACK ") {
                let _ = tx.send(id.to_owned());
            }
        }
    });
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.len() < 2000 && Instant::now() < deadline {
        if let Ok(id) = rx.recv_timeout(Duration::from_millis(100)) {
            acked.push(id);
        }
    }
    child.kill().expect("SIGKILL"); // no destructor, no flush, mid-commit
    child.wait().expect("reap the child");
    reader.join().expect("reader");
    acked.extend(rx.try_iter());
    assert!(
        acked.len() >= 100,
        "child acknowledged only {}",
        acked.len()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stored: HashSet<String> = rt.block_on(async {
        let q = open(&path);
        let far_future = SystemTime::now() + Duration::from_secs(3600);
        q.lease(&endpoint(), usize::MAX, far_future)
            .await
            .expect("lease")
            .into_iter()
            .map(|e| e.id)
            .collect()
    });
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(3)]
    );
}
