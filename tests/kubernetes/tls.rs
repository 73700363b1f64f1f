//! `spec.destination.tls` through the real binary: a loopback TLS consumer that requires a
//! client certificate signed by its CA. Delivered with the right CA and client
//! certificate; still delivered, without a restart, after the client certificate's
//! Secret is rotated (the consumer sees the new certificate); a wrong CA, and then a
//! client certificate the consumer does not trust, give `Healthy=False` with reason
//! `TLSHandshakeFailed` and a message that says which. Certificates are made at test time
//! with the `openssl` command.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_rustls::rustls;

use crate::delivery_e2e::{atlas_event, condition_of, ingress_url, send_json, wait_false};
use crate::fixtures::*;
use crate::support::{TestEnv, wait_until};

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name` (`name.crt`, `name.key`).
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A leaf `name` signed by the CA `ca`, for a server (`localhost`) or a client.
fn leaf(dir: &Path, name: &str, ca: &str, server: bool) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let ext = if server {
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    } else {
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"
    };
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// A TLS listener that requires a client certificate signed by `ca` and records the
/// client certificate of each handshake (and the handshakes that failed).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    seen: Seen,
}

#[derive(Clone, Default)]
struct Seen {
    /// The DER of each accepted handshake's client certificate, in order.
    client_certs: Arc<Mutex<Vec<Vec<u8>>>>,
    failed_handshakes: Arc<Mutex<u64>>,
    received: Arc<Mutex<u64>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => {
                    if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        self.seen.client_certs.lock().unwrap().push(cert.to_vec());
                    }
                    return (tls, addr);
                }
                Err(_) => *self.seen.failed_handshakes.lock().unwrap() += 1,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Serves `https://localhost:PORT/` with `server.crt`, requiring client certificates
/// signed by `ca.crt`; answers 200.
async fn tls_consumer(dir: &Path) -> (u16, Seen) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(read(dir, "ca.crt").as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(read(dir, "server.crt").as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(read(dir, "server.key").as_bytes()).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let seen = Seen::default();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        seen: seen.clone(),
    };
    let counted = seen.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            *counted.received.lock().unwrap() += 1;
            StatusCode::OK
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}

/// Creates or replaces a Secret of `type_` with `data`.
async fn put_secret(env: &TestEnv, name: &str, type_: &str, data: serde_json::Value) {
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.namespace);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "type": type_, "stringData": data
    }))
    .unwrap();
    secrets
        .patch(
            name,
            &PatchParams::apply("tls-test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

async fn wait_received(seen: &Seen, n: u64, what: &str) {
    wait_until(Duration::from_secs(60), what, || {
        let got = *seen.received.lock().unwrap();
        async move { (got >= n).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn mtls_delivers_rotates_without_restart_and_names_tls_failures() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    ca(dir, "ca");
    ca(dir, "other-ca");
    leaf(dir, "server", "ca", true);
    leaf(dir, "client-one", "ca", false);
    leaf(dir, "client-two", "ca", false);
    leaf(dir, "client-stranger", "other-ca", false);
    let (port, seen) = tls_consumer(dir).await;

    let env_prefix = "tls";
    let spec = json!({
        "destination": {
            "url": format!("https://localhost:{port}/events"),
            "tls": {
                "caSecretRef": {"name": "consumer-ca", "key": "ca.crt"},
                "clientCertSecretRef": {"name": "client-cert"},
            },
        },
        "delivery": {"retry": {"initialDelay": "100ms", "maxDelay": "200ms", "maxAttempts": 50}},
    });
    // The Secrets exist before the operator reads the endpoint.
    let env = crate::support::test_env(env_prefix).await;
    put_secret(
        &env,
        "consumer-ca",
        "Opaque",
        json!({"ca.crt": read(dir, "ca.crt")}),
    )
    .await;
    put_secret(
        &env,
        "client-cert",
        "kubernetes.io/tls",
        json!({"tls.crt": read(dir, "client-one.crt"), "tls.key": read(dir, "client-one.key")}),
    )
    .await;
    let (env, _sandbox, _consumer, mut operator, _dir, _) =
        crate::delivery_e2e::setup_in(env, spec, &[]).await;
    apply_subscription(&env, "atlas", specs()[0].1.clone()).await;
    wait_condition(&env, "atlas", "Ready", "True", None).await;
    let url = format!("{}/atlas", ingress_url(&env, "orders").await);
    let pid = operator.child.id();

    // 1. The right CA and client certificate: delivered, with client-one's certificate.
    assert_eq!(
        send_json(&url, &atlas_event("tls-1"))
            .await
            .unwrap()
            .status(),
        200
    );
    wait_received(&seen, 1, "the first event delivered over mTLS").await;
    let one = der(&read(dir, "client-one.crt"));
    assert_eq!(
        seen.client_certs.lock().unwrap().last(),
        Some(&one),
        "the consumer saw client-one's certificate"
    );
    println!(
        "mTLS: delivered 1 with client-one (handshakes {}, failed {})",
        seen.client_certs.lock().unwrap().len(),
        seen.failed_handshakes.lock().unwrap()
    );

    // 2. The client certificate rotates in its Secret: the next event goes with the new
    // one, from the same process.
    put_secret(
        &env,
        "client-cert",
        "kubernetes.io/tls",
        json!({"tls.crt": read(dir, "client-two.crt"), "tls.key": read(dir, "client-two.key")}),
    )
    .await;
    let two = der(&read(dir, "client-two.crt"));
    // The operator picks the Secret up on its watch: wait until it is in use, sending one
    // event per try (each must be delivered either way: both certificates are valid).
    let mut sent = 1;
    wait_until(
        Duration::from_secs(60),
        "a handshake with client-two",
        || {
            sent += 1;
            let url = url.clone();
            let seen = seen.clone();
            let two = two.clone();
            let id = format!("tls-{sent}");
            async move {
                assert_eq!(
                    send_json(&url, &atlas_event(&id)).await.unwrap().status(),
                    200
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
                seen.client_certs
                    .lock()
                    .unwrap()
                    .contains(&two)
                    .then_some(())
            }
        },
    )
    .await;
    wait_received(&seen, sent, "every event delivered across the rotation").await;
    assert!(operator.child.try_wait().unwrap().is_none(), "no restart");
    assert_eq!(operator.child.id(), pid);
    println!(
        "mTLS: rotated to client-two; {sent} events delivered, handshakes {}, failed {}",
        seen.client_certs.lock().unwrap().len(),
        seen.failed_handshakes.lock().unwrap()
    );

    // 3. A CA that did not sign the consumer's certificate: Healthy=False, TLSHandshakeFailed.
    put_secret(
        &env,
        "consumer-ca",
        "Opaque",
        json!({"ca.crt": read(dir, "other-ca.crt")}),
    )
    .await;
    let delivered_before = *seen.received.lock().unwrap();
    // Events sent until the operator uses the new CA fail; one is enough once it does.
    let mut n = 0;
    let ep = loop {
        n += 1;
        assert_eq!(
            send_json(&url, &atlas_event(&format!("tls-bad-{n}")))
                .await
                .unwrap()
                .status(),
            200
        );
        let waited = tokio::time::timeout(
            Duration::from_secs(20),
            wait_false(
                &env,
                "orders",
                "Healthy=False TLSHandshakeFailed",
                "Healthy",
                "TLSHandshakeFailed",
            ),
        )
        .await;
        if let Ok(ep) = waited {
            break ep;
        }
        let api: Api<webhook_operator::api::WebhookEndpoint> =
            Api::namespaced(env.client.clone(), &env.namespace);
        let now = api.get("orders").await.unwrap();
        let status = now.status.as_ref();
        assert!(
            n < 4,
            "no TLSHandshakeFailed after {n} events with a wrong CA: {:?} {:?}; received {}",
            status.map(|s| &s.conditions),
            status.and_then(|s| s.delivery.as_ref()),
            seen.received.lock().unwrap()
        );
    };
    let healthy = condition_of(ep, "Healthy");
    println!(
        "wrong CA: Healthy={} {}: {}",
        healthy.status, healthy.reason, healthy.message
    );
    assert!(
        healthy.message.contains("not signed by a trusted CA"),
        "{}",
        healthy.message
    );
    assert!(
        !healthy.message.contains("BEGIN"),
        "no certificate material in the status"
    );
    assert!(
        *seen.received.lock().unwrap() <= delivered_before + n,
        "at most the events sent before the new CA was in use were delivered"
    );

    // 4. The right CA again, but a client certificate the consumer's CA did not sign:
    // the consumer refuses it, and the condition says so.
    put_secret(
        &env,
        "client-cert",
        "kubernetes.io/tls",
        json!({"tls.crt": read(dir, "client-stranger.crt"), "tls.key": read(dir, "client-stranger.key")}),
    )
    .await;
    put_secret(
        &env,
        "consumer-ca",
        "Opaque",
        json!({"ca.crt": read(dir, "ca.crt")}),
    )
    .await;
    let failed_before = *seen.failed_handshakes.lock().unwrap();
    let ep = crate::delivery_e2e::wait_endpoint(
        &env,
        "orders",
        "Healthy=False TLSHandshakeFailed, client certificate refused",
        |ep| {
            let c = condition_of(ep.clone(), "Healthy");
            c.reason == "TLSHandshakeFailed" && c.message.contains("refused the client certificate")
        },
    )
    .await;
    let healthy = condition_of(ep, "Healthy");
    println!(
        "stranger client certificate: Healthy={} {}: {}",
        healthy.status, healthy.reason, healthy.message
    );
    assert!(
        *seen.failed_handshakes.lock().unwrap() > failed_before,
        "the consumer refused handshakes"
    );
    assert!(operator.child.try_wait().unwrap().is_none(), "no restart");
}
