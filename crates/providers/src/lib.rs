//! Provider management clients and inbound parsers, one module per provider.
//!
//! Owns: the wire types of each provider's management API and deliveries, the clients
//! that make an upstream subscription match a [`DesiredSubscription`], and the
//! verification/normalisation of what a provider POSTs (implementing
//! [`crate::inbound::InboundParser`]). Knows nothing of Kubernetes: the controller
//! translates custom resources into [`DesiredSubscription`] and [`Credentials`].

pub mod atlas;
pub mod atllas;
pub mod atomic;
mod http;
pub mod inbound;
mod inbound_util;
mod json_fields;
mod list_rounds;
mod model;
pub mod smallest;

use std::time::Duration;

use crate::inbound::{InboundParser, InboundRequest, Parsed, Rejection, VerificationKeys};
pub use http::install_crypto_provider;
pub use inbound_util::{encode_signature, sign_hex};
pub use model::{
    AtomicMethod, Credentials, DesiredSubscription, Observed, Provider, ProviderApi,
    ProviderEndpoints, ProviderError, Scope, SyncAction, UpstreamState,
};

/// Marks the events the operator makes up for a test request (ids and payloads).
pub const SYNTHETIC_TEST_PREFIX: &str = "webhook-operator-test-";

/// A test delivery in `desired.provider`'s own format, as its parser expects it, signed or
/// headed with `keys` the way that provider does; the parser marks it as a test.
pub fn synthetic_test_event(
    desired: &DesiredSubscription,
    keys: &VerificationKeys,
) -> (::http::HeaderMap, Vec<u8>) {
    let id = format!("{SYNTHETIC_TEST_PREFIX}{:016x}", rand::random::<u64>());
    let event = desired.events.first().cloned().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let mut headers = ::http::HeaderMap::new();
    headers.insert(
        ::http::header::CONTENT_TYPE,
        ::http::HeaderValue::from_static("application/json"),
    );
    let secret = keys.secrets.first().cloned().unwrap_or_default();
    let body = match &desired.scope {
        Scope::Atlas { campaign_id } => serde_json::json!([{
            "callId": id, "campaignId": campaign_id, "triggerName": event,
            "customerNumber": "+10000000000", "startedAt": now.to_string(), "test": true,
        }]),
        Scope::Atomic { environment_id, .. } => serde_json::json!({
            "requestId": id, "environmentId": environment_id, "webhookId": "test", "isBatched": false,
            "data": {"id": id, "analyticsEvent": atomic::TEST_EVENT, "endUserId": "test", "timestamp": now.to_string()},
        }),
        Scope::Smallest { agent_ids } => {
            let agent = agent_ids.first().cloned().unwrap_or_default();
            serde_json::json!({
                "url": desired.hook_url, "description": "webhook-operator test event",
                "event": format!("{agent}.{event}"), "id": id, "test": true,
                "metadata": {"agentId": agent, "eventType": event, "conversationType": "test", "callId": id},
            })
        }
        Scope::Atllas { .. } => serde_json::json!({
            "type": "call.finished", "timestamp": now.as_millisecond(),
            "webhook": {"id": format!("webhook_test_{id}"), "type": "outbound"},
            "call": {"id": id, "status": "finished"},
        }),
    };
    let body = serde_json::to_vec(&body).expect("a JSON value serialises");
    let sign = |name: &str, encoding, headers: &mut ::http::HeaderMap| {
        if let (Ok(n), Ok(v)) = (
            ::http::HeaderName::try_from(name),
            ::http::HeaderValue::from_str(&encode_signature(&secret, &body, encoding)),
        ) {
            headers.insert(n, v);
        }
    };
    match &desired.scope {
        Scope::Atomic { .. } => sign(
            keys.header_name
                .as_deref()
                .unwrap_or(atomic::SIGNATURE_HEADER),
            keys.signature_encoding,
            &mut headers,
        ),
        Scope::Smallest { .. } => sign(
            smallest::SIGNATURE_HEADER,
            crate::inbound::SignatureEncoding::Hex,
            &mut headers,
        ),
        Scope::Atllas { header_name } => {
            if let (Ok(n), Ok(v)) = (
                ::http::HeaderName::try_from(header_name.as_str()),
                ::http::HeaderValue::from_bytes(&secret),
            ) {
                headers.insert(n, v);
            }
        }
        Scope::Atlas { .. } => {}
    }
    (headers, body)
}

impl Default for ProviderEndpoints {
    fn default() -> Self {
        ProviderEndpoints {
            atlas_base: "https://api.youratlas.com/v1/api".into(),
            atlas_list_path: atlas::DEFAULT_LIST_PATH.into(),
            atomic_base: "https://{orgId}.customer-api.atomic.io".into(),
            // Assumption (PROVIDERS.md): the token endpoint lives on the org's API host.
            atomic_token_url: "https://{orgId}.customer-api.atomic.io/auth/token".into(),
            smallest_base: "https://api.smallest.ai/atoms/v1".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(20),
        }
    }
}

/// One client per provider, each with its own connection pool.
pub struct ProviderClients {
    atlas: atlas::AtlasClient,
    atomic: atomic::AtomicClient,
    smallest: smallest::SmallestClient,
    atllas: atllas::AtllasClient,
}

impl ProviderClients {
    pub fn new(endpoints: ProviderEndpoints) -> Self {
        ProviderClients {
            atlas: atlas::AtlasClient::new(&endpoints),
            atomic: atomic::AtomicClient::new(&endpoints),
            smallest: smallest::SmallestClient::new(&endpoints),
            atllas: atllas::AtllasClient,
        }
    }

    pub fn get(&self, p: Provider) -> &dyn ProviderApi {
        match p {
            Provider::Atlas => &self.atlas,
            Provider::Atomic => &self.atomic,
            Provider::Smallest => &self.smallest,
            Provider::Atllas => &self.atllas,
        }
    }

    /// Endpoints pointing every provider at a simulator (`webhook-operator sandbox`)
    /// listening at `base`, e.g. `http://127.0.0.1:8090`.
    pub fn sandbox(base: &str) -> ProviderEndpoints {
        let base = base.trim_end_matches('/');
        ProviderEndpoints {
            atlas_base: format!("{base}/atlas/v1/api"),
            atlas_list_path: atlas::DEFAULT_LIST_PATH.into(),
            atomic_base: format!("{base}/atomic/{{orgId}}"),
            atomic_token_url: format!("{base}/atomic/{{orgId}}/auth/token"),
            smallest_base: format!("{base}/smallest/atoms/v1"),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Dispatches each provider's deliveries to its parser.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProviderParser;

impl InboundParser for ProviderParser {
    fn parse(
        &self,
        provider: Provider,
        keys: &VerificationKeys,
        request: &InboundRequest<'_>,
    ) -> Result<Parsed, Rejection> {
        match provider {
            Provider::Atlas => atlas::parse_inbound(request),
            Provider::Atomic => atomic::parse_inbound(keys, request).map(Parsed::from),
            Provider::Smallest => smallest::parse_inbound(keys, request).map(Parsed::from),
            Provider::Atllas => atllas::parse_inbound(keys, request).map(Parsed::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_debug_redacts() {
        let c = Credentials {
            api_key: Some("k-123-secret".into()),
            client_id: Some("cid".into()),
            client_secret: Some("s-456-secret".into()),
        };
        let d = format!("{c:?}");
        assert!(
            !d.contains("k-123-secret") && !d.contains("s-456-secret"),
            "{d}"
        );
        assert!(d.contains("cid"));
    }

    #[test]
    fn reasons_and_permanence() {
        let rl = ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        };
        assert_eq!(rl.reason(), "RateLimited");
        assert_eq!(rl.retry_after(), Some(Duration::from_secs(7)));
        assert!(!rl.is_permanent());
        assert!(ProviderError::Unauthorized("x".into()).is_permanent());
        assert!(!ProviderError::Unavailable("x".into()).is_permanent());
        assert_eq!(ProviderError::Invalid("x".into()).reason(), "InvalidSpec");
        assert_eq!(
            ProviderError::NotFound("x".into()).reason(),
            "NotFoundUpstream"
        );
    }

    #[test]
    fn scope_round_trips() {
        let s = Scope::Atomic {
            organization_id: "o".into(),
            environment_id: "e".into(),
            card_template_id: None,
            action_flow_config_id: Some("f".into()),
            method: AtomicMethod::Put,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Scope>(&j).unwrap(), s);
    }
}
