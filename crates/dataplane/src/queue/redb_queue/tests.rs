use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::*;

fn ep(name: &str) -> EndpointKey {
    EndpointKey::new("ns", name)
}

fn event(endpoint: &EndpointKey, dedupe: &str, received: SystemTime) -> NewEvent {
    NewEvent {
        endpoint: endpoint.clone(),
        subscription: "sub".into(),
        event_type: "call_completed".into(),
        dedupe_key: dedupe.into(),
        dedupe_window: None,
        payload: Bytes::from(format!("{{\"k\":\"{dedupe}\"}}")),
        received,
        traceparent: None,
        headers: String::new(),
    }
}

fn accepted_id(o: &EnqueueOutcome) -> String {
    match o {
        EnqueueOutcome::Accepted { id } => id.clone(),
        EnqueueOutcome::Duplicate => panic!("unexpected duplicate"),
    }
}

fn open(path: &std::path::Path) -> RedbQueue {
    RedbQueue::open(path, RedbQueueOptions::default()).unwrap()
}

fn far_future() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

#[tokio::test]
async fn events_survive_reopen_and_leases_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = ep("a");
    let now = SystemTime::now();
    let ids: Vec<String> = {
        let q = open(&path);
        let out = q
            .enqueue((0..5).map(|i| event(&a, &format!("k{i}"), now)).collect())
            .await
            .unwrap();
        // Lease two and never settle them: a crash mid-delivery.
        assert_eq!(q.lease(&a, 2, far_future()).await.unwrap().len(), 2);
        assert_eq!(q.depth().leased, 2);
        out.iter().map(accepted_id).collect()
    };
    let q = open(&path);
    assert_eq!(q.depth().pending, 5);
    let leased = q.lease(&a, 100, far_future()).await.unwrap();
    let got: Vec<String> = leased.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, ids);
    assert_eq!(leased[3].payload, Bytes::from_static(b"{\"k\":\"k3\"}"));
    assert_eq!(leased[3].event_type, "call_completed");

    // Ids keep growing after a reopen even when everything was acked: a consumer that
    // dedupes on webhook-id must never see an id reused.
    for e in &leased {
        q.ack(e).await.unwrap();
    }
    drop(q);
    let q = open(&path);
    assert_eq!(q.depth(), QueueDepth::default());
    let next = q.enqueue(vec![event(&a, "new", now)]).await.unwrap();
    assert!(!ids.contains(&accepted_id(&next[0])));
}

#[tokio::test]
async fn duplicates_are_dropped_within_the_window_per_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RedbQueueOptions {
        dedupe_window: Duration::from_secs(60),
        ..Default::default()
    };
    let q = RedbQueue::open(dir.path().join("q.redb"), opts).unwrap();
    let (a, b) = (ep("a"), ep("b"));
    let t0 = SystemTime::now();
    let out = q
        .enqueue(vec![
            event(&a, "x", t0),
            event(&a, "x", t0), // same batch
            event(&b, "x", t0), // other endpoint
            event(&a, "", t0),  // no key: never a duplicate
            event(&a, "", t0),
        ])
        .await
        .unwrap();
    let dup: Vec<bool> = out
        .iter()
        .map(|o| *o == EnqueueOutcome::Duplicate)
        .collect();
    assert_eq!(dup, [false, true, false, false, false]);
    let again = q
        .enqueue(vec![event(&a, "x", t0 + Duration::from_secs(59))])
        .await
        .unwrap();
    assert_eq!(again, [EnqueueOutcome::Duplicate]);
    let later = q
        .enqueue(vec![event(&a, "x", t0 + Duration::from_secs(61))])
        .await
        .unwrap();
    assert!(matches!(later[0], EnqueueOutcome::Accepted { .. }));
    assert_eq!(q.endpoint_depth(&a).pending, 4);
}

/// `spec.dedupe.window`: an event's own window shortens the queue's, never lengthens it.
#[tokio::test]
async fn an_events_own_window_shortens_the_queues() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RedbQueueOptions {
        dedupe_window: Duration::from_secs(60),
        ..Default::default()
    };
    let q = RedbQueue::open(dir.path().join("q.redb"), opts).unwrap();
    let a = ep("a");
    let t0 = SystemTime::now();
    let with_window = |key: &str, at: u64, window: u64| NewEvent {
        dedupe_window: Some(Duration::from_secs(window)),
        ..event(&a, key, t0 + Duration::from_secs(at))
    };
    let mut outcomes = Vec::new();
    for ev in [
        with_window("k", 0, 10),
        with_window("k", 9, 10),   // within its 10 s: a duplicate
        with_window("k", 11, 10),  // past them: stored
        with_window("l", 0, 600),  // a window past the queue's 60 s ...
        with_window("l", 61, 600), // ... is the queue's
    ] {
        let out = q.enqueue(vec![ev]).await.unwrap();
        outcomes.push(out[0] == EnqueueOutcome::Duplicate);
    }
    assert_eq!(outcomes, [false, true, false, false, false]);
}

#[tokio::test]
async fn retry_schedules_and_counts_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir.path().join("q.redb"));
    let a = ep("a");
    let now = SystemTime::now();
    q.enqueue(vec![event(&a, "1", now)]).await.unwrap();
    let ev = q.lease(&a, 10, now).await.unwrap().pop().unwrap();
    assert_eq!(ev.attempts, 0);
    let later = now + Duration::from_secs(30);
    q.retry(&ev, later, "HTTP 500").await.unwrap();
    assert!(
        q.lease(&a, 10, now).await.unwrap().is_empty(),
        "not due yet"
    );
    let again = q.lease(&a, 10, later).await.unwrap().pop().unwrap();
    assert_eq!((again.attempts, again.id.as_str()), (1, ev.id.as_str()));
    assert_eq!(again.last_error.as_deref(), Some("HTTP 500"));
    q.release(&again).await.unwrap();
    let third = q.lease(&a, 10, later).await.unwrap().pop().unwrap();
    assert_eq!(third.attempts, 1, "a release is not an attempt");
    q.ack(&third).await.unwrap();
    assert_eq!(q.ack(&third).await, Err(QueueError::UnknownReceipt));
    assert_eq!(q.depth(), QueueDepth::default());
}

#[tokio::test]
async fn a_lease_reads_what_the_memory_cache_does_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let a = ep("a");
    let now = SystemTime::now();
    let events: Vec<NewEvent> = (0..6).map(|i| event(&a, &format!("k{i}"), now)).collect();
    let expected: Vec<Bytes> = events.iter().map(|e| e.payload.clone()).collect();
    // Room for two records: the other four come from the file, in the same lease.
    let options = RedbQueueOptions {
        cache_bytes: 2 * 200,
        ..RedbQueueOptions::default()
    };
    let q = RedbQueue::open(dir.path().join("q.redb"), options).unwrap();
    let ids: Vec<String> = q
        .enqueue(events)
        .await
        .unwrap()
        .iter()
        .map(accepted_id)
        .collect();
    assert_eq!(q.index.cached_len(&a), 2);

    let leased = q.lease(&a, 10, now).await.unwrap();
    let got: Vec<(String, Bytes)> = leased
        .iter()
        .map(|e| (e.id.clone(), e.payload.clone()))
        .collect();
    let want: Vec<(String, Bytes)> = ids.into_iter().zip(expected).collect();
    assert_eq!(got, want, "every record, oldest first, cached or not");
    assert_eq!(q.index.cached_len(&a), 0);

    // A retry keeps its updated record in memory; the next lease sees the attempt.
    q.retry(&leased[0], now, "HTTP 503").await.unwrap();
    assert_eq!(q.index.cached_len(&a), 1);
    let again = q.lease(&a, 1, now).await.unwrap().pop().unwrap();
    assert_eq!(
        (again.attempts, again.last_error.as_deref()),
        (1, Some("HTTP 503"))
    );
}

#[tokio::test]
async fn dead_letters_replay_by_filter_and_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = ep("a");
    let t0 = SystemTime::now() - Duration::from_secs(600);
    let q = open(&path);
    q.enqueue(vec![
        event(&a, "old", t0),
        event(&a, "new", t0 + Duration::from_secs(300)),
    ])
    .await
    .unwrap();
    for ev in q.lease(&a, 10, SystemTime::now()).await.unwrap() {
        q.dead_letter(&ev, "max attempts").await.unwrap();
    }
    assert_eq!(q.endpoint_depth(&a).dead_lettered, 2);
    assert!(q.lease(&a, 10, SystemTime::now()).await.unwrap().is_empty());

    // Dead letters survive a reopen.
    drop(q);
    let q = open(&path);
    assert_eq!(q.depth().dead_lettered, 2);

    let filter = ReplayFilter::ReceivedBetween {
        from: t0 + Duration::from_secs(200),
        to: SystemTime::now(),
    };
    assert_eq!(q.replay(&a, filter, SystemTime::now()).await.unwrap(), 1);
    let back = q.lease(&a, 10, SystemTime::now()).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].dedupe_key.as_str(), back[0].attempts), ("new", 0));
    q.ack(&back[0]).await.unwrap();

    let nothing = ReplayFilter::DeadLetteredBetween {
        from: t0,
        to: t0 + Duration::from_secs(1),
    };
    assert_eq!(q.replay(&a, nothing, SystemTime::now()).await.unwrap(), 0);
    assert_eq!(
        q.prune_dead_letters(&a, SystemTime::now() - Duration::from_secs(60))
            .await
            .unwrap(),
        0,
        "too young to prune"
    );
    assert_eq!(
        q.prune_dead_letters(&a, SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(q.depth(), QueueDepth::default());
    drop(q);
    assert_eq!(open(&path).depth(), QueueDepth::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let q = std::sync::Arc::new(open(&dir.path().join("q.redb")));
    let a = ep("a");
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let (q, a) = (q.clone(), a.clone());
            tokio::spawn(async move {
                q.enqueue(vec![event(&a, &format!("k{i}"), SystemTime::now())])
                    .await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(accepted_id(&t.await.unwrap().unwrap()[0]));
    }
    assert_eq!(ids.len(), 400);
    assert_eq!(q.depth().pending, 400);
}

#[tokio::test]
async fn closed_queue_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let q = open(&dir.path().join("q.redb"));
    q.check_writable().await.unwrap();
    q.close();
    let a = ep("a");
    assert_eq!(
        q.enqueue(vec![event(&a, "1", SystemTime::now())]).await,
        Err(QueueError::Closed)
    );
    assert_eq!(q.check_writable().await, Err(QueueError::Closed));
}

#[tokio::test]
async fn wait_due_wakes_on_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let q = std::sync::Arc::new(open(&dir.path().join("q.redb")));
    let a = ep("a");
    // The waiter's own timeout is far longer than the test's deadline, so only the
    // enqueue can wake it in time.
    let waiter = {
        let (q, a) = (q.clone(), a.clone());
        tokio::spawn(async move { q.wait_due(&a, Duration::from_secs(600)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "wait_due returned with nothing due");
    q.enqueue(vec![event(&a, "1", SystemTime::now())])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("wait_due did not wake on the enqueue")
        .unwrap();
}

// Acknowledged events surviving a SIGKILL mid-commit: tests/queue_sigkill.rs (a
// separate process is needed, and it is its own test binary).

#[tokio::test]
async fn dedupe_keys_expire_within_seconds_at_any_count_and_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let opts = RedbQueueOptions {
        dedupe_window: Duration::from_secs(3600),
        max_dedupe_keys: 1_000,
        ..Default::default()
    };
    let q = RedbQueue::open(dir.path().join("q.redb"), opts).unwrap();
    let a = ep("a");
    let now = SystemTime::now();
    // Keys past the window (received two hours ago) and more fresh keys than the bound:
    // more than one expiry slice of each, as a flood would leave.
    let old = now - Duration::from_secs(7200);
    for chunk in 0..25 {
        let batch = (0..1000)
            .map(|i| event(&a, &format!("old-{chunk}-{i}"), old))
            .collect();
        q.enqueue(batch).await.unwrap();
    }
    let fresh: Vec<NewEvent> = (0..3000)
        .map(|i| event(&a, &format!("new-{i}"), now + Duration::from_millis(i)))
        .collect();
    q.enqueue(fresh).await.unwrap();
    // Expiry runs in the writer between commits, so how many keys are left at this very
    // moment depends on the machine's speed; what must hold is where it ends: within the
    // bound, with exactly the 2,000 fresh keys past it counted as evicted (the 25,000 old
    // ones expire by age and are not).

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (keys, evicted) = q.dedupe_stats().unwrap();
        if keys <= 1_000 {
            assert_eq!(
                evicted, 2_000,
                "only fresh keys past the bound count as evicted"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expiry did not keep up: {keys} keys left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The oldest fresh key was evicted: the same key is accepted again; the newest is
    // still a duplicate.
    let out = q
        .enqueue(vec![event(&a, "new-0", now), event(&a, "new-2999", now)])
        .await
        .unwrap();
    assert!(matches!(out[0], EnqueueOutcome::Accepted { .. }));
    assert_eq!(out[1], EnqueueOutcome::Duplicate);
}

#[tokio::test]
async fn the_providers_traceparent_survives_reopen_dead_letter_and_replay() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let e = ep("traced");
    {
        let q = open(&path);
        let mut traced = event(&e, "k1", SystemTime::now());
        traced.traceparent = Some(TP.into());
        q.enqueue(vec![traced]).await.unwrap();
    }
    let q = open(&path);
    let leased = q.lease(&e, 1, far_future()).await.unwrap();
    assert_eq!(leased[0].traceparent.as_deref(), Some(TP));
    q.dead_letter(&leased[0], "HTTP 400").await.unwrap();
    assert_eq!(
        q.replay(&e, ReplayFilter::All, SystemTime::now())
            .await
            .unwrap(),
        1
    );
    let again = q.lease(&e, 1, far_future()).await.unwrap();
    assert_eq!(again[0].traceparent.as_deref(), Some(TP));
}

#[tokio::test]
async fn a_reopened_backlog_is_held_a_window_at_a_time_and_leased_in_due_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let options = RedbQueueOptions {
        window: 8,
        ..RedbQueueOptions::default()
    };
    let (a, b) = (ep("a"), ep("b"));
    let base = SystemTime::now() - Duration::from_secs(60);
    {
        let q = RedbQueue::open(&path, options.clone()).unwrap();
        // Due times out of seq order; a second endpoint interleaved.
        let events = (0..100u64)
            .flat_map(|i| {
                let at = base + Duration::from_millis((i * 37) % 100);
                [
                    event(&a, &format!("a{i}"), at),
                    event(&b, &format!("b{i}"), at),
                ]
            })
            .collect();
        q.enqueue(events).await.unwrap();
        let dead = q.lease(&b, 10, SystemTime::now()).await.unwrap();
        for e in &dead {
            q.dead_letter(e, "gone").await.unwrap();
        }
    }
    let q = RedbQueue::open(&path, options).unwrap();
    assert_eq!(q.endpoint_depth(&a).pending, 100);
    assert_eq!(
        (
            q.endpoint_depth(&b).pending,
            q.endpoint_depth(&b).dead_lettered
        ),
        (90, 10)
    );
    assert_eq!(
        q.index.window_len(&a),
        0,
        "nothing but counts is loaded at open"
    );

    let mut dues = Vec::new();
    let mut seen = HashSet::new();
    loop {
        let leased = q.lease(&a, 3, SystemTime::now()).await.unwrap();
        if leased.is_empty() {
            break;
        }
        assert!(q.index.window_len(&a) <= 16, "the window stays bounded");
        for (n, e) in leased.iter().enumerate() {
            // Every fifth is retried once, later than everything else: it comes back last.
            if n == 0 && e.attempts == 0 && seen.len() % 5 == 0 {
                q.retry(e, base + Duration::from_secs(30), "HTTP 503")
                    .await
                    .unwrap();
                continue;
            }
            assert!(seen.insert(e.id.clone()), "{} leased twice", e.id);
            dues.push(e.next_attempt);
            q.ack(e).await.unwrap();
        }
    }
    assert_eq!(seen.len(), 100, "every event of a once");
    assert!(dues.is_sorted(), "leased oldest due first across refills");
    assert_eq!(q.endpoint_depth(&a), QueueDepth::default());
    assert_eq!(
        q.replay(&b, ReplayFilter::All, SystemTime::now())
            .await
            .unwrap(),
        10
    );
    assert_eq!(q.endpoint_depth(&b).pending, 100);
    assert_eq!(q.purge(&b).await.unwrap(), 100);
    assert_eq!(q.depth(), QueueDepth::default());
}

/// Holds the index's gate for writing, as the writer does from a commit to its effects,
/// for `hold`: a commit whose sync takes that long. Returns once the gate is held.
fn commit_in_progress(index: Arc<Index>, hold: Duration) -> std::thread::JoinHandle<()> {
    let (held, is_held) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _gate = index.gate.write().unwrap();
        held.send(()).unwrap();
        std::thread::sleep(hold);
    });
    is_held.recv().unwrap();
    thread
}

/// Ticks of a task on the same runtime while `work` runs, and how long it took.
async fn ticks_during<T>(work: impl std::future::Future<Output = T>) -> (T, u64, Duration) {
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let started = std::time::Instant::now();
    let out = work.await;
    let took = started.elapsed();
    ticker.abort();
    (out, ticks.load(Ordering::Relaxed), took)
}

// The test runtime has one thread: a refill that blocked it would stop every other task.
#[tokio::test]
async fn a_refill_waiting_out_a_slow_commit_leaves_the_runtime_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let options = RedbQueueOptions {
        window: 4,
        ..RedbQueueOptions::default()
    };
    let a = ep("a");
    let past = SystemTime::now() - Duration::from_secs(1);
    {
        let q = RedbQueue::open(&path, options.clone()).unwrap();
        q.enqueue((0..12).map(|i| event(&a, &format!("k{i}"), past)).collect())
            .await
            .unwrap();
    }
    // Reopened, the window holds nothing: the first lease and the first wait refill it.
    let q = RedbQueue::open(&path, options).unwrap();
    assert!(q.index.dry(&a));
    let hold = Duration::from_millis(600);

    let sync = commit_in_progress(q.index.clone(), hold);
    let ((), ticks, took) = ticks_during(q.wait_due(&a, Duration::from_secs(5))).await;
    sync.join().unwrap();
    assert!(took >= hold, "the wait refilled after the commit, {took:?}");
    assert!(ticks >= 10, "other tasks ran {ticks} times in {took:?}");
    assert!(!q.index.dry(&a), "the wait refilled the window");

    let leased = q.lease(&a, 4, SystemTime::now()).await.unwrap();
    assert_eq!(leased.len(), 4);
    assert!(q.index.dry(&a), "the window ran dry again");
    let sync = commit_in_progress(q.index.clone(), hold);
    let (leased, ticks, took) = ticks_during(q.lease(&a, 6, SystemTime::now())).await;
    sync.join().unwrap();
    assert!(
        took >= hold,
        "the lease refilled after the commit, {took:?}"
    );
    assert!(ticks >= 10, "other tasks ran {ticks} times in {took:?}");
    let leased = leased.unwrap();
    assert_eq!(leased.len(), 6, "a lease refills as often as it needs");
    assert!(
        leased.windows(2).all(|w| w[0].receipt.0 < w[1].receipt.0),
        "in order across the refills"
    );
}

/// Writes the first versions' layout (the events and meta tables, no index tables): 50
/// events, every tenth dead, even ones for endpoint `a` and odd ones for `b`. Returns the
/// last record, encoded.
fn write_unindexed_file(path: &Path, now: SystemTime) -> Vec<u8> {
    let mut buf = Vec::new();
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut events = txn.open_table(EVENTS).unwrap();
        for seq in 0..50u64 {
            let rec = Record {
                state: if seq % 10 == 0 {
                    STATE_DEAD
                } else {
                    STATE_PENDING
                },
                attempts: 0,
                received_ms: to_millis(now),
                due_ms: to_millis(now) - 1000 + seq,
                dead_ms: if seq % 10 == 0 { to_millis(now) } else { 0 },
                namespace: "ns".into(),
                name: if seq % 2 == 0 { "a" } else { "b" }.into(),
                subscription: "sub".into(),
                event_type: "t".into(),
                dedupe_key: format!("k{seq}"),
                last_error: String::new(),
                payload: Bytes::from(format!("{{\"n\":{seq}}}")),
                traceparent: String::new(),
                headers: String::new(),
            };
            rec.encode(&mut buf);
            events.insert(seq, buf.as_slice()).unwrap();
        }
        let mut meta = txn.open_table(META).unwrap();
        meta.insert(META_NONCE, 7).unwrap();
        meta.insert(META_NEXT_SEQ, 50).unwrap();
    }
    txn.commit().unwrap();
    buf
}

/// A file written before the queue kept its own index (records only) is indexed on open:
/// nothing is lost by an upgrade.
#[tokio::test]
async fn a_file_from_the_previous_version_is_indexed_on_open_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let now = SystemTime::now();
    let mut buf = write_unindexed_file(&path, now);
    let q = open(&path);
    let (a, b) = (ep("a"), ep("b"));
    assert_eq!(
        (
            q.endpoint_depth(&a).pending,
            q.endpoint_depth(&a).dead_lettered
        ),
        (20, 5)
    );
    assert_eq!(
        (
            q.endpoint_depth(&b).pending,
            q.endpoint_depth(&b).dead_lettered
        ),
        (25, 0)
    );
    let leased = q.lease(&a, 100, now).await.unwrap();
    assert_eq!(leased.len(), 20);
    assert_eq!(leased[0].id, event_id(7, 2), "ids are kept");
    assert_eq!(q.replay(&a, ReplayFilter::All, now).await.unwrap(), 5);
    // New events continue the old sequence.
    let out = q.enqueue(vec![event(&b, "new", now)]).await.unwrap();
    assert_eq!(accepted_id(&out[0]), event_id(7, 50));
    drop(q);
    // Indexed once: a second open reads the same counts.
    let q = open(&path);
    assert_eq!(q.endpoint_depth(&a).pending, 25);
    assert_eq!(q.endpoint_depth(&b).pending, 26);
    drop(q);
    // Rolled back: the previous version stores an event without the index, and the next
    // open of this version sees the counts no longer add up and indexes the file again.
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(EVENTS).unwrap();
            let mut rec = Record::decode(&buf).unwrap();
            rec.dedupe_key = "rolled-back".into();
            rec.encode(&mut buf);
            events.insert(1000, buf.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let q = open(&path);
    assert_eq!(q.endpoint_depth(&b).pending, 27);
    assert_eq!(q.lease(&b, 100, SystemTime::now()).await.unwrap().len(), 27);
}

/// A file of format 2, whose index tables were keyed by `&str`, is indexed again under
/// the byte keys on open and its old tables dropped: nothing is lost, nothing of the old
/// index is read.
#[tokio::test]
async fn a_file_indexed_by_text_keys_is_indexed_again_without_loss() {
    use redb::TableHandle;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let now = SystemTime::now();
    write_unindexed_file(&path, now);
    {
        // What format 2 wrote beside the records: an index whose counts add up, so that
        // version would have served from it as it is.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let ready_v2: TableDefinition<(&str, u64, u64), ()> =
                TableDefinition::new("ready_by_endpoint");
            let dead_v2: TableDefinition<(&str, u64), (u64, u64)> =
                TableDefinition::new("dead_by_endpoint");
            let counts_v2: TableDefinition<&str, (u64, u64, u64)> =
                TableDefinition::new("endpoint_counts");
            let (mut ready, mut dead) = (
                txn.open_table(ready_v2).unwrap(),
                txn.open_table(dead_v2).unwrap(),
            );
            for seq in 0..50u64 {
                let id = if seq % 2 == 0 { "ns/a" } else { "ns/b" };
                if seq % 10 == 0 {
                    dead.insert((id, seq), (to_millis(now), to_millis(now)))
                        .unwrap();
                } else {
                    ready
                        .insert((id, to_millis(now) - 1000 + seq, seq), ())
                        .unwrap();
                }
            }
            let mut counts = txn.open_table(counts_v2).unwrap();
            counts.insert("ns/a", (20, 1, 5)).unwrap();
            counts.insert("ns/b", (25, 1, 0)).unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(disk_index::META_FORMAT, 2)
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let q = open(&path);
    let (a, b) = (ep("a"), ep("b"));
    let depth = |k: &EndpointKey| {
        let d = q.endpoint_depth(k);
        (d.pending, d.dead_lettered)
    };
    assert_eq!((depth(&a), depth(&b)), ((20, 5), (25, 0)));
    let stored: u64 = q.waiting_bytes(Some(&a)).unwrap();
    assert!(
        stored > 20,
        "the bytes are counted from the records, not the old counts: {stored}"
    );
    let leased = q.lease(&a, 100, now).await.unwrap();
    assert_eq!(leased.len(), 20);
    assert!(
        leased.windows(2).all(|w| w[0].receipt.0 < w[1].receipt.0),
        "in due order"
    );
    assert_eq!(q.replay(&a, ReplayFilter::All, now).await.unwrap(), 5);
    drop(q);
    let db = Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let tables: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    for old in disk_index::FORMAT_2_TABLES {
        assert!(
            !tables.contains(&old.to_string()),
            "{old} left in {tables:?}"
        );
    }
    let format = txn
        .open_table(META)
        .unwrap()
        .get(disk_index::META_FORMAT)
        .unwrap();
    assert_eq!(format.map(|v| v.value()), Some(3));
}

#[tokio::test]
async fn dedupe_keys_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let e = ep("deduped");
    let now = SystemTime::now();
    {
        let q = open(&path);
        let out = q
            .enqueue(vec![event(&e, "k1", now), event(&e, "k2", now)])
            .await
            .unwrap();
        assert!(matches!(out[1], EnqueueOutcome::Accepted { .. }));
    }
    // The lookup map is rebuilt from the file: both keys are still known, a new one is not.
    let q = open(&path);
    assert_eq!(q.dedupe_stats().unwrap().0, 2);
    let out = q
        .enqueue(vec![
            event(&e, "k1", now),
            event(&e, "k3", now),
            event(&e, "k2", now),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], EnqueueOutcome::Duplicate);
    assert!(matches!(out[1], EnqueueOutcome::Accepted { .. }));
    assert_eq!(out[2], EnqueueOutcome::Duplicate);
}

#[tokio::test]
async fn a_file_with_the_old_key_table_drops_it_and_still_knows_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let e = ep("upgraded");
    let now = SystemTime::now();
    {
        let q = open(&path);
        q.enqueue(vec![event(&e, "k1", now)]).await.unwrap();
    }
    // What the previous version also wrote: every key in a table keyed by the key.
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(DEDUPE_BY_KEY_V1)
            .unwrap()
            .insert(
                dedupe_entry("ns", "upgraded", "k1").as_str(),
                to_millis(now),
            )
            .unwrap();
        txn.commit().unwrap();
    }
    let q = open(&path);
    assert_eq!(q.dedupe_stats().unwrap().0, 1);
    let out = q.enqueue(vec![event(&e, "k1", now)]).await.unwrap();
    assert_eq!(out, [EnqueueOutcome::Duplicate]);
    drop(q);
    use redb::TableHandle;
    let db = Database::create(&path).unwrap();
    let tables: Vec<String> = db
        .begin_read()
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert!(!tables.contains(&"dedupe".to_string()), "{tables:?}");
    assert!(tables.contains(&"dedupe_by_time".to_string()), "{tables:?}");
}

/// One event enqueued from a task of its own, so that the test can watch it wait.
fn spawn_enqueue(
    q: &Arc<RedbQueue>,
    endpoint: &EndpointKey,
    dedupe: &str,
    received: SystemTime,
) -> tokio::task::JoinHandle<Result<Vec<EnqueueOutcome>, QueueError>> {
    let (q, endpoint, dedupe) = (q.clone(), endpoint.clone(), dedupe.to_owned());
    tokio::spawn(async move { q.enqueue(vec![event(&endpoint, &dedupe, received)]).await })
}

/// Waits (at most 10 s, else fails with `why`) for an enqueue of [`spawn_enqueue`], which
/// must be accepted.
async fn accepted_in_time(
    enqueue: tokio::task::JoinHandle<Result<Vec<EnqueueOutcome>, QueueError>>,
    why: &str,
) {
    let out = tokio::time::timeout(Duration::from_secs(10), enqueue)
        .await
        .expect(why)
        .unwrap()
        .unwrap();
    assert!(matches!(out[..], [EnqueueOutcome::Accepted { .. }]));
}

fn lingering(linger: Duration, max_batch: usize) -> RedbQueueOptions {
    RedbQueueOptions {
        commit_linger: linger,
        max_batch,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_enqueue_waits_within_the_linger_and_commits_with_the_next_operation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = ep("a");
    let now = SystemTime::now();
    {
        // A batch of two is full at the second operation: it commits then, not after 60 s.
        let q = Arc::new(RedbQueue::open(&path, lingering(Duration::from_secs(60), 2)).unwrap());
        let first = spawn_enqueue(&q, &a, "first", now);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !first.is_finished(),
            "the first enqueue was answered before its linger ended or its batch filled"
        );
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            q.enqueue(vec![event(&a, "second", now)]),
        )
        .await
        .expect("the second enqueue fills the batch and commits both");
        assert!(matches!(
            second.unwrap()[..],
            [EnqueueOutcome::Accepted { .. }]
        ));
        accepted_in_time(first, "the first enqueue is answered by the same commit").await;
        q.close();
    }
    // Both were durable when answered.
    assert_eq!(open(&path).depth().pending, 2);
}

#[tokio::test]
async fn a_lone_enqueue_commits_when_the_linger_ends_and_a_close_cuts_it_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = ep("a");
    let now = SystemTime::now();
    {
        let q = RedbQueue::open(&path, lingering(Duration::from_millis(300), 4096)).unwrap();
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            q.enqueue(vec![event(&a, "alone", now)]),
        )
        .await
        .expect("a lone enqueue is committed once the linger ends");
        assert!(matches!(
            out.unwrap()[..],
            [EnqueueOutcome::Accepted { .. }]
        ));
    }
    {
        let q = Arc::new(RedbQueue::open(&path, lingering(Duration::from_secs(60), 4096)).unwrap());
        let pending = spawn_enqueue(&q, &a, "before-close", now);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished(), "answered before the linger ended");
        q.close();
        accepted_in_time(
            pending,
            "a close commits what lingers instead of waiting out the linger",
        )
        .await;
    }
    assert_eq!(open(&path).depth().pending, 2);
}

#[tokio::test]
async fn a_batch_of_many_operations_commits_without_waiting_out_the_linger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = ep("a");
    let now = SystemTime::now();
    let q = Arc::new(RedbQueue::open(&path, lingering(Duration::from_secs(60), 4096)).unwrap());
    // As many callers as a batch needs to stop lingering, each with one event.
    let callers: Vec<_> = (0..LINGER_UNTIL_OPS)
        .map(|i| spawn_enqueue(&q, &a, &format!("k{i}"), now))
        .collect();
    let answered =
        tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(callers))
            .await
            .expect("a batch this large commits at once, not when the 60 s linger ends");
    for out in answered {
        assert!(matches!(
            out.unwrap().unwrap()[..],
            [EnqueueOutcome::Accepted { .. }]
        ));
    }
    q.close();
    drop(q);
    assert_eq!(open(&path).depth().pending, LINGER_UNTIL_OPS as u64);
}

#[test]
fn event_ids_are_the_nonce_and_seq_in_hex() {
    assert_eq!(
        event_id(0x0123_4567_89ab_cdef, 42),
        "msg_0123456789abcdef000000000000002a"
    );
    assert_eq!(event_id(0, 0).len(), 36);
}

/// The `_sum` and `_count` of a histogram in the text exposition.
fn histogram_sum_and_count(text: &str, name: &str) -> (f64, u64) {
    let value = |suffix: &str| {
        let prefix = format!("{name}_{suffix} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {name}_{suffix} in\n{text}"))
            .to_owned()
    };
    (
        value("sum").parse().unwrap(),
        value("count").parse().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_commit_is_measured_with_the_operations_it_carried() {
    let dir = tempfile::tempdir().unwrap();
    // A batch of three is full at the third operation, and only then commits.
    let q = Arc::new(
        RedbQueue::open(
            dir.path().join("q.redb"),
            lingering(Duration::from_secs(60), 3),
        )
        .unwrap(),
    );
    let mut metrics = crate::metrics::Metrics::new();
    metrics.register_queue_commits(q.commit_metrics().expect("the embedded queue commits"));
    let (a, now) = (ep("a"), SystemTime::now());
    let enqueues: Vec<_> = (0..3)
        .map(|i| spawn_enqueue(&q, &a, &format!("k{i}"), now))
        .collect();
    for e in enqueues {
        accepted_in_time(e, "the third enqueue fills the batch").await;
    }

    let text = metrics.encode();
    assert_eq!(
        histogram_sum_and_count(&text, "webhook_operator_queue_commit_operations"),
        (3.0, 1),
        "one commit of three operations"
    );
    let (seconds, commits) =
        histogram_sum_and_count(&text, "webhook_operator_queue_commit_duration_seconds");
    assert_eq!(commits, 1);
    assert!(
        seconds > 0.0 && seconds < 10.0,
        "the commit's own time, not the linger's 60 s: {seconds}"
    );
}

/// A power cut keeps what was synced and nothing else. Each commit syncs only the journal,
/// so an acknowledged event must come back from the queue file as it was at the last
/// checkpoint (the open) plus the journal.
#[tokio::test]
async fn acknowledged_events_survive_losing_every_unsynced_write_of_the_queue_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let a = ep("a");
    let now = SystemTime::now();
    // What the disk holds of the queue file: a clean close passed it every write and
    // synced it. After that, writes reach it only at a checkpoint.
    drop(open(&path));
    let synced = std::fs::read(&path).unwrap();
    let q = open(&path);
    let mut ids = Vec::new();
    for i in 0..40 {
        let out = q
            .enqueue(vec![event(&a, &format!("k{i}"), now)])
            .await
            .unwrap();
        ids.push(accepted_id(&out[0]));
    }
    let leased = q.lease(&a, 10, far_future()).await.unwrap();
    for e in &leased {
        q.ack(e).await.unwrap();
    }
    // The power cut, while the queue is open: the queue file as synced, the journal as is.
    let after = tempfile::tempdir().unwrap();
    let lost = after.path().join("q.redb");
    std::fs::write(&lost, &synced).unwrap();
    std::fs::copy(journal::journal_path(&path), journal::journal_path(&lost)).unwrap();
    let without_journal = after.path().join("bare.redb");
    std::fs::write(&without_journal, &synced).unwrap();
    drop(q);

    assert_eq!(
        open(&without_journal).depth().pending,
        0,
        "the queue file alone holds none of the events: they are in the journal only"
    );
    let q = open(&lost);
    assert_eq!(q.depth().pending, 30, "every event not acked is back");
    let back: Vec<String> = q
        .lease(&a, 100, far_future())
        .await
        .unwrap()
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(back, ids[10..]);
}
