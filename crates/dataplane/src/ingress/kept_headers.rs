//! Which of a provider's request headers are kept with its events, for `spec.filter`'s
//! `headers` variable. Credentials are left out: `Authorization`, cookies, the
//! subscription's own verification header (signature or shared value), and any name that
//! reads like one (containing `signature`, `secret`, `token`, `auth`, `api-key`/`apikey`,
//! `password`), so no filter, error message or stored record carries them. Connection
//! headers are left out as noise. Kept: lower-case names, text values, at most
//! [`MAX_BYTES`] in all (later headers past it are dropped).

use http::HeaderMap;

/// Most bytes of headers kept per request.
pub const MAX_BYTES: usize = 4096;

const CONNECTION: [&str; 9] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
];

const CREDENTIAL_PARTS: [&str; 7] = [
    "signature",
    "secret",
    "token",
    "auth",
    "api-key",
    "apikey",
    "password",
];

/// Whether a header named `name` (lower-case) is never kept.
pub fn is_excluded(name: &str, verification_header: Option<&str>) -> bool {
    name == "cookie"
        || CONNECTION.contains(&name)
        || CREDENTIAL_PARTS.iter().any(|p| name.contains(p))
        || verification_header.is_some_and(|h| h.eq_ignore_ascii_case(name))
}

/// The kept headers as `name: value` lines (see [`crate::queue::header_lines`]). A name
/// sent more than once keeps its first value.
pub fn kept(headers: &HeaderMap, verification_header: Option<&str>) -> String {
    let mut out = String::new();
    for name in headers.keys() {
        let name = name.as_str(); // `http` lower-cases names
        if is_excluded(name, verification_header) {
            continue;
        }
        let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let line = name.len() + value.len() + 3;
        if out.len() + line > MAX_BYTES {
            break;
        }
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value.trim());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_provider_headers_and_leaves_credentials_out() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("User-Agent", "Atlas-Webhooks/1.0"),
            ("X-Atlas-Event", "call_completed"),
            ("X-Atlas-Event", "second value"),
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer abc"),
            ("X-Atomic-Signature", "deadbeef"),
            ("X-Shared-Value", "s3cret"),
            ("X-Api-Key", "k"),
            ("X-Webhook-Token", "t"),
            ("Cookie", "a=b"),
            ("Host", "hooks.example.com"),
            ("Content-Length", "12"),
        ] {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let kept = kept(&h, Some("X-Shared-Value"));
        let pairs: Vec<(&str, &str)> = crate::queue::header_lines(&kept).collect();
        assert_eq!(
            pairs,
            [
                ("user-agent", "Atlas-Webhooks/1.0"),
                ("x-atlas-event", "call_completed"),
                ("content-type", "application/json"),
            ]
        );
        for secret in ["abc", "deadbeef", "s3cret", "a=b"] {
            assert!(!kept.contains(secret), "{secret}");
        }
    }

    #[test]
    fn stops_at_the_size_bound() {
        let mut h = HeaderMap::new();
        for i in 0..100 {
            h.insert(
                http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                "v".repeat(100).parse().unwrap(),
            );
        }
        let kept = kept(&h, None);
        assert!(kept.len() <= MAX_BYTES);
        assert!(crate::queue::header_lines(&kept).count() > 30);
    }
}
