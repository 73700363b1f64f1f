//! Step 3: everything that decides whether the endpoint can be delivered, in one place:
//! tenant isolation of the destination, the build of the delivery settings from the
//! Secrets, and `spec.filter` and `spec.dedupe` as the build compiled them.

use kube::ResourceExt;

use super::problem::EndpointProblem;
use super::rotation::Rotated;
use crate::api::endpoint::{INGRESS_SECRET_KEY, WebhookEndpoint};
use crate::controller::Context;
use crate::controller::build::{self, SecretRead, ingress_token};
use crate::controller::routes::EndpointDelivery;

/// What validation hands to the data-plane configuration and the status.
pub struct Validated {
    /// Every problem, the one reported first first.
    pub problems: Vec<EndpointProblem>,
    /// Isolation refuses the destination: nothing may be delivered.
    pub refused: bool,
    /// The delivery settings, when the build finished.
    pub delivery: Option<EndpointDelivery>,
    /// The ingress path token, once the ingress key exists.
    pub token: Option<String>,
    /// The signing secret in force, for its hash in status.
    pub signing_secret: Option<Vec<u8>>,
}

pub fn validate(ep: &WebhookEndpoint, ctx: &Context, rotated: &Rotated) -> Validated {
    let fetched = &rotated.fetched;
    let mut problems = Vec::new();
    // A refused destination is reported first and nothing is handed to the data plane, so
    // nothing is delivered (an earlier configuration is withdrawn).
    let refused = ctx
        .destinations
        .check(&ep.spec.destination, &ep.namespace().unwrap_or_default())
        .map_err(|(reason, msg)| problems.push(EndpointProblem::DestinationRefused(reason, msg)))
        .is_err();
    let signing_secret = fetched
        .owned(&ep.metadata, &ep.signing_secret_name())
        .ok()
        .flatten()
        .and_then(|owned| build::signing_secret(ep, fetched, &owned).ok());
    let delivery = build::endpoint_delivery(ep, fetched)
        .map_err(|p| {
            problems.extend(p.into_iter().map(|(r, m)| EndpointProblem::Build(r, m)));
        })
        .ok();
    // The build compiled `spec.filter` and `spec.dedupe`. Without a build the endpoint is
    // not Ready for the build's first problem already, whatever the expressions.
    if let Some(Err(e)) = delivery.as_ref().map(|d| &d.filter) {
        problems.push(EndpointProblem::FilterInvalid(e.clone()));
    }
    if let Some(Err(e)) = delivery.as_ref().map(|d| &d.dedupe) {
        problems.push(EndpointProblem::DedupeInvalid(e.clone()));
    }
    let token = fetched
        .owned(&ep.metadata, &ep.ingress_secret_name())
        .ok()
        .flatten()
        .and_then(|d| d.get(INGRESS_SECRET_KEY).map(|k| ingress_token(k)));
    Validated {
        problems,
        refused,
        delivery,
        token,
        signing_secret,
    }
}
