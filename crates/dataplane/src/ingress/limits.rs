//! Bounds the ingress keeps before it stores anything: how many events and bytes may wait
//! in the queue (per endpoint and overall), how much disk the queue must leave free, and how many
//! requests are handled at once. A refusal is a 503 with `Retry-After`, counted in
//! `webhook_operator_requests_rejected_total` by reason; an endpoint at its bound says so in
//! its `Healthy` condition (reason `Backlogged`). Nothing already stored is ever dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{EndpointRoute, Ingress};
use crate::metrics::Metrics;
use crate::queue::{EndpointKey, Queue};

/// The ingress's bounds on what waits. Zero disables a bound.
#[derive(Debug)]
pub struct Limits {
    /// Events waiting (pending or being delivered) across all endpoints.
    pub max_queued_events: u64,
    /// Events waiting for one endpoint, unless the endpoint sets its own.
    pub max_endpoint_queued_events: u64,
    /// Stored bytes waiting across all endpoints (queues that count them).
    pub max_queued_bytes: u64,
    /// Stored bytes waiting for one endpoint, unless the endpoint sets its own.
    pub max_endpoint_queued_bytes: u64,
    /// Free space the queue's filesystem must keep.
    pub disk: Option<DiskSpace>,
    /// The `Retry-After` of a refusal.
    pub retry_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued_events: 0,
            max_endpoint_queued_events: 0,
            max_queued_bytes: 0,
            max_endpoint_queued_bytes: 0,
            disk: None,
            retry_after: Duration::from_secs(5),
        }
    }
}

/// Which bound refused an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Full {
    Endpoint { waiting: u64, limit: u64 },
    Total { waiting: u64, limit: u64 },
    EndpointBytes { waiting: u64, limit: u64 },
    TotalBytes { waiting: u64, limit: u64 },
    Disk { free: u64, min_free: u64 },
}

impl Full {
    /// The `reason` label of the refusal counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Full::Endpoint { .. } => "endpoint_backlogged",
            Full::Total { .. } => "queue_backlogged",
            Full::EndpointBytes { .. } => "endpoint_bytes_backlogged",
            Full::TotalBytes { .. } => "queue_bytes_backlogged",
            Full::Disk { .. } => "disk_low",
        }
    }

    /// For the `Backlogged` condition's message.
    pub fn describe(&self) -> String {
        match self {
            Full::Endpoint { waiting, limit } => {
                format!("{waiting} events waiting for this endpoint (limit {limit})")
            }
            Full::Total { waiting, limit } => {
                format!("{waiting} events waiting in the queue of all endpoints (limit {limit})")
            }
            Full::EndpointBytes { waiting, limit } => {
                format!("{waiting} bytes waiting for this endpoint (limit {limit})")
            }
            Full::TotalBytes { waiting, limit } => {
                format!("{waiting} bytes waiting in the queue of all endpoints (limit {limit})")
            }
            Full::Disk { free, min_free } => {
                format!("the queue's disk has {free} bytes free (minimum {min_free})")
            }
        }
    }
}

impl Limits {
    /// The first bound an event for `key` would cross, if any. `own` are the endpoint's
    /// own bounds (its spec: events, bytes), else the defaults apply. The check reads counts
    /// the queue keeps in memory; concurrent requests may pass it together, so a bound can
    /// be exceeded by at most the requests in flight.
    pub fn check(
        &self,
        queue: &dyn Queue,
        key: &EndpointKey,
        own: (Option<u64>, Option<u64>),
    ) -> Option<Full> {
        if let Some(disk) = &self.disk
            && let Some(free) = disk.free_bytes()
            && free < disk.min_free
        {
            return Some(Full::Disk {
                free,
                min_free: disk.min_free,
            });
        }
        let limit = own.0.unwrap_or(self.max_endpoint_queued_events);
        if limit > 0 {
            let d = queue.endpoint_depth(key);
            let waiting = d.pending + d.leased;
            if waiting >= limit {
                return Some(Full::Endpoint { waiting, limit });
            }
        }
        if self.max_queued_events > 0 {
            let d = queue.depth();
            let waiting = d.pending + d.leased;
            if waiting >= self.max_queued_events {
                return Some(Full::Total {
                    waiting,
                    limit: self.max_queued_events,
                });
            }
        }
        let limit = own.1.unwrap_or(self.max_endpoint_queued_bytes);
        if limit > 0
            && let Some(waiting) = queue.waiting_bytes(Some(key))
            && waiting >= limit
        {
            return Some(Full::EndpointBytes { waiting, limit });
        }
        if self.max_queued_bytes > 0
            && let Some(waiting) = queue.waiting_bytes(None)
            && waiting >= self.max_queued_bytes
        {
            return Some(Full::TotalBytes {
                waiting,
                limit: self.max_queued_bytes,
            });
        }
        None
    }
}

/// Admits a request for `route` or answers it: 503 with `Retry-After` at a bound. Keeps the
/// endpoint's `Backlogged` state in the health registry current either way.
pub(super) fn admit(ing: &Ingress, route: &EndpointRoute) -> Option<Response> {
    let full = ing.limits.check(
        &*ing.queue,
        &route.key,
        (route.max_queued_events, route.max_queued_bytes),
    );
    ing.health
        .set_backlog(&route.key, full.as_ref().map(Full::describe));
    let full = full?;
    Some(unavailable(
        &ing.metrics,
        full.reason(),
        ing.limits.retry_after,
    ))
}

/// A counted 503 with `Retry-After` and a JSON reason.
pub(super) fn unavailable(metrics: &Metrics, reason: &'static str, retry: Duration) -> Response {
    metrics.rejected(reason);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (
                http::header::RETRY_AFTER,
                retry.as_secs().max(1).to_string(),
            ),
            (http::header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        format!("{{\"error\":\"{reason}\"}}"),
    )
        .into_response()
}

/// Free space of the filesystem that holds a path, read at most every 250 ms.
#[derive(Debug)]
pub struct DiskSpace {
    path: PathBuf,
    pub min_free: u64,
    free: AtomicU64,
    /// Milliseconds since `start` of the last read; `u64::MAX` before the first.
    read_at: AtomicU64,
    start: Instant,
}

const DISK_REFRESH_MS: u64 = 250;

impl DiskSpace {
    pub fn new(path: impl Into<PathBuf>, min_free: u64) -> Self {
        Self {
            path: path.into(),
            min_free,
            free: AtomicU64::new(0),
            read_at: AtomicU64::new(u64::MAX),
            start: Instant::now(),
        }
    }

    /// Bytes available to an unprivileged writer; `None` when the filesystem cannot be read.
    pub fn free_bytes(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64;
        let last = self.read_at.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < DISK_REFRESH_MS {
            return Some(self.free.load(Ordering::Relaxed));
        }
        let free = statvfs_free(&self.path)?;
        self.free.store(free, Ordering::Relaxed);
        self.read_at.store(now, Ordering::Relaxed);
        Some(free)
    }
}

fn statvfs_free(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by the call before
    // it is read (only when the call succeeds).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// At most `max` requests are handled at once; the next one is answered 503 with
/// `Retry-After` at once (counted as `overloaded`) instead of waiting in memory.
#[derive(Clone)]
pub struct ConcurrencyLimit {
    permits: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
    retry_after: Duration,
}

impl ConcurrencyLimit {
    pub fn new(max: usize, metrics: Arc<Metrics>, retry_after: Duration) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            metrics,
            retry_after,
        }
    }

    /// A slot for one request, held until the returned guard drops; `None` past the
    /// limit (answer [`Self::overloaded`]).
    pub(super) fn take(&self) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let in_flight = self.metrics.requests_in_flight();
        in_flight.inc();
        Some(Slot {
            _permit: permit,
            in_flight,
        })
    }

    /// The 503 for a request past the limit.
    pub(super) fn overloaded(&self) -> Response {
        unavailable(&self.metrics, "overloaded", self.retry_after)
    }
}

/// One of the concurrency limit's slots, shown in `ingress_requests_in_flight` while it
/// is held; given back when the request ends or its connection is dropped.
pub(super) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    in_flight: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_count_waiting_events_per_endpoint_and_overall() {
        use crate::queue::{NewEvent, RedbQueue, RedbQueueOptions};
        let dir = tempfile::tempdir().unwrap();
        let q = RedbQueue::open(dir.path().join("q.redb"), RedbQueueOptions::default()).unwrap();
        let a = EndpointKey::new("ns", "a");
        let b = EndpointKey::new("ns", "b");
        let ev = |k: &EndpointKey, id: &str| NewEvent {
            endpoint: k.clone(),
            subscription: "s".into(),
            event_type: "t".into(),
            dedupe_key: id.into(),
            dedupe_window: None,
            payload: bytes::Bytes::from_static(b"{}"),
            received: std::time::SystemTime::now(),
            traceparent: None,
            headers: String::new(),
        };
        q.enqueue(vec![ev(&a, "1"), ev(&a, "2"), ev(&b, "3")])
            .await
            .unwrap();
        let limits = |total, per| Limits {
            max_queued_events: total,
            max_endpoint_queued_events: per,
            ..Limits::default()
        };
        // (limits, endpoint, its own bound, expected)
        let cases = [
            (limits(0, 0), &a, None, None),
            (limits(0, 3), &a, None, None),
            (
                limits(0, 2),
                &a,
                None,
                Some(Full::Endpoint {
                    waiting: 2,
                    limit: 2,
                }),
            ),
            (limits(0, 2), &b, None, None),
            (limits(0, 2), &a, Some(5), None),
            (
                limits(0, 100),
                &b,
                Some(1),
                Some(Full::Endpoint {
                    waiting: 1,
                    limit: 1,
                }),
            ),
            (
                limits(3, 0),
                &b,
                None,
                Some(Full::Total {
                    waiting: 3,
                    limit: 3,
                }),
            ),
            (limits(4, 0), &b, None, None),
        ];
        for (i, (l, key, own, want)) in cases.into_iter().enumerate() {
            assert_eq!(l.check(&q, key, (own, None)), want, "case {i}");
        }
        let disk = Limits {
            disk: Some(DiskSpace::new(dir.path(), u64::MAX)),
            ..Limits::default()
        };
        assert_eq!(
            disk.check(&q, &a, (None, None)).unwrap().reason(),
            "disk_low"
        );
    }

    #[tokio::test]
    async fn bounds_count_waiting_bytes_per_endpoint_and_overall() {
        use crate::queue::{NewEvent, RedbQueue, RedbQueueOptions};
        use std::time::SystemTime;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let a = EndpointKey::new("ns", "a");
        let b = EndpointKey::new("ns", "b");
        let ev = |k: &EndpointKey, id: &str, size: usize| NewEvent {
            endpoint: k.clone(),
            subscription: "s".into(),
            event_type: "t".into(),
            dedupe_key: id.into(),
            dedupe_window: None,
            payload: bytes::Bytes::from(vec![b'x'; size]),
            received: SystemTime::now(),
            traceparent: None,
            headers: String::new(),
        };
        {
            let q = RedbQueue::open(&path, RedbQueueOptions::default()).unwrap();
            q.enqueue(vec![
                ev(&a, "1", 4000),
                ev(&a, "2", 4000),
                ev(&b, "3", 1000),
            ])
            .await
            .unwrap();
        }
        // Counted from the file after a restart, as the ingress sees them.
        let q = RedbQueue::open(&path, RedbQueueOptions::default()).unwrap();
        let (on_a, on_b) = (
            q.waiting_bytes(Some(&a)).unwrap(),
            q.waiting_bytes(Some(&b)).unwrap(),
        );
        assert!(
            (8000..8600).contains(&on_a),
            "{on_a}: payloads and metadata"
        );
        assert!((1000..1300).contains(&on_b), "{on_b}");
        assert_eq!(q.waiting_bytes(None), Some(on_a + on_b));
        let limits = |total, per| Limits {
            max_queued_bytes: total,
            max_endpoint_queued_bytes: per,
            ..Limits::default()
        };
        let full_a = Some(Full::EndpointBytes {
            waiting: on_a,
            limit: on_a,
        });
        assert_eq!(limits(0, on_a).check(&q, &a, (None, None)), full_a);
        assert_eq!(limits(0, on_a + 1).check(&q, &a, (None, None)), None);
        assert_eq!(limits(0, on_a).check(&q, &b, (None, None)), None);
        // The endpoint's own bound wins over the default, either way.
        assert_eq!(limits(0, 1).check(&q, &a, (None, Some(on_a + 1))), None);
        assert_eq!(
            limits(0, 0).check(&q, &b, (None, Some(on_b))),
            Some(Full::EndpointBytes {
                waiting: on_b,
                limit: on_b,
            })
        );
        let total = limits(on_a + on_b, 0).check(&q, &b, (None, None)).unwrap();
        assert_eq!(total.reason(), "queue_bytes_backlogged");
        assert!(total.describe().contains("bytes"), "{}", total.describe());
        // Delivered events free their bytes: the bound lifts, nothing was dropped.
        let leased = q.lease(&a, 1, SystemTime::now()).await.unwrap();
        q.ack(&leased[0]).await.unwrap();
        assert!(q.waiting_bytes(Some(&a)).unwrap() < on_a / 2 + 300);
        assert_eq!(limits(0, on_a).check(&q, &a, (None, None)), None);
        assert_eq!(q.endpoint_depth(&a).pending, 1);
    }

    #[test]
    fn disk_space_reads_a_real_filesystem() {
        let d = DiskSpace::new("/", 0);
        assert!(d.free_bytes().is_some_and(|f| f > 0));
        assert!(DiskSpace::new("/no/such/dir", 0).free_bytes().is_none());
    }
}
