//! The controller's translation between the API's types and those of the data plane and
//! the providers: neither knows a CRD type, so what crosses (a provider, a signature
//! encoding, a delivery policy, a format, delivery figures, condition reasons) is
//! converted here, in one place.

use crate::api::endpoint as api;
use crate::delivery::{Backoff, DeliveryFormat, Policy};
use crate::duration::{DurationError, parse_go_duration};
use crate::health::DeliveryStats;

/// `spec.provider`.
pub fn provider(p: crate::api::Provider) -> crate::providers::Provider {
    use crate::api::Provider as Api;
    use crate::providers::Provider;
    match p {
        Api::Atlas => Provider::Atlas,
        Api::Atomic => Provider::Atomic,
        Api::Smallest => Provider::Smallest,
        Api::Atllas => Provider::Atllas,
    }
}

/// `spec.atomic.signatureEncoding`.
pub fn signature_encoding(
    e: crate::api::subscription::SignatureEncoding,
) -> crate::inbound::SignatureEncoding {
    use crate::api::subscription::SignatureEncoding as Api;
    use crate::inbound::SignatureEncoding;
    match e {
        Api::Hex => SignatureEncoding::Hex,
        Api::Base64 => SignatureEncoding::Base64,
    }
}

/// `spec.atomic.method`.
pub fn atomic_method(m: crate::api::subscription::AtomicMethod) -> crate::providers::AtomicMethod {
    use crate::api::subscription::AtomicMethod as Api;
    use crate::providers::AtomicMethod;
    match m {
        Api::Post => AtomicMethod::Post,
        Api::Put => AtomicMethod::Put,
    }
}

/// `spec.delivery`, parsed once.
pub fn policy(p: &api::DeliveryPolicy) -> Result<Policy, DurationError> {
    Ok(Policy {
        timeout: parse_go_duration(&p.timeout)?,
        max_attempts: p.retry.max_attempts.max(1) as u32,
        backoff: match p.retry.backoff {
            api::Backoff::Exponential => Backoff::Exponential,
            api::Backoff::Linear => Backoff::Linear,
        },
        initial_delay: parse_go_duration(&p.retry.initial_delay)?,
        max_delay: parse_go_duration(&p.retry.max_delay)?,
        max_age: parse_go_duration(&p.retry.max_age)?,
        max_in_flight: p.max_in_flight.max(1),
        adaptive_concurrency: p.adaptive_concurrency,
        rate_per_second: p.rate_per_second,
        dead_letter_retention: parse_go_duration(&p.dead_letter.retention)?,
    })
}

/// `spec.format`.
pub fn format(f: api::DeliveryFormat) -> DeliveryFormat {
    match f {
        api::DeliveryFormat::Default => DeliveryFormat::Default,
        api::DeliveryFormat::Cloudevents => DeliveryFormat::Cloudevents,
    }
}

/// The data plane's figures as `status.delivery`.
pub fn delivery_stats(s: DeliveryStats) -> api::DeliveryStats {
    let time =
        |t: Option<jiff::Timestamp>| t.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
    api::DeliveryStats {
        delivered: s.delivered,
        failed: s.failed,
        retrying: s.retrying,
        dead_lettered: s.dead_lettered,
        malformed: s.malformed,
        filter_errors: s.filter_errors,
        consecutive_failures: s.consecutive_failures,
        failure_ratio: s.failure_ratio,
        last_success_time: time(s.last_success_time),
        last_failure_time: time(s.last_failure_time),
        last_error: s.last_error,
        latency_p50_ms: s.latency_p50_ms,
        latency_p99_ms: s.latency_p99_ms,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::conditions::reasons as api_reasons;
    use crate::health::reasons;

    #[test]
    fn api_defaults_convert_to_the_data_planes_defaults() {
        let p = policy(&api::DeliveryPolicy::default()).unwrap();
        assert_eq!(p, Policy::default());
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(p.max_attempts, 8);
        assert_eq!(p.max_delay, Duration::from_secs(300));
        assert_eq!(p.dead_letter_retention, Duration::from_secs(168 * 3600));
        let mut bad = api::DeliveryPolicy::default();
        bad.retry.max_age = "forever".into();
        assert!(policy(&bad).is_err());
    }

    /// The data plane's reasons pass through to conditions unchanged.
    #[test]
    fn data_plane_reasons_are_condition_reasons() {
        for (ours, theirs) in [
            (reasons::DELIVERING, api_reasons::DELIVERING),
            (reasons::NO_DELIVERIES, api_reasons::NO_DELIVERIES),
            (reasons::DELIVERY_FAILING, api_reasons::DELIVERY_FAILING),
            (reasons::DEGRADED, api_reasons::DEGRADED),
            (reasons::BACKLOGGED, api_reasons::BACKLOGGED),
            (
                reasons::DESTINATION_UNRESOLVABLE,
                api_reasons::DESTINATION_UNRESOLVABLE,
            ),
            (
                reasons::DESTINATION_FORBIDDEN,
                api_reasons::DESTINATION_FORBIDDEN,
            ),
            (
                reasons::TLS_HANDSHAKE_FAILED,
                api_reasons::TLS_HANDSHAKE_FAILED,
            ),
        ] {
            assert_eq!(ours, theirs);
        }
    }
}
