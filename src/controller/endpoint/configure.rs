//! Step 4: hand the delivery settings to the data plane, or withdraw them.

use super::problem::EndpointProblem;
use super::validate::Validated;
use crate::controller::Context;
use crate::controller::routes::EndpointKey;

/// Configures the endpoint when validation found nothing; withdraws an earlier
/// configuration when isolation refuses the destination. A refusal of the data plane
/// joins the problems.
pub fn configure(ctx: &Context, key: &EndpointKey, validated: &mut Validated) {
    if validated.refused {
        ctx.routes.0.remove_endpoint(key.clone());
    } else if let (true, Some(delivery)) = (validated.problems.is_empty(), &validated.delivery)
        && let Err((reason, msg)) = ctx.routes.0.configure_endpoint(delivery)
    {
        validated
            .problems
            .push(EndpointProblem::ConfigureRefused(reason, msg));
    }
}
