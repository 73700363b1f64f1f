//! Small types both kinds share.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A webhook provider the operator knows.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Atlas (youratlas.com): one subscription per campaign and trigger.
    Atlas,
    /// Atomic (atomic.io) Workbench webhooks, OAuth2 client credentials.
    Atomic,
    /// Smallest.ai Atoms agent webhooks.
    Smallest,
    /// Atllas (atll.as): receive-only, set up by hand in the Atllas portal.
    Atllas,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Atlas,
        Provider::Atomic,
        Provider::Smallest,
        Provider::Atllas,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Atlas => "atlas",
            Provider::Atomic => "atomic",
            Provider::Smallest => "smallest",
            Provider::Atllas => "atllas",
        }
    }

    /// The event names the provider documents; `spec.events` must be among them.
    pub fn event_names(self) -> &'static [&'static str] {
        match self {
            Provider::Atlas => &[
                "call_started",
                "call_completed",
                "message_received",
                "message_sent",
            ],
            Provider::Atomic => &[
                "card-published",
                "card-completed",
                "card-dismissed",
                "card-snoozed",
                "card-unsnoozed",
                "card-expired",
                "card-cancelled",
                "card-embargoed",
                "card-error",
                "card-displayed",
                "card-subview-displayed",
                "card-subview-exited",
            ],
            Provider::Smallest => &[
                "pre-conversation",
                "post-conversation",
                "analytics-completed",
            ],
            Provider::Atllas => &["call.finished", "call.completed"],
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key in a Secret in the same namespace as the resource.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Service name: an RFC 1035 DNS label.
pub const DNS_1035_LABEL: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// A namespace name: an RFC 1123 DNS label.
pub const DNS_1123_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// The CEL rule and OpenAPI pattern every duration field carries: Go duration syntax
/// such as `500ms`, `30s`, `5m`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";
