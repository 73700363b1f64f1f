//! Throughput sanity check of the whole data plane on loopback: concurrent providers POST
//! single events to the ingress, a consumer counts deliveries. Prints events/s end to end.
//!
//! `cargo run --release --example dataplane_throughput -- [events] [concurrency]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use webhook_operator::api::Provider;
use webhook_operator::dataplane::{
    DataPlane, DataPlaneConfig, EndpointConfig, EndpointKey, SubscriptionRoute,
};
use webhook_operator::delivery::{Destination, Policy, SigningSecret};
use webhook_operator::inbound::{
    InboundEvent, InboundParser, InboundRequest, Rejection, VerificationKeys,
};

/// Takes the body as one event; the dedupe key is the `x-id` header.
struct PassThrough;

impl InboundParser for PassThrough {
    fn parse(
        &self,
        _: Provider,
        _: &VerificationKeys,
        req: &InboundRequest<'_>,
    ) -> Result<Vec<InboundEvent>, Rejection> {
        let id = req
            .headers
            .get("x-id")
            .and_then(|v| v.to_str().ok())
            .ok_or(Rejection::BadRequest("no id"))?;
        Ok(vec![InboundEvent {
            event_type: "bench".into(),
            dedupe_key: id.to_owned(),
            payload: Bytes::copy_from_slice(req.body),
            test: false,
        }])
    }
}

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let events: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let concurrency: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);

    let delivered = Arc::new(AtomicU64::new(0));
    let counter = delivered.clone();
    let consumer = serve(axum::Router::new().route(
        "/in",
        axum::routing::post(move || {
            let c = counter.clone();
            async move {
                c.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    ))
    .await;

    let dir = tempfile::tempdir()?;
    let config = DataPlaneConfig {
        queue_path: dir.path().join("bench.redb"),
        resolve_overrides: vec![("sink.bench.svc:80".into(), consumer)],
        ..Default::default()
    };
    let dp = DataPlane::open(config, Arc::new(PassThrough)).await?;
    let key = EndpointKey::new("bench", "ep");
    dp.upsert_endpoint(EndpointConfig {
        key: key.clone(),
        token: "benchtoken".into(),
        destination: Destination::Service {
            name: "sink".into(),
            namespace: "bench".into(),
            port: 80,
            path: "/in".into(),
        },
        policy: Policy {
            max_in_flight: 256,
            ..Policy::default()
        },
        signing_secrets: vec![SigningSecret::parse(b"bench-secret")?],
        headers: vec![],
        event_types: vec![],
    })?;
    dp.upsert_subscription(SubscriptionRoute {
        endpoint: key,
        name: "s".into(),
        provider: Provider::Atlas,
        keys: VerificationKeys::default(),
    });
    let ingress = serve(dp.ingress_router()).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let delivery = dp.start_delivery(async move {
        let _ = stopped.await;
    });

    let client = reqwest::Client::new();
    let url = format!("http://{ingress}/hooks/benchtoken/s");
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let posters: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, next) = (client.clone(), url.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= events {
                        break;
                    }
                    let body = format!("{{\"type\":\"bench\",\"n\":{i},\"pad\":\"0123456789abcdef0123456789abcdef\"}}");
                    let r = client.post(&url).header("x-id", i.to_string()).body(body).send().await;
                    assert_eq!(r.map(|r| r.status().as_u16()).ok(), Some(200));
                }
            })
        })
        .collect();
    for p in posters {
        p.await?;
    }
    let ingested = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while delivered.load(Ordering::Relaxed) < events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = start.elapsed();
    let n = delivered.load(Ordering::Relaxed);
    println!(
        "{events} events, {concurrency} concurrent posters: ingested in {:.2}s ({:.0}/s), delivered {n} in {:.2}s ({:.0}/s end to end)",
        ingested.as_secs_f64(),
        events as f64 / ingested.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    let _ = stop.send(());
    delivery.await?;
    Ok(())
}
