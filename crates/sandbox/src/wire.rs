//! The simulators' own wire types and signatures, written from the providers' documents
//! (PROVIDERS.md and the documents it cites), never taken from the operator's clients: a
//! mistake in a client's request or response shape then meets a simulator that does not
//! share it, and the conformance tests fail.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};

/// The providers simulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    Atlas,
    Atomic,
    Smallest,
    Atllas,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Atlas,
        Provider::Atomic,
        Provider::Smallest,
        Provider::Atllas,
    ];

    /// The path segment under `/_control/`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Atlas => "atlas",
            Provider::Atomic => "atomic",
            Provider::Smallest => "smallest",
            Provider::Atllas => "atllas",
        }
    }

    /// The event names each provider documents.
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

/// How a delivery signature's bytes are written in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// HMAC-SHA256 of `body` keyed by `secret`, as the provider writes it in its header.
pub fn sign(secret: &[u8], body: &[u8], encoding: SignatureEncoding) -> String {
    use base64::Engine;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    match encoding {
        SignatureEncoding::Hex => hex::encode(bytes),
        SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

pub mod atlas {
    use super::*;

    /// The `provider` field of a subscription made through the API.
    pub const PROVIDER_CUSTOM: &str = "custom";

    /// A trigger subscription: what subscribe answers (`id`, `campaignId`,
    /// `triggerName`) and one element of the list answer (all five).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct TriggerSubscription {
        pub id: String,
        pub hook_url: String,
        pub campaign_id: String,
        pub trigger_name: String,
        pub provider: String,
    }
}

pub mod atllas {
    /// The `type` of an outbound event: the webhook's, and the portal's Test button's.
    pub const EVENT_TYPES: [&str; 2] = ["call.finished", "call.completed"];
}

pub mod atomic {
    use super::*;

    /// The signature header (an assumption: the scheme is not public).
    pub const SIGNATURE_HEADER: &str = "x-atomic-signature";
    /// The event type of the test a `POST .../webhook/{id}/test` sends.
    pub const TEST_EVENT: &str = "webhook-test";

    /// `POST` (the default) or `PUT`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
    pub enum Method {
        #[default]
        #[serde(rename = "POST")]
        Post,
        #[serde(rename = "PUT")]
        Put,
    }

    /// A webhook in the create and list answers (`data`).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Webhook {
        pub id: String,
        pub types: Vec<String>,
        pub url: String,
        #[serde(default)]
        pub headers: BTreeMap<String, String>,
        #[serde(default)]
        pub secret: Option<String>,
        pub created: String,
        pub updated: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub card_template_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action_flow_config_id: Option<String>,
        /// Assumed field: the documents show no method in the answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub method: Option<Method>,
        /// Assumed field: a disabled webhook stays listed with `enabled: false`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub enabled: Option<bool>,
    }
}

pub mod smallest {
    use super::*;

    /// The signature header: lowercase hex HMAC-SHA256 of the raw body.
    pub const SIGNATURE_HEADER: &str = "x-signature";

    /// A reference answered as a plain id or populated (`{_id, name, description}`).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(untagged)]
    pub enum IdRef {
        Id(String),
        Populated(Populated),
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Populated {
        #[serde(rename = "_id")]
        pub id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub description: Option<String>,
    }

    /// `{_id, webhookId, agentId, eventType, createdAt, updatedAt}`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Subscription {
        #[serde(rename = "_id")]
        pub id: String,
        pub webhook_id: IdRef,
        pub agent_id: IdRef,
        pub event_type: String,
        #[serde(default)]
        pub created_at: Option<String>,
        #[serde(default)]
        pub updated_at: Option<String>,
    }

    /// A webhook as get and list answer it.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Webhook {
        #[serde(rename = "_id")]
        pub id: String,
        pub url: String,
        #[serde(default)]
        pub description: String,
        /// `enabled` or `disabled`.
        pub status: String,
        #[serde(default)]
        pub organization_id: Option<String>,
        #[serde(default)]
        pub created_by: Option<String>,
        #[serde(default)]
        pub subscriptions: Vec<Subscription>,
        /// The signing secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub decrypted_secret_key: Option<String>,
        #[serde(default)]
        pub created_at: Option<String>,
        #[serde(default)]
        pub updated_at: Option<String>,
    }
}
