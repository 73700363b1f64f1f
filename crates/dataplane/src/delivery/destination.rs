//! Where an endpoint's events go, and whether they may go there: URL construction for a
//! Service or URL destination, test/demo resolution overrides, and the SSRF guard that
//! applies the [`AddressPolicy`] to every address a destination reaches.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use url::Url;

use super::address_policy::{AddressClass, AddressPolicy};
pub use crate::health::DestinationError;

/// A delivery target as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// `http://<name>.<namespace>.svc:<port><path>`.
    Service {
        name: String,
        namespace: String,
        port: u16,
        path: String,
    },
    Url(String),
}

impl Destination {
    /// The URL to deliver to. A Service URL is assembled from its parts with a URL type,
    /// never by formatting, and its name and namespace must be DNS labels, so they cannot
    /// carry user info, another host or a path.
    pub fn url(&self) -> Result<Url, DestinationError> {
        let url = match self {
            Destination::Service {
                name,
                namespace,
                port,
                path,
            } => {
                if !is_dns_label(name) || !is_dns_label(namespace) {
                    return Err(DestinationError::Unresolvable(
                        "service name and namespace must be DNS labels",
                    ));
                }
                let mut url = Url::parse("http://service.invalid/").expect("static URL");
                url.set_host(Some(&format!("{name}.{namespace}.svc")))
                    .map_err(|_| DestinationError::Unresolvable("invalid service host"))?;
                url.set_port(Some(*port))
                    .map_err(|_| DestinationError::Unresolvable("invalid service port"))?;
                let (path, query) = match path.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (path.as_str(), None),
                };
                url.set_path(path);
                url.set_query(query);
                url
            }
            Destination::Url(u) => {
                Url::parse(u).map_err(|_| DestinationError::Unresolvable("invalid URL"))?
            }
        };
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(DestinationError::Unresolvable("not an http(s) URL"));
        }
        Ok(url)
    }
}

/// An RFC 1123 DNS label: what Kubernetes accepts as a namespace or Service name.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The URL's host, without the brackets of an IPv6 literal, and port.
fn host_port(url: &Url) -> Result<(&str, u16), DestinationError> {
    let host = url
        .host_str()
        .ok_or(DestinationError::Unresolvable("no host"))?;
    let port = url
        .port_or_known_default()
        .ok_or(DestinationError::Unresolvable("no port"))?;
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

fn forbidden(class: AddressClass) -> DestinationError {
    DestinationError::Forbidden(class.describe())
}

/// Resolution overrides (`host:port` → address) and the guard, shared by every worker
/// and by the HTTP client's resolver.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    overrides: Arc<HashMap<String, SocketAddr>>,
    policy: AddressPolicy,
}

impl Resolver {
    pub fn new(overrides: &[(String, SocketAddr)], policy: AddressPolicy) -> Self {
        Self {
            overrides: Arc::new(overrides.iter().cloned().collect()),
            policy,
        }
    }

    pub fn policy(&self) -> AddressPolicy {
        self.policy
    }

    fn check(&self, ip: IpAddr) -> Result<(), DestinationError> {
        self.policy.check(ip).map_err(forbidden)
    }

    /// What can be decided without DNS, at reconcile time: the URL's metadata host name,
    /// an IP literal, a resolution override. A DNS name is checked again at each attempt
    /// and on each connection (its answer may change).
    pub fn check_static(&self, url: &Url) -> Result<(), DestinationError> {
        let (bare, port) = host_port(url)?;
        self.policy.check_host_name(bare).map_err(forbidden)?;
        if let Some(addr) = self.overrides.get(&format!("{bare}:{port}")) {
            return self.check(addr.ip());
        }
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }

    /// Resolves and checks `url`; returns the URL to send to. For plain http an override
    /// replaces host and port (tests and the local demo map `*.svc` names to loopback
    /// ports); https keeps its host for TLS, the client's resolver applies the override.
    pub async fn target(&self, url: &Url) -> Result<Url, DestinationError> {
        let (bare, port) = host_port(url)?;
        self.check_static(url)?;
        if let Some(addr) = self.overrides.get(&format!("{bare}:{port}")) {
            if url.scheme() == "http" {
                let mut out = url.clone();
                out.set_ip_host(addr.ip())
                    .map_err(|_| DestinationError::Unresolvable("invalid override"))?;
                out.set_port(Some(addr.port()))
                    .map_err(|_| DestinationError::Unresolvable("invalid override"))?;
                return Ok(out);
            }
            return Ok(url.clone());
        }
        if bare.parse::<IpAddr>().is_ok() {
            return Ok(url.clone());
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|_| DestinationError::Unresolvable("host does not resolve"))?
            .collect();
        if addrs.is_empty() {
            return Err(DestinationError::Unresolvable("host does not resolve"));
        }
        // Any forbidden answer refuses the destination: a name that sometimes points at
        // metadata is not one to trust.
        for a in &addrs {
            self.check(a.ip())?;
        }
        Ok(url.clone())
    }

    /// The overrides for https hosts, for the HTTP client ([`super::client::DeliveryClient`]).
    pub fn https_overrides(&self) -> Vec<(String, SocketAddr)> {
        self.overrides
            .iter()
            .filter_map(|(hp, a)| hp.rsplit_once(':').map(|(h, _)| (h.to_owned(), *a)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, namespace: &str, path: &str) -> Destination {
        Destination::Service {
            name: name.into(),
            namespace: namespace.into(),
            port: 8080,
            path: path.into(),
        }
    }

    #[test]
    fn service_url_is_built_from_parts_and_names_must_be_labels() {
        let u = service("sink", "ns", "/in?x=1").url().unwrap();
        assert_eq!(u.as_str(), "http://sink.ns.svc:8080/in?x=1");
        assert_eq!(u.host_str(), Some("sink.ns.svc"));
        // URL syntax in a name or namespace is refused, never spliced into the URL.
        for (name, ns) in [
            ("x@127.0.0.1:9090/metrics#", "ns"),
            ("sink", "ns.svc:1@evil"),
            ("sink:80", "ns"),
            ("Sink", "ns"),
            ("-sink", "ns"),
            ("", "ns"),
            ("sink", &"n".repeat(64)),
        ] {
            assert!(
                matches!(
                    service(name, ns, "/").url(),
                    Err(DestinationError::Unresolvable(_))
                ),
                "{name} / {ns}"
            );
        }
        // A '#' or '@' in the path stays in the path.
        let u = service("sink", "ns", "/a@127.0.0.1#frag").url().unwrap();
        assert_eq!(u.host_str(), Some("sink.ns.svc"));
        assert_eq!(u.fragment(), None);
    }

    #[tokio::test]
    async fn guard_and_overrides() {
        let over = vec![(
            "sink.ns.svc:8080".to_owned(),
            "127.0.0.1:40001".parse().unwrap(),
        )];
        let loopback = AddressPolicy {
            allow_loopback: true,
            ..Default::default()
        };
        let r = Resolver::new(&over, loopback);
        let svc = service("sink", "ns", "/in");
        let t = r.target(&svc.url().unwrap()).await.unwrap();
        assert_eq!(t.as_str(), "http://127.0.0.1:40001/in");
        // The same override under the default policy: loopback is refused.
        let strict = Resolver::new(&over, AddressPolicy::default());
        let u = svc.url().unwrap();
        assert!(matches!(
            strict.check_static(&u),
            Err(DestinationError::Forbidden(_))
        ));
        assert!(matches!(
            strict.target(&u).await,
            Err(DestinationError::Forbidden(_))
        ));
        for bad in [
            "http://169.254.169.254/latest",
            "http://[fe80::1]:80/",
            "http://metadata.google.internal/computeMetadata",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "https://100.100.100.200/",
        ] {
            let u = Destination::Url(bad.into()).url().unwrap();
            assert!(
                matches!(r.target(&u).await, Err(DestinationError::Forbidden(_))),
                "{bad}"
            );
        }
        // The URL type normalises numeric hosts: 2130706433 is 127.0.0.1.
        for bad in [
            "http://2130706433:9090/metrics",
            "http://0x7f000001/",
            "http://0.0.0.0:9090/",
        ] {
            let u = Destination::Url(bad.into()).url().unwrap();
            assert!(
                matches!(strict.check_static(&u), Err(DestinationError::Forbidden(_))),
                "{bad}"
            );
        }
        let allowed = Resolver::new(&[], AddressPolicy::ALLOW_ALL);
        let u = Destination::Url("http://169.254.169.254/".into())
            .url()
            .unwrap();
        assert!(allowed.target(&u).await.is_ok());
        assert!(matches!(
            Destination::Url("ftp://x/".into()).url(),
            Err(DestinationError::Unresolvable(_))
        ));
    }
}
