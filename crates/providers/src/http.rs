//! What every management client shares: building a pooled reqwest client with timeouts,
//! and turning transport failures and error responses into [`ProviderError`] without
//! leaking credentials.

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode};

use crate::model::{Credentials, ProviderEndpoints, ProviderError};

/// Installs rustls' ring provider once per process. reqwest is built with
/// `rustls-no-provider`, so a client cannot be built before this ran; a second install
/// fails harmlessly and is ignored.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A pooled client with the configured connect and request timeouts.
pub(crate) fn build_client(endpoints: &ProviderEndpoints, user_agent: &str) -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(endpoints.connect_timeout)
        .timeout(endpoints.request_timeout)
        .user_agent(user_agent)
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .expect("static reqwest configuration is valid")
}

pub(crate) const USER_AGENT: &str = concat!("webhook-operator/", env!("CARGO_PKG_VERSION"));

/// A transport failure (no response): the provider is unreachable or too slow.
/// reqwest's own text may carry the URL; ours names only what failed.
pub(crate) fn transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_decode() || e.is_body() {
        "response body unreadable"
    } else {
        "request failed"
    };
    ProviderError::Unavailable(format!("{what}: {kind}"))
}

/// `Retry-After` in seconds (the providers document seconds; an HTTP date is ignored).
pub(crate) fn retry_after(resp: &Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Maps an error status plus the provider's extracted message to a [`ProviderError`].
/// The message is truncated and scrubbed of every credential value.
pub(crate) fn status_error(
    status: StatusCode,
    retry_after: Option<Duration>,
    what: &str,
    message: &str,
    creds: &Credentials,
    extra_secrets: &[&str],
) -> ProviderError {
    let mut msg: String = message.chars().take(200).collect();
    for s in creds
        .secrets()
        .into_iter()
        .chain(extra_secrets.iter().copied())
    {
        if !s.is_empty() {
            msg = msg.replace(s, "<redacted>");
        }
    }
    let text = if msg.is_empty() {
        format!("{what}: HTTP {}", status.as_u16())
    } else {
        format!("{what}: HTTP {}: {msg}", status.as_u16())
    };
    match status {
        StatusCode::TOO_MANY_REQUESTS => ProviderError::RateLimited { retry_after },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProviderError::Unauthorized(text),
        StatusCode::NOT_FOUND => ProviderError::NotFound(text),
        s if s.is_server_error() => ProviderError::Unavailable(text),
        StatusCode::REQUEST_TIMEOUT => ProviderError::Unavailable(text),
        _ => ProviderError::Invalid(text),
    }
}

/// Sends `req`; a non-2xx answer becomes a typed error read with `extract` (the provider's
/// error shape). For providers whose credential is one header (no token to refresh).
pub(crate) async fn send(
    req: reqwest::RequestBuilder,
    what: &str,
    creds: &Credentials,
    extract: fn(&serde_json::Value) -> Option<String>,
) -> Result<Response, ProviderError> {
    let resp = req.send().await.map_err(|e| transport_error(what, &e))?;
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(error_from_response(resp, what, creds, &[], extract).await)
    }
}

/// A provider's API at one base URL whose credential is the api key in one header (no
/// token to refresh): builds requests under the base with the key, and sends them,
/// reading an error answer with the provider's own `extract`.
#[derive(Clone)]
pub(crate) struct KeyedApi {
    http: reqwest::Client,
    base: String,
    /// Puts the api key on a request, the provider's way.
    authorize: fn(RequestBuilder, &str) -> RequestBuilder,
    extract: fn(&serde_json::Value) -> Option<String>,
}

impl KeyedApi {
    pub(crate) fn new(
        endpoints: &ProviderEndpoints,
        base: &str,
        authorize: fn(RequestBuilder, &str) -> RequestBuilder,
        extract: fn(&serde_json::Value) -> Option<String>,
    ) -> Self {
        KeyedApi {
            http: build_client(endpoints, USER_AGENT),
            base: base.trim_end_matches('/').to_string(),
            authorize,
            extract,
        }
    }

    /// A request to `path` under the base, carrying the api key; `Invalid` without one.
    pub(crate) fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        creds: &Credentials,
    ) -> Result<RequestBuilder, ProviderError> {
        let key = creds.require_api_key()?;
        let req = self.http.request(method, format!("{}{path}", self.base));
        Ok((self.authorize)(req, key))
    }

    /// Sends `body` as JSON to `path` with the api key.
    pub(crate) async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl serde::Serialize,
        what: &str,
        creds: &Credentials,
    ) -> Result<Response, ProviderError> {
        let req = self.request(method, path, creds)?.json(body);
        self.send(req, what, creds).await
    }

    pub(crate) async fn send(
        &self,
        req: RequestBuilder,
        what: &str,
        creds: &Credentials,
    ) -> Result<Response, ProviderError> {
        send(req, what, creds, self.extract).await
    }
}

/// The answer to a removal: `NotFound` upstream counts as done (it is already gone).
pub(crate) fn removed<T>(answer: Result<T, ProviderError>) -> Result<(), ProviderError> {
    match answer {
        Ok(_) | Err(ProviderError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads a failed response's body and maps it with `extract` (the provider's error shape).
pub(crate) async fn error_from_response(
    resp: Response,
    what: &str,
    creds: &Credentials,
    extra_secrets: &[&str],
    extract: fn(&serde_json::Value) -> Option<String>,
) -> ProviderError {
    let status = resp.status();
    let ra = retry_after(&resp);
    let body = resp.bytes().await.unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| extract(&v))
        .unwrap_or_default();
    status_error(status, ra, what, &message, creds, extra_secrets)
}

/// Decodes a success body; a body that does not match the documented shape is the
/// provider misbehaving, so it counts as unavailable (retryable), not as our bad spec.
pub(crate) async fn decode<T: serde::de::DeserializeOwned>(
    resp: Response,
    what: &str,
) -> Result<T, ProviderError> {
    let body = resp.bytes().await.map_err(|e| transport_error(what, &e))?;
    serde_json::from_slice(&body)
        .map_err(|_| ProviderError::Unavailable(format!("{what}: unexpected response shape")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        let c = Credentials::api_key("KEY-abc");
        let e = |s: u16| status_error(StatusCode::from_u16(s).unwrap(), None, "op", "", &c, &[]);
        assert_eq!(e(401).reason(), "Unauthorized");
        assert_eq!(e(403).reason(), "Unauthorized");
        assert_eq!(e(404).reason(), "NotFoundUpstream");
        assert_eq!(e(400).reason(), "InvalidSpec");
        assert_eq!(e(422).reason(), "InvalidSpec");
        assert_eq!(e(500).reason(), "UpstreamUnavailable");
        assert_eq!(e(503).reason(), "UpstreamUnavailable");
        assert_eq!(e(429).reason(), "RateLimited");
    }

    #[test]
    fn message_is_scrubbed() {
        let c = Credentials::api_key("KEY-abc");
        let e = status_error(
            StatusCode::UNAUTHORIZED,
            None,
            "op",
            "bad key KEY-abc and SIGN-1",
            &c,
            &["SIGN-1"],
        );
        let s = format!("{e} {e:?}");
        assert!(!s.contains("KEY-abc") && !s.contains("SIGN-1"), "{s}");
    }
}
