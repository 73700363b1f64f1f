//! Standard Webhooks signatures on deliveries: `webhook-signature` carries
//! `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one per secret in force.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A signing secret. Never printed: `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("signing secret is empty")]
    Empty,
    #[error("signing secret has the whsec_ prefix but is not valid base64")]
    InvalidBase64,
}

impl SigningSecret {
    /// Reads a secret as stored in a Secret: `whsec_<base64>` (the Standard Webhooks form)
    /// is decoded; anything else is used as raw key bytes.
    pub fn parse(value: &[u8]) -> Result<Self, SecretError> {
        let key = match value.strip_prefix(b"whsec_") {
            Some(b64) => STANDARD
                .decode(b64)
                .map_err(|_| SecretError::InvalidBase64)?,
            None => value.to_vec(),
        };
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The `webhook-signature` header value: one `v1,<sig>` per secret, newest first,
/// space-separated, so consumers on either side of a rotation verify.
pub fn signature_header(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let ts = timestamp.to_string();
    let mut out = String::with_capacity(secrets.len() * 48);
    for (i, secret) in secrets.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str("v1,");
        STANDARD.encode_string(secret.mac(id, &ts, body), &mut out);
    }
    out
}

/// Whether any `v1,<sig>` in a `webhook-signature` header is the signature of
/// `{id}.{timestamp}.{body}` under one of `secrets` (the consumer's side; constant-time
/// comparison). The timestamp tolerance is the caller's to check.
pub fn verify(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: &str,
    body: &[u8],
    header: &str,
) -> bool {
    use subtle::ConstantTimeEq;
    let expected: Vec<[u8; 32]> = secrets.iter().map(|s| s.mac(id, timestamp, body)).collect();
    let mut ok = false;
    for part in header.split(' ') {
        let Some(b64) = part.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = STANDARD.decode(b64) else {
            continue;
        };
        for e in &expected {
            ok |= bool::from(sig.as_slice().ct_eq(e.as_slice()));
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, ts: i64, sig: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        h
    }

    #[test]
    fn independent_implementation_verifies_each_secret() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let new = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let secrets = [
            SigningSecret::parse(new.as_bytes()).unwrap(),
            SigningSecret::parse(old.as_bytes()).unwrap(),
        ];
        let body = br#"{"type":"call_completed","n":1}"#;
        let ts = jiff::Timestamp::now().as_second();
        let sig = signature_header(&secrets, "msg_1", ts, body);
        assert_eq!(sig.split(' ').count(), 2);
        for s in [old, new] {
            let wh = standardwebhooks::Webhook::new(s).unwrap();
            wh.verify(body, &headers("msg_1", ts, &sig)).unwrap();
            assert!(wh.verify(b"{}", &headers("msg_1", ts, &sig)).is_err());
            assert!(wh.verify(body, &headers("msg_2", ts, &sig)).is_err());
        }
        let stranger =
            standardwebhooks::Webhook::new("whsec_dGhpcyBpcyBhbm90aGVyIGtleQ==").unwrap();
        assert!(stranger.verify(body, &headers("msg_1", ts, &sig)).is_err());
    }

    #[test]
    fn raw_secrets_and_bad_input() {
        let raw = SigningSecret::parse(b"plain-secret").unwrap();
        let ts = jiff::Timestamp::now().as_second();
        let sig = signature_header(std::slice::from_ref(&raw), "id", ts, b"{}");
        let wh = standardwebhooks::Webhook::from_bytes(b"plain-secret".to_vec()).unwrap();
        wh.verify(b"{}", &headers("id", ts, &sig)).unwrap();
        assert_eq!(SigningSecret::parse(b""), Err(SecretError::Empty));
        assert_eq!(
            SigningSecret::parse(b"whsec_!!"),
            Err(SecretError::InvalidBase64)
        );
        assert!(!format!("{raw:?}").contains("plain"));
    }

    #[test]
    fn verify_accepts_each_secret_and_refuses_changes() {
        let old = SigningSecret::parse(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let new = SigningSecret::parse(b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let header = signature_header(&[new.clone(), old.clone()], "msg_1", 1_700_000_000, b"{}");
        for s in [&old, &new] {
            assert!(verify(
                std::slice::from_ref(s),
                "msg_1",
                "1700000000",
                b"{}",
                &header
            ));
        }
        let only_new = std::slice::from_ref(&new);
        assert!(!verify(only_new, "msg_2", "1700000000", b"{}", &header));
        assert!(!verify(only_new, "msg_1", "1700000001", b"{}", &header));
        assert!(!verify(only_new, "msg_1", "1700000000", b"{ }", &header));
        let stranger = SigningSecret::parse(b"another key").unwrap();
        assert!(!verify(&[stranger], "msg_1", "1700000000", b"{}", &header));
        assert!(!verify(
            &[new],
            "msg_1",
            "1700000000",
            b"{}",
            "v1,not base64!"
        ));
    }
}
