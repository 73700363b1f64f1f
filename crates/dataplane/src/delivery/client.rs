//! The HTTP client deliveries go out on: hyper's pooled client over a connector that
//! resolves names through the address policy, speaks TLS for `https` (the platform's
//! trust store, or an endpoint's own CA and client certificate: [`DestinationTls`]) and, with `proxyFromEnv`, goes through the HTTP proxy that `HTTP_PROXY`,
//! `HTTPS_PROXY` and `NO_PROXY` name. It follows no redirect: a redirect could lead past
//! the destination guard.
//!
//! Delivery sends one kind of request, a POST of bytes already in memory, so it uses hyper
//! directly; the provider API clients, which send and read JSON, use reqwest.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
#[cfg(test)]
use http::StatusCode;
use http::{HeaderMap, HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

use super::AddressPolicy;
use crate::config::DestinationTls;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const POOL_MAX_IDLE_PER_HOST: usize = 256;
/// A response body is never used, but one left unread closes its connection instead of
/// returning it to the pool; one up to this size is read to its end.
const KEEP_ALIVE_BODY_LIMIT: usize = 64 * 1024;
const USER_AGENT: &str = concat!("webhook-operator/", env!("CARGO_PKG_VERSION"));

/// Why an attempt got no answer, as the delivery status and metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    Timeout,
    Connect,
    Request,
    /// The TLS handshake failed (or the destination ended it with an alert): what about.
    Tls(&'static str),
}

impl SendError {
    pub fn reason(self) -> &'static str {
        match self {
            SendError::Timeout => "timeout",
            SendError::Connect => "connection failed",
            SendError::Request => "request failed",
            SendError::Tls(why) => why,
        }
    }
}

/// The TLS failure somewhere in `e`'s chain of sources, if there is one. Each reason
/// starts with [`crate::health::TLS_FAILURE`].
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<SendError> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let mut next = Some(e);
    while let Some(e) = next {
        // An `io::Error`'s `source()` skips the error it wraps (hyper-rustls wraps
        // tokio-rustls's, which wraps rustls's): step into it instead.
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
        if let Some(r) = e.downcast_ref::<R>() {
            return Some(SendError::Tls(match r {
                R::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
                    "TLS handshake failed: the destination's certificate is not signed by a trusted CA"
                }
                R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                    "TLS handshake failed: the destination's certificate is not valid for its host name"
                }
                R::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                    "TLS handshake failed: the destination's certificate has expired"
                }
                R::InvalidCertificate(_) => {
                    "TLS handshake failed: the destination's certificate is not valid"
                }
                R::AlertReceived(
                    A::CertificateRequired
                    | A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::UnsupportedCertificate
                    | A::CertificateExpired
                    | A::AccessDenied,
                ) => "TLS handshake failed: the destination refused the client certificate",
                R::AlertReceived(_) => "TLS handshake failed: the destination sent an alert",
                _ => "TLS handshake failed",
            }));
        }
    }
    None
}

/// The rustls configuration of `tls`: its CA (else the platform's trust store) and its
/// client certificate. Errors name what is wrong, never the material.
pub(crate) fn client_tls_config(tls: &DestinationTls) -> Result<rustls::ClientConfig, String> {
    use hyper_rustls::ConfigBuilderExt;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|_| "the CA bundle is not valid PEM".to_string())?;
                roots
                    .add(cert)
                    .map_err(|_| "the CA bundle holds a certificate that does not parse")?;
            }
            if roots.is_empty() {
                return Err("the CA bundle holds no certificate".into());
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .try_with_platform_verifier()
            .map_err(|e| format!("the platform's trust store: {e}"))?,
    };
    match &tls.client_cert_pem {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "tls.crt is not valid PEM".to_string())?;
            if chain.is_empty() {
                return Err("tls.crt holds no certificate".into());
            }
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|_| "tls.key holds no PEM private key".to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|_| "tls.key does not fit tls.crt, or its kind is not supported".into())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The destination's answer: its status and headers (the body is read and dropped).
pub(crate) type Answer = http::response::Parts;

/// The delivery client. Cheap to clone.
#[derive(Clone)]
pub(crate) struct DeliveryClient {
    client: Client<HttpsConnector<Dialer>, Full<Bytes>>,
    proxy: Option<Arc<Matcher>>,
}

impl DeliveryClient {
    /// `overrides` map host names to fixed addresses (tests and the local demo); they
    /// are not resolved, and pass the address policy like a resolved answer.
    /// `proxy` decides which destinations go through which proxy
    /// ([`Matcher::from_env`] for `proxyFromEnv`); a proxy connects for us, past the
    /// address policy.
    ///
    /// `tls`: an endpoint's own TLS settings ([`client_tls_config`]); `None`: the
    /// platform's trust store, no client certificate.
    pub fn new(
        policy: AddressPolicy,
        overrides: Vec<(String, SocketAddr)>,
        proxy: Option<Matcher>,
        tls: Option<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let proxy = proxy.map(Arc::new);
        let mut direct = HttpConnector::new_with_resolver(GuardedResolver {
            policy,
            overrides: Arc::new(overrides),
        });
        let mut to_proxy = HttpConnector::new_with_resolver(GaiResolver::new());
        configure_tcp(&mut direct);
        configure_tcp(&mut to_proxy);
        let dialer = Dialer {
            direct,
            to_proxy,
            proxy: proxy.clone(),
        };
        let tls = match tls {
            Some(config) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config),
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_platform_verifier(rustls::crypto::ring::default_provider())?,
        }
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(dialer);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(tls);
        Ok(Self { client, proxy })
    }

    /// POSTs `body` to `uri` with `headers` and waits at most `timeout` for the answer and
    /// its body.
    pub async fn post(
        &self,
        uri: Uri,
        mut headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        if uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(auth) = self
                .proxy
                .as_ref()
                .and_then(|m| m.intercept(&uri))
                .and_then(|i| i.basic_auth().cloned())
        {
            // A plain-http request goes to the proxy itself, which reads this header;
            // https is tunnelled and the tunnel carries it (see [`Dialer`]).
            headers.insert(header::PROXY_AUTHORIZATION, auth);
        }
        let mut request = Request::post(uri)
            .body(Full::new(body))
            .map_err(|_| SendError::Request)?;
        *request.headers_mut() = headers;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if let Some(tls) = tls_failure(&e) {
                    tls
                } else if e.is_connect() {
                    SendError::Connect
                } else {
                    SendError::Request
                }
            })?;
            let (answer, mut body) = response.into_parts();
            let mut read = 0;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > KEEP_ALIVE_BODY_LIMIT {
                    break;
                }
            }
            Ok(answer)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(SendError::Timeout))
    }
}

/// The TCP settings both connectors share.
fn configure_tcp<R>(c: &mut HttpConnector<R>) {
    // TLS is the layer above: the connector sees both schemes.
    c.enforce_http(false);
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
}

/// System resolution with forbidden addresses removed, so a name that changes its answer
/// between the worker's check and the connection (DNS rebinding) still cannot reach a
/// refused address. An IP literal never reaches a resolver; the worker checks it before
/// every attempt.
#[derive(Clone)]
struct GuardedResolver {
    policy: AddressPolicy,
    overrides: Arc<Vec<(String, SocketAddr)>>,
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        let policy = self.policy;
        let overridden: Vec<SocketAddr> = self
            .overrides
            .iter()
            .filter(|(h, _)| *h == host)
            .map(|(_, a)| *a)
            .collect();
        Box::pin(async move {
            if !overridden.is_empty() {
                // The same policy as a resolved name: an override is keyed by host alone
                // here, so it would otherwise open every port of its address.
                let allowed: Vec<SocketAddr> = overridden
                    .into_iter()
                    .filter(|a| policy.check(a.ip()).is_ok())
                    .collect();
                if allowed.is_empty() {
                    return Err("no permitted address".into());
                }
                return Ok(allowed.into_iter());
            }
            if policy.check_host_name(&host).is_err() {
                return Err("no permitted address".into());
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.check(a.ip()).is_ok())
                .collect();
            if addrs.is_empty() {
                return Err("no permitted address".into());
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Opens the TCP connection a request needs: to the destination itself, to the proxy for
/// plain http (the request then names the whole URL), or a CONNECT tunnel through the
/// proxy for https (TLS runs inside it, end to end).
#[derive(Clone)]
struct Dialer {
    direct: HttpConnector<GuardedResolver>,
    to_proxy: HttpConnector<GaiResolver>,
    proxy: Option<Arc<Matcher>>,
}

impl Service<Uri> for Dialer {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let via = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        let mut direct = self.direct.clone();
        let mut to_proxy = self.to_proxy.clone();
        Box::pin(async move {
            let Some(via) = via else {
                let io = direct.call(dst).await?;
                return Ok(Conn { io, proxied: false });
            };
            if via.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
                return Err("only http:// proxies are supported".into());
            }
            if dst.scheme() == Some(&http::uri::Scheme::HTTPS) {
                let mut tunnel = Tunnel::new(via.uri().clone(), to_proxy);
                if let Some(auth) = via.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tunnel.call(dst).await?;
                Ok(Conn { io, proxied: false })
            } else {
                let io = to_proxy.call(via.uri().clone()).await?;
                Ok(Conn { io, proxied: true })
            }
        })
    }
}

/// A TCP connection, and whether it goes to a forwarding proxy (the client then sends
/// the absolute URL in the request line).
struct Conn {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An error as hyper's client gives it: its own, with the connector's below.
    #[derive(Debug)]
    struct Outer(Box<dyn std::error::Error + Send + Sync>);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    /// hyper-rustls wraps tokio-rustls's `io::Error`, which wraps rustls's error.
    fn as_connector_gives(e: rustls::Error) -> Outer {
        let tokio_rustls = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        Outer(Box::new(std::io::Error::other(tokio_rustls)))
    }

    #[test]
    fn tls_failures_are_found_under_the_wrappers_and_named() {
        use rustls::{AlertDescription as A, CertificateError as C, Error as R};
        let cases = [
            (
                R::InvalidCertificate(C::UnknownIssuer),
                "the destination's certificate is not signed by a trusted CA",
            ),
            (
                R::InvalidCertificate(C::NotValidForName),
                "the destination's certificate is not valid for its host name",
            ),
            (
                R::AlertReceived(A::CertificateRequired),
                "the destination refused the client certificate",
            ),
            (
                R::AlertReceived(A::UnknownCA),
                "the destination refused the client certificate",
            ),
        ];
        for (e, why) in cases {
            let reason = tls_failure(&as_connector_gives(e))
                .expect("a TLS failure")
                .reason();
            assert!(reason.starts_with(crate::health::TLS_FAILURE), "{reason}");
            assert!(reason.ends_with(why), "{reason}");
        }
        let refused = Outer(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(tls_failure(&refused), None);
    }

    #[test]
    fn tls_settings_that_do_not_parse_are_named_without_the_material() {
        let none = DestinationTls {
            ca_pem: Some(b"not pem".to_vec()),
            client_cert_pem: None,
        };
        assert_eq!(
            client_tls_config(&none).unwrap_err(),
            "the CA bundle holds no certificate"
        );
        let bad_key = DestinationTls {
            ca_pem: None,
            client_cert_pem: Some((
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(),
                b"secret-ish".to_vec(),
            )),
        };
        let e = client_tls_config(&bad_key).unwrap_err();
        assert!(!e.contains("secret-ish"), "{e}");
        assert!(e.contains("tls.key") || e.contains("tls.crt"), "{e}");
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A loopback server that answers each request on a connection with `answer` and
    /// hands the test every request head and body it read, with the connection's number.
    async fn server(
        answer: &'static [u8],
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(usize, String)>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                n += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(read) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        let _ = tx.send((n, text[..end + 4 + length].to_owned()));
                        buf.drain(..end + 4 + length);
                        if answer.is_empty() || sock.write_all(answer).await.is_err() {
                            // No answer: hold the connection open until the client leaves.
                            let _ = sock.read(&mut chunk).await;
                            return;
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    fn client(policy: AddressPolicy, overrides: Vec<(String, SocketAddr)>) -> DeliveryClient {
        DeliveryClient::new(policy, overrides, None, None).unwrap()
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// `request` starts with `request_line` and holds each of `header_lines`.
    fn assert_head(request: &str, request_line: &str, header_lines: &[&str]) {
        assert!(
            request.starts_with(&format!("{request_line}\r\n")),
            "{request}"
        );
        for line in header_lines {
            assert!(request.contains(&format!("{line}\r\n")), "{request}");
        }
    }

    /// An empty POST to `url` with a second to answer.
    async fn post_empty(c: &DeliveryClient, url: &str) -> Result<Answer, SendError> {
        c.post(uri(url), HeaderMap::new(), Bytes::new(), SECOND)
            .await
    }

    #[tokio::test]
    async fn posts_the_body_with_headers_and_reuses_the_connection() {
        let (addr, mut seen) = server(OK).await;
        let c = client(AddressPolicy::ALLOW_ALL, Vec::new());
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_static("msg_1"));
        for body in ["{\"a\":1}", "{\"a\":2}"] {
            let answer = c
                .post(
                    uri(&format!("http://{addr}/hook?x=1")),
                    headers.clone(),
                    Bytes::from(body),
                    SECOND,
                )
                .await
                .unwrap();
            assert_eq!(answer.status, StatusCode::OK);
            let (conn, request) = seen.recv().await.unwrap();
            assert_eq!(conn, 1, "the second request reuses the first connection");
            assert_head(
                &request,
                "POST /hook?x=1 HTTP/1.1",
                &["webhook-id: msg_1", &format!("user-agent: {USER_AGENT}")],
            );
            assert!(request.ends_with(body), "{request}");
        }
    }

    #[tokio::test]
    async fn an_answer_that_never_comes_is_a_timeout() {
        let (addr, _seen) = server(b"").await;
        let c = client(AddressPolicy::ALLOW_ALL, Vec::new());
        let started = std::time::Instant::now();
        let r = c
            .post(
                uri(&format!("http://{addr}/")),
                HeaderMap::new(),
                Bytes::new(),
                Duration::from_millis(200),
            )
            .await;
        assert_eq!(r.unwrap_err(), SendError::Timeout);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connection_failure() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let c = client(AddressPolicy::ALLOW_ALL, Vec::new());
        let r = post_empty(&c, &format!("http://{addr}/")).await;
        assert_eq!(r.unwrap_err(), SendError::Connect);
    }

    /// `localhost` resolves to loopback: the resolver drops the answer the policy refuses,
    /// so a name that passed the worker's check cannot be re-pointed at a refused address.
    #[tokio::test]
    async fn a_name_resolving_to_a_refused_address_is_not_connected() {
        let (addr, mut seen) = server(OK).await;
        let guarded = client(AddressPolicy::default(), Vec::new());
        let to = format!("http://localhost:{}/", addr.port());
        let r = post_empty(&guarded, &to).await;
        assert_eq!(r.unwrap_err(), SendError::Connect);
        assert!(seen.try_recv().is_err(), "nothing reached the server");

        let allowed = client(AddressPolicy::ALLOW_ALL, Vec::new());
        let answer = post_empty(&allowed, &to).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn an_override_names_the_address_of_a_host() {
        let (addr, mut seen) = server(OK).await;
        let loopback = AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        };
        let c = client(loopback, vec![("hooks.example.test".into(), addr)]);
        let answer = post_empty(&c, "http://hooks.example.test/in")
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        let (_, request) = seen.recv().await.unwrap();
        assert!(
            request.contains("host: hooks.example.test\r\n"),
            "{request}"
        );
    }

    /// An override passes the address policy like a resolved name: `--resolve` cannot map a
    /// host (under any port of a URL) to loopback unless loopback is allowed.
    #[tokio::test]
    async fn an_override_to_a_refused_address_is_not_connected() {
        let (addr, mut seen) = server(OK).await;
        let strict = client(
            AddressPolicy::default(),
            vec![("hooks.example.test".into(), addr)],
        );
        for url in [
            "http://hooks.example.test/in".to_string(),
            format!("http://hooks.example.test:{}/in", addr.port()),
        ] {
            let r = post_empty(&strict, &url).await;
            assert_eq!(r.unwrap_err(), SendError::Connect, "{url}");
        }
        assert!(seen.try_recv().is_err(), "nothing reached the server");
    }

    fn proxied(proxy: SocketAddr) -> DeliveryClient {
        let matcher = Matcher::builder()
            .all(format!("http://user:pa55@{proxy}"))
            .no("skipped.example.test")
            .build();
        DeliveryClient::new(AddressPolicy::default(), Vec::new(), Some(matcher), None).unwrap()
    }

    #[tokio::test]
    async fn plain_http_goes_to_the_proxy_with_the_whole_url_and_its_credentials() {
        let (proxy, mut seen) = server(OK).await;
        let c = proxied(proxy);
        let answer = c
            .post(
                uri("http://hooks.example.test:8080/in"),
                HeaderMap::new(),
                Bytes::from("{}"),
                SECOND,
            )
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        let (_, request) = seen.recv().await.unwrap();
        // "user:pa55" in base64.
        assert_head(
            &request,
            "POST http://hooks.example.test:8080/in HTTP/1.1",
            &["proxy-authorization: Basic dXNlcjpwYTU1"],
        );
    }

    #[tokio::test]
    async fn https_is_tunnelled_through_the_proxy() {
        // The proxy refuses the tunnel, so the delivery cannot connect; the CONNECT it
        // was asked for is what this test is about.
        let (proxy, mut seen) =
            server(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
        let c = proxied(proxy);
        let r = post_empty(&c, "https://hooks.example.test/in").await;
        assert_eq!(r.unwrap_err(), SendError::Connect);
        let (_, request) = seen.recv().await.unwrap();
        // The tunnel writes its header names capitalised.
        assert_head(
            &request,
            "CONNECT hooks.example.test:443 HTTP/1.1",
            &["Proxy-Authorization: Basic dXNlcjpwYTU1"],
        );
    }

    #[tokio::test]
    async fn no_proxy_hosts_are_reached_directly() {
        let (proxy, mut through_proxy) = server(OK).await;
        let c = proxied(proxy);
        // Not resolvable, and the proxy is not asked: a connection failure.
        let r = post_empty(&c, "http://skipped.example.test/in").await;
        assert_eq!(r.unwrap_err(), SendError::Connect);
        assert!(through_proxy.try_recv().is_err());
    }
}
