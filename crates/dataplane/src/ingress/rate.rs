//! Per-endpoint ingress rate limits (`spec.ingressRateLimit`): a token bucket per endpoint,
//! one token per request, taken before the body is read. A request that finds the bucket
//! empty is answered 429 with `Retry-After` (when the next token is due) and counted in
//! `webhook_operator_requests_rejected_total{reason="rate_limited"}`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{EndpointRoute, Ingress};

pub use crate::config::RateLimit;

/// One endpoint's bucket; starts full.
#[derive(Debug)]
pub struct Bucket {
    limit: RateLimit,
    /// Tokens left and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            state: Mutex::new((f64::from(limit.burst.max(1)), Instant::now())),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes a token, or says how long until the next one.
    pub fn take(&self) -> Result<(), Duration> {
        let rate = f64::from(self.limit.per_second.max(1));
        let burst = f64::from(self.limit.burst.max(1));
        let mut st = self.state.lock().expect("bucket lock");
        let now = Instant::now();
        st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * rate).min(burst);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - st.0) / rate))
        }
    }
}

/// Answers a request over `route`'s rate limit: 429 with `Retry-After`.
pub(super) fn check(ing: &Ingress, route: &EndpointRoute) -> Option<Response> {
    let wait = route.rate_limit.as_ref()?.take().err()?;
    ing.metrics.rejected("rate_limited");
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (http::header::RETRY_AFTER, seconds.to_string()),
                (http::header::CONTENT_TYPE, "application/json".to_owned()),
            ],
            "{\"error\":\"rate_limited\"}",
        )
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = Bucket::new(RateLimit {
            per_second: 10,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(b.take().is_ok());
        }
        let wait = b.take().unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(b.take().is_ok(), "a token is back after the wait it gave");
        assert!(b.take().is_err());
    }
}
