//! The JetStream queue against a real nats-server: durability, dedupe across replicas,
//! exclusive leases, redelivery after the lease timeout, retry delays, dead letters,
//! replay and pruning, and failing (never succeeding) while the server is away.

#[path = "common/nats.rs"]
mod nats;

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
        payload: Bytes::from(payload.to_string()),
        received: SystemTime::now(),
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
