//! Checks every inbound parser shares: JSON content type, HMAC-SHA256 hex signatures and
//! header secrets compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use base64::Engine;

use crate::inbound::{InboundRequest, Rejection, SignatureEncoding};

/// POST/PUT bodies must be declared JSON (`application/json`, `application/*+json`),
/// parameters such as `charset` allowed.
pub(crate) fn require_json(req: &InboundRequest<'_>) -> Result<(), Rejection> {
    let ct = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(Rejection::UnsupportedMediaType)?;
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if ok {
        Ok(())
    } else {
        Err(Rejection::UnsupportedMediaType)
    }
}

/// HMAC-SHA256 of `body` keyed by `secret`, lowercase hex: the scheme both Atomic and
/// Smallest use. Shared with the simulators so they sign exactly what we verify.
pub fn sign_hex(secret: &[u8], body: &[u8]) -> String {
    encode_signature(secret, body, SignatureEncoding::Hex)
}

/// A signature written the way `encoding` says (what [`verify_signature`] accepts).
pub fn encode_signature(secret: &[u8], body: &[u8], encoding: SignatureEncoding) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    match encoding {
        SignatureEncoding::Hex => hex::encode(bytes),
        SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
    }
}

/// Verifies an HMAC-SHA256 signature header, hex or base64, against every accepted secret.
pub(crate) fn verify_signature(
    req: &InboundRequest<'_>,
    header: &str,
    secrets: &[Vec<u8>],
    encoding: SignatureEncoding,
) -> Result<(), Rejection> {
    if secrets.is_empty() {
        return Err(Rejection::Unauthorized("no signing secret configured"));
    }
    let given = req
        .headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .ok_or(Rejection::Unauthorized("missing signature"))?;
    // The providers send lowercase hex; decoding accepts either case, and the comparison
    // is on bytes, so case is not a forgery vector.
    let given = match encoding {
        SignatureEncoding::Hex => hex::decode(given.trim()),
        SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(given.trim())
            .map_err(|_| hex::FromHexError::OddLength),
    }
    .map_err(|_| Rejection::Unauthorized("bad signature"))?;
    let mut matched = subtle::Choice::from(0u8);
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
        mac.update(req.body);
        let expected = mac.finalize().into_bytes();
        // Check every secret, not just until the first match, so timing says nothing about
        // which secret (old or new) matched.
        matched |= expected.as_slice().ct_eq(&given);
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(Rejection::Unauthorized("bad signature"))
    }
}

/// Verifies that `header` carries one of `secrets`, in constant time per candidate.
pub(crate) fn verify_header_secret(
    req: &InboundRequest<'_>,
    header: Option<&str>,
    secrets: &[Vec<u8>],
) -> Result<(), Rejection> {
    let header = header.ok_or(Rejection::Unauthorized("no header configured"))?;
    if secrets.is_empty() {
        return Err(Rejection::Unauthorized("no header secret configured"));
    }
    let given = req
        .headers
        .get(header)
        .ok_or(Rejection::Unauthorized("missing header"))?
        .as_bytes();
    let mut matched = subtle::Choice::from(0u8);
    for secret in secrets {
        matched |= secret.as_slice().ct_eq(given);
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(Rejection::Unauthorized("wrong header value"))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the parsers' unit and property tests.
    use http::{HeaderMap, HeaderValue, Method};

    pub(crate) fn json_headers(extra: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (k, v) in extra {
            h.insert(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    pub(crate) const POST: Method = Method::POST;

    /// The request as the ingress hands it to a parser.
    pub(crate) fn request<'a>(
        method: &'a Method,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
        body: &'a [u8],
    ) -> crate::inbound::InboundRequest<'a> {
        crate::inbound::InboundRequest {
            method,
            headers,
            query,
            body,
        }
    }
}
