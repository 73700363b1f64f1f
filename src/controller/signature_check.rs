//! The `SignaturesVerified` condition of a WebhookSubscription: whether the provider's
//! deliveries pass the ingress' signature (or header secret) check. Several signature
//! schemes are guesses (PROVIDERS.md); this is how a user sees at once that a guess is
//! wrong for their account.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::conditions::{self, Desired};
use crate::api::Provider;
use crate::api::conditions::{reasons, types};
use crate::api::subscription::{
    DEFAULT_ATOMIC_SIGNATURE_HEADER, EventCounters, SignatureEncoding, WebhookSubscriptionSpec,
};

/// None until a delivery fails verification; then False while the latest verification
/// outcome is a failure, True once a delivery verified after the last failure.
pub fn desired(spec: &WebhookSubscriptionSpec, events: Option<&EventCounters>) -> Option<Desired> {
    let ev = events.filter(|e| e.signature_mismatches > 0)?;
    let last_bad = ev.last_signature_mismatch_time.as_ref().map(|t| t.0);
    let last_good = ev.last_received_time.as_ref().map(|t| t.0);
    let failing = match (last_bad, last_good) {
        // Times are whole seconds: a tie goes to the delivery that verified.
        (Some(bad), Some(good)) => bad > good,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    // No count or time in the message (they are in status.events): the condition then
    // changes only when verification flips, and each change costs a full pass.
    Some(if failing {
        Desired::new(
            types::SIGNATURES_VERIFIED,
            false,
            reasons::SIGNATURE_MISMATCH,
            format!(
                "deliveries are refused: {} (how many and when: status.events.signatureMismatches, lastSignatureMismatchTime)",
                expectation(spec)
            ),
        )
    } else {
        Desired::new(
            types::SIGNATURES_VERIFIED,
            true,
            reasons::SIGNATURES_VERIFY_AGAIN,
            "deliveries verify again after earlier refusals (status.events.signatureMismatches)",
        )
    })
}

/// Whether `desired` differs from the `SignaturesVerified` condition in `existing`.
pub fn changed(existing: &[Condition], desired: Option<&Desired>) -> bool {
    let current = existing
        .iter()
        .find(|c| c.type_ == types::SIGNATURES_VERIFIED);
    match (current, desired) {
        (None, None) => false,
        (Some(c), Some(d)) => {
            c.status != if d.status { "True" } else { "False" }
                || c.reason != d.reason
                || c.message != d.message
        }
        _ => true,
    }
}

/// What the ingress checks, and what to change if the provider does otherwise.
fn expectation(spec: &WebhookSubscriptionSpec) -> String {
    let (header, encoding) = spec.signature_scheme();
    let encoding = match encoding {
        SignatureEncoding::Hex => "hex",
        SignatureEncoding::Base64 => "base64",
    };
    match spec.provider {
        Provider::Atomic => format!(
            "the HMAC-SHA256 signature in header {} ({encoding}) did not verify with the webhook's secret; Atomic does not document its scheme, so if your account signs differently set spec.atomic.signature (header, encoding)",
            header.as_deref().unwrap_or(DEFAULT_ATOMIC_SIGNATURE_HEADER)
        ),
        Provider::Smallest => "the X-Signature header (hex HMAC-SHA256) did not verify with the webhook's secret".into(),
        Provider::Atllas => "the configured header did not carry the value in the Secret named in status.manualSetup.secretName; check the header in the Atllas portal".into(),
        Provider::Atlas => "the request did not verify".into(),
    }
}

/// `base` with its `SignaturesVerified` condition replaced by `desired` (left out when
/// None); the transition time carries over from `previous`.
pub fn merged(
    base: &[Condition],
    previous: &[Condition],
    desired: Option<&Desired>,
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = base
        .iter()
        .filter(|c| c.type_ != types::SIGNATURES_VERIFIED)
        .cloned()
        .collect();
    if let Some(d) = desired {
        out.extend(conditions::merge(
            previous,
            std::slice::from_ref(d),
            generation,
            now,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Option<Time> {
        Some(Time(jiff::Timestamp::from_second(secs).unwrap()))
    }

    fn spec() -> WebhookSubscriptionSpec {
        serde_json::from_value(serde_json::json!({
            "provider": "atomic", "events": ["card-completed"], "url": "http://x",
            "credentialsRef": {"name": "c"},
            "atomic": {"organizationId": "o", "environmentId": "e",
                       "signature": {"header": "X-Sig", "encoding": "base64"}}
        }))
        .unwrap()
    }

    #[test]
    fn mismatch_is_reported_until_a_delivery_verifies() {
        let s = spec();
        assert!(desired(&s, None).is_none());
        let mut ev = EventCounters {
            received: 3,
            last_received_time: t(100),
            ..Default::default()
        };
        assert!(desired(&s, Some(&ev)).is_none());
        ev.signature_mismatches = 2;
        ev.last_signature_mismatch_time = t(200);
        let d = desired(&s, Some(&ev)).unwrap();
        assert!(!d.status);
        assert_eq!(d.reason, reasons::SIGNATURE_MISMATCH);
        assert!(
            d.message.contains("X-Sig") && d.message.contains("base64"),
            "{}",
            d.message
        );
        assert!(d.message.contains("spec.atomic.signature"), "{}", d.message);
        let written = merged(&[], &[], Some(&d), Some(1), t(200).unwrap());
        assert!(!changed(&written, Some(&d)));
        // Another refusal does not change the condition (no extra full pass).
        ev.signature_mismatches = 3;
        ev.last_signature_mismatch_time = t(250);
        assert!(!changed(&written, desired(&s, Some(&ev)).as_ref()));
        ev.last_received_time = t(300);
        let d = desired(&s, Some(&ev)).unwrap();
        assert!(d.status);
        assert_eq!(d.reason, reasons::SIGNATURES_VERIFY_AGAIN);
        assert!(changed(&written, Some(&d)));
        assert!(changed(&written, None));
        assert!(!changed(&[], None));
    }
}
