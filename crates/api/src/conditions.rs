//! Condition types and reasons: the contract with kubectl, kstatus, Flux and Argo CD.
//! The README explains each reason and what to do about it.

/// Condition types.
pub mod types {
    pub const READY: &str = "Ready";
    pub const SYNCED: &str = "Synced";
    pub const HEALTHY: &str = "Healthy";
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
    /// Deliveries verify (present once a delivery has failed verification).
    pub const SIGNATURES_VERIFIED: &str = "SignaturesVerified";
    /// Every ready replica's ingress routes the subscription's hook URL (present once the
    /// leader registers, or is about to register, the URL at the provider).
    pub const ROUTED: &str = "Routed";
}

/// Condition reasons (CamelCase, stable: tools and alerts match on them).
pub mod reasons {
    /// Not every ready replica routes the hook URL yet: the URL is not registered (or not
    /// changed) at the provider until they do.
    pub const ROUTES_PENDING: &str = "RoutesPending";
    /// Every ready replica routes the hook URL.
    pub const ROUTES_LOADED: &str = "RoutesLoaded";
    pub const SYNCED: &str = "Synced";
    pub const READY: &str = "Ready";
    pub const SIGNATURE_MISMATCH: &str = "SignatureMismatch";
    pub const SIGNATURES_VERIFY_AGAIN: &str = "SignaturesVerifyAgain";
    pub const ADOPTED: &str = "Adopted";
    pub const DRIFT_REPAIRED: &str = "DriftRepaired";
    pub const CREDENTIALS_MISSING: &str = "CredentialsMissing";
    pub const UNAUTHORIZED: &str = "Unauthorized";
    pub const UPSTREAM_UNAVAILABLE: &str = "UpstreamUnavailable";
    pub const RATE_LIMITED: &str = "RateLimited";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const ENDPOINT_NOT_READY: &str = "EndpointNotReady";
    pub const NOT_FOUND_UPSTREAM: &str = "NotFoundUpstream";
    pub const DISABLED_UPSTREAM: &str = "DisabledUpstream";
    pub const DRIFT_DETECTED: &str = "DriftDetected";
    pub const MANUAL_SETUP: &str = "ManualSetupRequired";
    pub const OBSERVE_ONLY: &str = "ObserveOnly";
    pub const PROGRESSING: &str = "Progressing";
    pub const INGRESS_ASSIGNED: &str = "IngressAssigned";
    pub const DESTINATION_UNRESOLVABLE: &str = "DestinationUnresolvable";
    pub const DESTINATION_FORBIDDEN: &str = "DestinationForbidden";
    pub const SECRET_MISSING: &str = "SecretMissing";
    /// A generated Secret's name is taken by a Secret the object does not own.
    pub const SECRET_NOT_OWNED: &str = "SecretNotOwned";
    /// `--require-secret-label` is on and a referenced Secret lacks the opt-in label.
    pub const SECRET_NOT_REFERABLE: &str = "SecretNotReferable";
    /// The destination Service is in another namespace and cross-namespace references are
    /// not allowed.
    pub const CROSS_NAMESPACE_REF_DENIED: &str = "CrossNamespaceRefDenied";
    pub const DELIVERING: &str = "Delivering";
    pub const NO_DELIVERIES: &str = "NoDeliveries";
    pub const DELIVERY_FAILING: &str = "DeliveryFailing";
    pub const DEGRADED: &str = "Degraded";
    /// The endpoint's backlog (or the queue's disk) is at its bound: the ingress refuses
    /// new events with 503 and `Retry-After` until deliveries catch up.
    pub const BACKLOGGED: &str = "Backlogged";
    /// `spec.filter` does not compile; the message is the compiler's.
    pub const FILTER_INVALID: &str = "FilterInvalid";
    /// `spec.dedupe.key` does not compile; the message is the compiler's.
    pub const DEDUPE_INVALID: &str = "DedupeInvalid";
    /// A `spec.headers` entry the data plane cannot send: a reserved name, or a Secret
    /// value that is not a valid header value (a line break inside, for example).
    pub const HEADER_INVALID: &str = "HeaderInvalid";
    /// The ingress token (from the generated `<endpoint>-ingress` Secret) is already used
    /// by another endpoint.
    pub const INGRESS_TOKEN_IN_USE: &str = "IngressTokenInUse";
    /// The ingress token is empty or not URL-safe text.
    pub const INGRESS_TOKEN_INVALID: &str = "IngressTokenInvalid";
    /// A signing secret is not a Standard Webhooks secret (`whsec_` + base64).
    pub const SIGNING_SECRET_INVALID: &str = "SigningSecretInvalid";
    /// The TLS handshake with an `https` destination fails: its certificate is not
    /// trusted (`spec.destination.tls.caSecretRef`), or it refused the client certificate.
    pub const TLS_HANDSHAKE_FAILED: &str = "TLSHandshakeFailed";
    /// `spec.destination.tls` names PEM that does not parse (a CA bundle without a
    /// certificate, a key that does not match its certificate).
    pub const TLS_CONFIG_INVALID: &str = "TLSConfigInvalid";
}
