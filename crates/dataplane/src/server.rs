//! The HTTP server loop of the ingress and ops listeners, with the bounds a public listener
//! needs and `axum::serve` does not set: a connection limit (past it, new connections wait
//! in the kernel's accept queue) and a deadline for a request's headers, counted from the
//! moment the connection is accepted or its last answer was ready: a client that sends
//! nothing, one byte, or trickles its headers is disconnected, so idle sockets cannot hold
//! the connection limit. Body deadlines and the request concurrency limit are kept by the
//! ingress handler itself (`ingress::hook`, `ingress::limits`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// From the moment a connection is accepted (or its last answer was ready) to the end
    /// of the next request's headers.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for requests under way.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets requests under way finish
/// (within the grace period). Connections closed at the header deadline are counted as
/// `header_timeout`, and each time the connection limit makes a connection wait as
/// `connection_limit`, in `webhook_operator_requests_rejected_total`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let max = limits
        .max_connections
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        let Some(slot) = connection_slot(&slots, &metrics, &shutdown).await else {
            break;
        };
        let Some(stream) = accept(&listener, &shutdown).await else {
            break;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let service = Tracked {
            inner: TowerToHyperService::new(router.clone()),
            activity: activity.clone(),
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let deadline = limits.header_read_timeout;
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = activity.idle_past(deadline) => {
                    // No request under way and none begun in time: nothing to lose.
                    metrics.rejected("header_timeout");
                    drop(slot);
                    return;
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended
                && e.downcast_ref::<hyper::Error>()
                    .is_some_and(|e| e.is_timeout())
            {
                metrics.rejected("header_timeout");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every connection holds a slot until it ends: all slots back means all ended.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// A free connection slot, counting a wait for one as `connection_limit`; none on shutdown.
async fn connection_slot(
    slots: &Arc<tokio::sync::Semaphore>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    metrics.rejected("connection_limit");
    tokio::select! {
        slot = slots.clone().acquire_owned() => Some(slot.expect("never closed")),
        _ = shutdown.cancelled() => None,
    }
}

/// The next connection; none on shutdown.
async fn accept(listener: &TcpListener, shutdown: &CancellationToken) -> Option<TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// What one connection is doing: how many requests are under way, and since when it has
/// had none.
struct Activity(std::sync::Mutex<(usize, tokio::time::Instant)>);

impl Activity {
    fn new() -> Self {
        Self(std::sync::Mutex::new((0, tokio::time::Instant::now())))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, (usize, tokio::time::Instant)> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves once the connection has had no request under way for `limit`: from its
    /// accept, or from the moment its last answer was ready.
    async fn idle_past(&self, limit: Duration) {
        loop {
            let now = tokio::time::Instant::now();
            let next = match *self.state() {
                (0, idle_since) if now >= idle_since + limit => return,
                (0, idle_since) => idle_since + limit,
                // Under way: look again later (its end moves `idle_since`).
                _ => now + limit.min(Duration::from_secs(1)),
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// Counts the requests of one connection under way, for [`Activity::idle_past`].
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// Marks a request under way until dropped (its answer is ready, or it was cancelled).
struct UnderWay(Arc<Activity>);

impl UnderWay {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.state().0 += 1;
        Self(activity.clone())
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.0 -= 1;
        state.1 = tokio::time::Instant::now();
    }
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, request: R) -> Self::Future {
        let under_way = UnderWay::begin(&self.activity);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(under_way);
            answer
        })
    }
}
