//! Why an endpoint is not Ready, or why a request on it was refused: one type for every
//! step of the pass. [`EndpointProblem::reason`] is the stable label: the condition's
//! reason and the Event's.

use crate::api::conditions::reasons;

/// A problem of the endpoint pass, by the step that found it. Each carries a message
/// without any secret value.
#[derive(Clone, Debug, PartialEq)]
pub enum EndpointProblem {
    /// Tenant isolation refuses `spec.destination` (nothing is handed to the data plane).
    DestinationRefused(&'static str, String),
    /// The build cannot finish: a Secret it needs is missing, not ours or not referable.
    Build(&'static str, String),
    /// `spec.filter` does not compile.
    FilterInvalid(String),
    /// `spec.dedupe` does not compile.
    DedupeInvalid(String),
    /// The data plane refused the configuration (token, header, signing secret).
    ConfigureRefused(&'static str, String),
    /// Events cannot leave at all, as the delivery worker found (e.g. a forbidden address).
    Destination(&'static str, String),
    /// The replay annotations do not make a request.
    ReplayInvalid(String),
}

impl EndpointProblem {
    /// The stable, low-cardinality label: a condition reason or an Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::DestinationRefused(r, _)
            | Self::Build(r, _)
            | Self::ConfigureRefused(r, _)
            | Self::Destination(r, _) => r,
            Self::FilterInvalid(_) => reasons::FILTER_INVALID,
            Self::DedupeInvalid(_) => reasons::DEDUPE_INVALID,
            Self::ReplayInvalid(_) => "ReplayInvalid",
        }
    }

    /// The user-facing message.
    pub fn message(&self) -> String {
        match self {
            Self::DestinationRefused(_, m)
            | Self::Build(_, m)
            | Self::ConfigureRefused(_, m)
            | Self::Destination(_, m)
            | Self::ReplayInvalid(m) => m.clone(),
            Self::FilterInvalid(e) => format!("spec.filter: {e}"),
            Self::DedupeInvalid(e) => format!("spec.dedupe: {e}"),
        }
    }
}
