//! The JetStream queue against a real nats-server: durability, dedupe across replicas,
//! exclusive leases, redelivery after the lease timeout, retry delays, dead letters,
//! replay and pruning, and failing (never succeeding) while the server is away.

#[path = "common/nats.rs"]
mod nats;
#[path = "common/ports.rs"]
mod ports;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use webhook_operator::queue::{
    EndpointKey, EnqueueOutcome, JetStreamOptions, JetStreamQueue, NewEvent, Queue, QueueError,
    ReplayFilter,
};

use nats::NatsServer;

fn options(url: &str) -> JetStreamOptions {
    JetStreamOptions {
        url: url.to_string(),
        ack_wait: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

async fn connect(server: &NatsServer) -> JetStreamQueue {
    tokio::time::timeout(
        Duration::from_secs(20),
        JetStreamQueue::connect(options(&server.url())),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

fn event(ep: &EndpointKey, key: &str, payload: &str) -> NewEvent {
    NewEvent {
        endpoint: ep.clone(),
        subscription: "sub".into(),
        event_type: "call.finished".into(),
        dedupe_key: key.into(),
        dedupe_window: None,
        payload: Bytes::from(payload.to_string()),
        received: SystemTime::now(),
        traceparent: None,
        headers: String::new(),
    }
}

fn accepted_id(o: &EnqueueOutcome) -> String {
    match o {
        EnqueueOutcome::Accepted { id } => id.clone(),
        other => panic!("expected Accepted, got {other:?}"),
    }
}

/// Leases until `n` events arrive or `timeout` passes.
async fn lease_n(
    q: &JetStreamQueue,
    ep: &EndpointKey,
    n: usize,
    timeout: Duration,
) -> Vec<webhook_operator::queue::QueuedEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(q.lease(ep, n - got.len(), SystemTime::now()).await.unwrap());
        if got.len() < n {
            q.wait_due(ep, Duration::from_millis(200)).await;
        }
    }
    got
}

#[tokio::test]
async fn durable_dedupe_across_replicas_and_exclusive_leases() {
    let mut server = NatsServer::start();
    let ep = EndpointKey::new("apps", "orders.v1"); // a dot in the name: must be escaped
    let other = EndpointKey::new("apps", "orders-v1");
    {
        let q1 = connect(&server).await;
        let q2 = connect(&server).await;
        let out = q1
            .enqueue(vec![event(&ep, "k1", "one"), event(&ep, "k2", "two")])
            .await
            .unwrap();
        accepted_id(&out[0]);
        accepted_id(&out[1]);
        // The same provider event arriving at the other replica's ingress.
        let out = q2
            .enqueue(vec![
                event(&ep, "k1", "one again"),
                event(&other, "k1", "x"),
            ])
            .await
            .unwrap();
        assert_eq!(out[0], EnqueueOutcome::Duplicate);
        accepted_id(&out[1]);
    }
    // Acknowledged means stored: a server restart keeps all three.
    server.restart();
    let q1 = connect(&server).await;
    let q2 = connect(&server).await;
    q1.refresh_counts().await.unwrap();
    assert_eq!(q1.endpoint_depth(&ep).pending, 2);
    assert_eq!(q1.endpoint_depth(&other).pending, 1);
    assert!(q1.endpoints().contains(&ep) && q1.endpoints().contains(&other));

    let leased = lease_n(&q1, &ep, 2, Duration::from_secs(5)).await;
    let mut payloads: Vec<_> = leased.iter().map(|e| e.payload.clone()).collect();
    payloads.sort();
    assert_eq!(payloads, vec![Bytes::from("one"), Bytes::from("two")]);
    assert!(leased.iter().all(|e| e.attempts == 0 && e.endpoint == ep));
    // Leased by q1: the other replica gets nothing for this endpoint.
    assert!(
        q2.lease(&ep, 10, SystemTime::now())
            .await
            .unwrap()
            .is_empty()
    );
    for e in &leased {
        q1.ack(e).await.unwrap();
    }
    assert_eq!(q1.ack(&leased[0]).await, Err(QueueError::UnknownReceipt));
    // Acked: not redelivered after the lease timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        lease_n(&q2, &ep, 1, Duration::from_millis(600))
            .await
            .is_empty()
    );
    q1.refresh_counts().await.unwrap();
    assert_eq!(q1.endpoint_depth(&ep).pending, 0);
}

/// A replica that leases one event at a time holds no other: the rest stay available to
/// the other replicas rather than parked, leased to it, until `ack_wait`.
/// `spec.dedupe.window` on JetStream, whose server has one window per stream: receipts of
/// a key within one slot of the event's window are duplicates, a receipt a window later
/// is stored.
#[tokio::test]
async fn an_events_own_window_shortens_the_servers() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "windowed");
    let q = connect(&server).await;
    // A start on a slot boundary of the 10 s window (slots count from the epoch).
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let at = |secs: u64, window: Option<u64>| NewEvent {
        received: t0 + Duration::from_secs(secs),
        dedupe_window: window.map(Duration::from_secs),
        ..event(&ep, "order-7", "x")
    };
    let mut duplicate = Vec::new();
    for ev in [
        at(0, Some(10)),
        at(9, Some(10)),  // the same slot: a duplicate
        at(10, Some(10)), // a window later: stored
        at(0, None),      // the stream's window: ...
        at(30, None),     // ... a duplicate however late
    ] {
        let out = q.enqueue(vec![ev]).await.unwrap();
        duplicate.push(out[0] == EnqueueOutcome::Duplicate);
    }
    assert_eq!(duplicate, [false, true, false, false, true]);
}

#[tokio::test]
async fn a_slow_replica_holds_only_what_it_leased() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "slow");
    let q1 = connect(&server).await;
    let q2 = connect(&server).await;
    let events: Vec<_> = (0..10).map(|i| event(&ep, &format!("k{i}"), "x")).collect();
    q1.enqueue(events).await.unwrap();
    let first = lease_n(&q1, &ep, 1, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 1);
    let second = lease_n(&q1, &ep, 1, Duration::from_secs(5)).await;
    assert_eq!(second.len(), 1);
    let rest = lease_n(&q2, &ep, 8, Duration::from_millis(900)).await;
    assert_eq!(
        rest.len(),
        8,
        "the other replica gets every event the first one did not lease"
    );
}

/// A replica that stops delivering gives back what it pulled ahead of its leases: the
/// other replica gets every event it did not lease at once, not after `ack_wait`.
#[tokio::test]
async fn a_replica_that_stops_gives_back_what_it_pulled_ahead() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "busy");
    let long_lease = JetStreamOptions {
        ack_wait: Duration::from_secs(30),
        ..options(&server.url())
    };
    let q1 = connect_with(long_lease.clone()).await;
    let q2 = connect_with(long_lease).await;
    let events: Vec<_> = (0..300)
        .map(|i| event(&ep, &format!("k{i}"), "x"))
        .collect();
    q1.enqueue(events).await.unwrap();
    // A busy worker: one event at a time as its attempts finish, 100 in a few ms.
    let mut leased = 0;
    while leased < 100 {
        leased += lease_n(&q1, &ep, 1, Duration::from_secs(5)).await.len();
    }
    // The attempts under way take a moment: the pull ahead lands meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    q1.return_prefetched().await;
    let rest = lease_n(&q2, &ep, 200, Duration::from_secs(3)).await;
    assert_eq!(
        rest.len(),
        200,
        "the other replica gets every event the first one did not lease"
    );
}

#[tokio::test]
async fn unacked_lease_goes_to_another_replica_after_ack_wait() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "crashy");
    let q1 = connect(&server).await;
    let q2 = connect(&server).await;
    let id = accepted_id(&q1.enqueue(vec![event(&ep, "k", "p")]).await.unwrap()[0]);
    let first = lease_n(&q1, &ep, 1, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 1);
    drop(q1); // the replica dies holding the lease
    let again = lease_n(&q2, &ep, 1, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1, "redelivered after ack_wait");
    assert_eq!(again[0].id, id, "same id across redelivery");
    assert_eq!(again[0].attempts, 1);
    q2.ack(&again[0]).await.unwrap();
}

#[tokio::test]
async fn retry_waits_dead_letters_replay_and_prune() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "flaky");
    let q = connect(&server).await;
    let id = accepted_id(&q.enqueue(vec![event(&ep, "k", "p")]).await.unwrap()[0]);
    let e = lease_n(&q, &ep, 1, Duration::from_secs(5)).await.remove(0);
    let retry_at = SystemTime::now() + Duration::from_millis(700);
    q.retry(&e, retry_at, "HTTP 503").await.unwrap();
    assert!(
        q.lease(&ep, 1, SystemTime::now()).await.unwrap().is_empty(),
        "not due before the retry delay"
    );
    let e = lease_n(&q, &ep, 1, Duration::from_secs(5)).await.remove(0);
    assert!(
        SystemTime::now() >= retry_at,
        "redelivered only after the delay"
    );
    assert_eq!((e.id.as_str(), e.attempts), (id.as_str(), 1));

    q.dead_letter(&e, "HTTP 503 after 2 attempts")
        .await
        .unwrap();
    q.refresh_counts().await.unwrap();
    let d = q.endpoint_depth(&ep);
    assert_eq!((d.pending, d.dead_lettered), (0, 1));
    // Dead: never redelivered.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        lease_n(&q, &ep, 1, Duration::from_millis(400))
            .await
            .is_empty()
    );

    // A filter that matches nothing replays nothing.
    let past = SystemTime::now() - Duration::from_secs(3600);
    let none = ReplayFilter::DeadLetteredBetween {
        from: past,
        to: past + Duration::from_secs(1),
    };
    assert_eq!(q.replay(&ep, none, SystemTime::now()).await.unwrap(), 0);
    assert_eq!(
        q.replay(&ep, ReplayFilter::All, SystemTime::now())
            .await
            .unwrap(),
        1
    );
    let e = lease_n(&q, &ep, 1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(
        (e.id.as_str(), e.attempts),
        (id.as_str(), 0),
        "replay resets attempts"
    );
    q.dead_letter(&e, "again").await.unwrap();

    assert_eq!(
        q.prune_dead_letters(&ep, SystemTime::now() - Duration::from_secs(60))
            .await
            .unwrap(),
        0,
        "too young to prune"
    );
    assert_eq!(
        q.prune_dead_letters(&ep, SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap(),
        1
    );
    q.refresh_counts().await.unwrap();
    assert_eq!(q.endpoint_depth(&ep).dead_lettered, 0);
}

#[tokio::test]
async fn writes_fail_while_the_server_is_away_and_recover() {
    let mut server = NatsServer::start();
    let ep = EndpointKey::new("apps", "outage");
    let q = connect(&server).await;
    q.check_writable().await.unwrap();
    server.kill();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        q.enqueue(vec![event(&ep, "during", "p")]),
    )
    .await
    .expect("enqueue answers in bounded time");
    assert!(
        r.is_err(),
        "enqueue must fail while nothing can persist: {r:?}"
    );
    let writable = tokio::time::timeout(Duration::from_secs(10), q.check_writable())
        .await
        .expect("check_writable answers in bounded time");
    assert!(writable.is_err(), "not writable while the server is away");

    server.restart();
    // Reconnects by itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if q.check_writable().await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = q.enqueue(vec![event(&ep, "after", "p")]).await.unwrap();
    accepted_id(&out[0]);
}

async fn connect_with(options: JetStreamOptions) -> JetStreamQueue {
    tokio::time::timeout(Duration::from_secs(20), JetStreamQueue::connect(options))
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test]
async fn an_abandoned_wait_loses_no_event_to_ack_wait() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "abandoned");
    let q = connect_with(JetStreamOptions {
        ack_wait: Duration::from_secs(30),
        ..options(&server.url())
    })
    .await;
    // Delivery stops waiting when its endpoint's configuration changes (a `select!`), which
    // can happen after the wait's pull was answered but before the wait saw the answer.
    let mut wait = Box::pin(q.wait_due(&ep, Duration::from_secs(3)));
    tokio::select! {
        _ = &mut wait => panic!("nothing to wait for yet"),
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    let id = accepted_id(&q.enqueue(vec![event(&ep, "k", "p")]).await.unwrap()[0]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(wait);
    let got = lease_n(&q, &ep, 1, Duration::from_secs(5)).await;
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        [id],
        "the event is handed out within seconds, not after ack_wait"
    );
    q.ack(&got[0]).await.unwrap();
}

#[tokio::test]
async fn a_lease_held_past_ack_wait_is_kept_alive_not_handed_to_another_replica() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "slow");
    let q1 = connect(&server).await; // ack_wait 1 s
    let q2 = connect(&server).await;
    q1.enqueue(vec![event(&ep, "k", "p")]).await.unwrap();
    let held = lease_n(&q1, &ep, 1, Duration::from_secs(5)).await;
    assert_eq!(held.len(), 1);
    // An attempt three times longer than ack_wait: nobody else may get the event.
    let other = lease_n(&q2, &ep, 1, Duration::from_secs(3)).await;
    assert!(
        other.is_empty(),
        "handed to a second replica while the first still holds it"
    );
    q1.ack(&held[0]).await.unwrap();
    assert!(
        lease_n(&q2, &ep, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn existing_streams_take_the_configured_limits_and_refuse_rather_than_drop() {
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "limited");
    drop(connect(&server).await); // creates the streams without limits
    let q = connect_with(JetStreamOptions {
        max_bytes: 8 * 1024,
        dead_letter_max_age: Duration::from_secs(3600),
        ..options(&server.url())
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let events = js.get_stream("WEBHOOK_EVENTS").await.unwrap();
    let cfg = &events.cached_info().config;
    assert_eq!(cfg.max_bytes, 8 * 1024);
    assert_eq!(
        cfg.discard,
        async_nats::jetstream::stream::DiscardPolicy::New
    );
    let dead = js.get_stream("WEBHOOK_DEAD").await.unwrap();
    assert_eq!(dead.cached_info().config.max_age, Duration::from_secs(3600));

    // Past max_bytes new events are refused; none already stored is dropped.
    let mut accepted = Vec::new();
    let mut refused = false;
    for n in 0..64 {
        match q
            .enqueue(vec![event(&ep, &format!("k{n}"), &"x".repeat(512))])
            .await
        {
            Ok(o) => accepted.push(accepted_id(&o[0])),
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "the stream refused events past max_bytes");
    assert!(!accepted.is_empty());
    let leased = lease_n(&q, &ep, accepted.len(), Duration::from_secs(10)).await;
    let mut ids: Vec<_> = leased.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    accepted.sort();
    assert_eq!(ids, accepted, "every accepted event is still there");
}

#[tokio::test]
async fn purge_deletes_an_endpoints_pending_events_and_dead_letters_only() {
    let server = NatsServer::start();
    let gone = EndpointKey::new("apps", "deleted");
    let kept = EndpointKey::new("apps", "kept");
    let q = connect(&server).await;
    q.enqueue(vec![
        event(&gone, "a", "p"),
        event(&gone, "b", "p"),
        event(&kept, "c", "p"),
    ])
    .await
    .unwrap();
    let leased = lease_n(&q, &gone, 1, Duration::from_secs(5)).await;
    q.dead_letter(&leased[0], "refused").await.unwrap();
    assert_eq!(
        q.purge(&gone).await.unwrap(),
        2,
        "one pending, one dead letter"
    );
    assert!(
        lease_n(&q, &gone, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );
    assert_eq!(
        q.replay(&gone, ReplayFilter::All, SystemTime::now())
            .await
            .unwrap(),
        0
    );
    assert_eq!(lease_n(&q, &kept, 1, Duration::from_secs(5)).await.len(), 1);
}

#[tokio::test]
async fn the_providers_traceparent_survives_lease_dead_letter_and_replay() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let server = NatsServer::start();
    let ep = EndpointKey::new("apps", "traced");
    let q = connect(&server).await;
    let mut traced = event(&ep, "k1", "p");
    traced.traceparent = Some(TP.into());
    q.enqueue(vec![traced, event(&ep, "k2", "q")])
        .await
        .unwrap();
    let leased = lease_n(&q, &ep, 2, Duration::from_secs(5)).await;
    let tps: Vec<Option<&str>> = leased.iter().map(|e| e.traceparent.as_deref()).collect();
    assert!(tps.contains(&Some(TP)) && tps.contains(&None), "{tps:?}");
    for e in &leased {
        q.dead_letter(e, "HTTP 400").await.unwrap();
    }
    assert_eq!(
        q.replay(&ep, ReplayFilter::All, SystemTime::now())
            .await
            .unwrap(),
        2
    );
    let again = lease_n(&q, &ep, 2, Duration::from_secs(5)).await;
    let tps: Vec<Option<&str>> = again.iter().map(|e| e.traceparent.as_deref()).collect();
    assert!(tps.contains(&Some(TP)) && tps.contains(&None), "{tps:?}");
}

/// Issue 47 item 5 at the queue level: an endpoint's waiting events and dead letters
/// exported from the embedded queue as JSON Lines and imported into JetStream. Each
/// waiting event is delivered once with its id, payload, attempts, trace context and
/// headers; the dead letters arrive as dead letters with theirs; a second import of the
/// same lines stores nothing; another endpoint's events stay behind.
#[tokio::test]
async fn export_from_the_embedded_queue_imports_into_jetstream_once() {
    use std::collections::HashMap;
    use webhook_operator::queue::{RedbQueue, RedbQueueOptions, read_lines, write_lines};

    let dir = tempfile::tempdir().unwrap();
    let embedded = RedbQueue::open(dir.path().join("q.redb"), RedbQueueOptions::default()).unwrap();
    let ep = EndpointKey::new("apps", "moving");
    let other = EndpointKey::new("apps", "staying");
    let mut batch: Vec<NewEvent> = (0..20)
        .map(|i| event(&ep, &format!("k{i}"), &format!("{{\"n\":{i}}}")))
        .collect();
    for ev in &mut batch {
        ev.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        ev.headers = "x-atlas-event: call_completed\n".into();
    }
    batch.push(event(&other, "k0", "not exported"));
    embedded.enqueue(batch).await.unwrap();
    let leased = embedded.lease(&ep, 3, SystemTime::now()).await.unwrap();
    embedded.dead_letter(&leased[0], "HTTP 400").await.unwrap();
    embedded.dead_letter(&leased[1], "HTTP 410").await.unwrap();
    embedded
        .retry(&leased[2], SystemTime::now(), "HTTP 503")
        .await
        .unwrap();

    let exported = embedded.export(&ep).await.unwrap();
    let dead: Vec<&str> = exported
        .iter()
        .filter(|e| e.is_dead())
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(
        exported.len(),
        20,
        "the other endpoint's event stays behind"
    );
    assert_eq!(dead, [leased[0].id.as_str(), leased[1].id.as_str()]);
    let mut lines = Vec::new();
    write_lines(&exported, &mut lines).unwrap();
    let read = read_lines(&lines[..]).unwrap();
    assert_eq!(read, exported, "JSON Lines round trip");
    println!(
        "exported {} events ({} dead letters) in {} bytes of JSON Lines",
        read.len(),
        dead.len(),
        lines.len()
    );

    let server = NatsServer::start();
    let js = connect(&server).await;
    let first = js.import(read.clone()).await.unwrap();
    assert!(
        first
            .iter()
            .all(|o| matches!(o, EnqueueOutcome::Accepted { .. })),
        "{first:?}"
    );
    let again = js.import(read.clone()).await.unwrap();
    assert!(
        again.iter().all(|o| *o == EnqueueOutcome::Duplicate),
        "a second import stores nothing: {again:?}"
    );

    // Each waiting event once (asking for one more than there are).
    let waiting: HashMap<&str, _> = read
        .iter()
        .filter(|e| !e.is_dead())
        .map(|e| (e.id.as_str(), e))
        .collect();
    let got = lease_n(&js, &ep, waiting.len() + 1, Duration::from_secs(3)).await;
    assert_eq!(got.len(), waiting.len(), "each waiting event once");
    for ev in &got {
        let was = waiting[ev.id.as_str()];
        assert_eq!(ev.payload, was.payload_bytes().unwrap());
        assert_eq!(ev.attempts, was.attempts, "{}", ev.id);
        assert_eq!(ev.traceparent, was.traceparent);
        assert_eq!(ev.headers, was.headers);
        assert_eq!(ev.dedupe_key, was.dedupe_key);
        js.ack(ev).await.unwrap();
    }
    assert_eq!(
        got.iter().find(|e| e.id == leased[2].id).unwrap().attempts,
        1,
        "the failed attempt carried over"
    );
    // The dead letters, as dead letters, with their ids.
    js.refresh_counts().await.unwrap();
    assert_eq!(js.endpoint_depth(&ep).dead_lettered, 2);
    assert!(!js.endpoints().contains(&other));
    assert_eq!(
        js.replay(&ep, ReplayFilter::All, SystemTime::now())
            .await
            .unwrap(),
        2
    );
    let mut replayed: Vec<String> = lease_n(&js, &ep, 3, Duration::from_secs(3))
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    replayed.sort();
    let mut dead: Vec<String> = dead.into_iter().map(String::from).collect();
    dead.sort();
    assert_eq!(replayed, dead);
}

/// The same move through the binary: `webhook-operator export` from an embedded queue's
/// data directory, `webhook-operator import --queue jetstream` twice; every waiting event
/// is delivered once and the second import reports all of them already there.
#[tokio::test]
async fn export_and_import_through_the_binary_deliver_each_event_once() {
    use webhook_operator::queue::{RedbQueue, RedbQueueOptions};

    let dir = tempfile::tempdir().unwrap();
    let ep = EndpointKey::new("apps", "moving");
    let ids: Vec<String> = {
        let embedded =
            RedbQueue::open(dir.path().join("queue.redb"), RedbQueueOptions::default()).unwrap();
        let batch = (0..50)
            .map(|i| event(&ep, &format!("k{i}"), &format!("{{\"n\":{i}}}")))
            .collect();
        let out = embedded.enqueue(batch).await.unwrap();
        out.iter().map(accepted_id).collect()
        // Dropped: the file is free for the export, as with the operator stopped.
    };
    let file = dir.path().join("moving.jsonl");
    let bin = env!("CARGO_BIN_EXE_webhook-operator");
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {stderr}");
        println!("{}", stderr.trim());
        stderr
    };
    run(vec![
        "export".into(),
        "apps/moving".into(),
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--output".into(),
        file.display().to_string(),
    ]);
    let server = NatsServer::start();
    let import = || {
        run(vec![
            "import".into(),
            "--queue".into(),
            "jetstream".into(),
            "--nats-url".into(),
            server.url(),
            "--input".into(),
            file.display().to_string(),
        ])
    };
    assert!(import().contains("imported 50 events, 0 already there"));
    assert!(import().contains("imported 0 events, 50 already there"));

    let js = connect(&server).await;
    let got = lease_n(&js, &ep, ids.len() + 1, Duration::from_secs(3)).await;
    let mut leased: Vec<String> = got.iter().map(|e| e.id.clone()).collect();
    leased.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(leased, want, "each event once, with its id");
}
