//! The contract between the ingress (provider-agnostic HTTP server) and the providers'
//! inbound parsers (verification and normalisation of what a provider POSTs).
//!
//! The ingress finds the subscription a request belongs to (from its path), hands the raw
//! request and that subscription's verification keys to an [`InboundParser`], and queues
//! the events it returns. Nothing here knows a provider format or the queue.

use bytes::Bytes;

use crate::model::Provider;

/// How a signature's bytes are written in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// A request as it reached the ingress, before any verification.
pub struct InboundRequest<'a> {
    pub method: &'a http::Method,
    pub headers: &'a http::HeaderMap,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The raw body, exactly as received (signatures are over these bytes).
    pub body: &'a [u8],
}

/// What a request must prove, for one subscription.
#[derive(Clone, Default)]
pub struct VerificationKeys {
    /// Accepted secrets, newest first: the provider's signing secret (Atomic, Smallest) or
    /// the expected header value (Atllas). More than one during a rotation overlap.
    pub secrets: Vec<Vec<u8>>,
    /// The header that carries the shared value (Atllas), or the signature when the
    /// subscription overrides the provider's default (Atomic).
    pub header_name: Option<String>,
    /// How the signature is written (Atomic may be configured; others are hex).
    pub signature_encoding: SignatureEncoding,
}

impl std::fmt::Debug for VerificationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKeys")
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("header_name", &self.header_name)
            .field("signature_encoding", &self.signature_encoding)
            .finish()
    }
}

/// One provider event, normalised: a batch or array is split into one of these each.
#[derive(Clone, Debug, PartialEq)]
pub struct InboundEvent {
    /// The provider's event name (`call_completed`, `card-published`, `post-conversation`,
    /// `call.finished`).
    pub event_type: String,
    /// Identity of the event at the provider (PROVIDERS.md); equal keys are duplicates.
    pub dedupe_key: String,
    /// The event as JSON, the single event object (not the provider's array or batch).
    pub payload: Bytes,
    /// A test event (a provider's test button or the operator's own test request).
    pub test: bool,
}

/// An element of a provider's batch that could not be read. It is kept raw, never
/// dropped unseen: the ingress stores it straight in the dead-letter store.
#[derive(Clone, Debug, PartialEq)]
pub struct MalformedEvent {
    /// Why it was not read; a short fixed string, safe as a metric label.
    pub reason: &'static str,
    /// The element exactly as the provider sent it.
    pub raw: Bytes,
}

/// What one request held: the events that were read and the batch elements that were not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    pub events: Vec<InboundEvent>,
    pub malformed: Vec<MalformedEvent>,
}

impl From<Vec<InboundEvent>> for Parsed {
    fn from(events: Vec<InboundEvent>) -> Self {
        Parsed {
            events,
            malformed: Vec::new(),
        }
    }
}

/// Why a request was refused. Reasons are short, fixed strings: safe to return to the
/// caller and to use as a metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Missing or wrong signature or header secret (401).
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    /// Malformed body or missing fields (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Not JSON (415).
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// A method the provider never uses (405).
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl Rejection {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Rejection::Unauthorized(_) => http::StatusCode::UNAUTHORIZED,
            Rejection::BadRequest(_) => http::StatusCode::BAD_REQUEST,
            Rejection::UnsupportedMediaType => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection::MethodNotAllowed => http::StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The short fixed detail, for a dead letter or a log line.
    pub fn detail(&self) -> &'static str {
        match self {
            Rejection::Unauthorized(reason) | Rejection::BadRequest(reason) => reason,
            other => other.reason(),
        }
    }

    /// The request did not verify (signature or header secret): the provider may sign
    /// in a way the subscription does not expect, which is reported on it.
    pub fn is_signature_failure(&self) -> bool {
        matches!(self, Rejection::Unauthorized(_))
    }

    /// The stable, low-cardinality reason (the metric label and the error answered).
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Unauthorized(_) => "unauthorized",
            Rejection::BadRequest(_) => "bad_request",
            Rejection::UnsupportedMediaType => "unsupported_media_type",
            Rejection::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// Verifies and normalises one provider's deliveries. Implemented in `providers`.
///
/// A request that fails verification, or whose envelope cannot be read, is refused as a
/// whole; a batch that verifies but holds some unreadable elements is [`Parsed`] into the
/// events that were read and the [`MalformedEvent`]s that were not.
pub trait InboundParser: Send + Sync {
    fn parse(
        &self,
        provider: Provider,
        keys: &VerificationKeys,
        request: &InboundRequest<'_>,
    ) -> Result<Parsed, Rejection>;
}
