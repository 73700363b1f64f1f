//! Where an endpoint's events go, and whether they may go there: URL construction for a
//! Service or URL destination, test/demo resolution overrides, and the SSRF guard that
//! refuses link-local and cloud metadata addresses unless the operator allows them.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use url::Url;

use crate::api::endpoint as api;

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

/// Why events of an endpoint cannot leave. The controller turns it into a condition
/// (`reason()` is a condition reason); the events stay parked until it is fixed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// Resolves to a link-local or metadata address.
    #[error("destination resolves to a forbidden address ({0})")]
    Forbidden(&'static str),
    /// The URL is malformed or the host does not resolve.
    #[error("destination unresolvable: {0}")]
    Unresolvable(&'static str),
}

impl DestinationError {
    pub fn reason(&self) -> &'static str {
        match self {
            DestinationError::Forbidden(_) => {
                crate::api::conditions::reasons::DESTINATION_FORBIDDEN
            }
            DestinationError::Unresolvable(_) => {
                crate::api::conditions::reasons::DESTINATION_UNRESOLVABLE
            }
        }
    }
}

impl Destination {
    /// From `spec.destination`; a Service without a namespace is in the endpoint's.
    pub fn from_api(spec: &api::Destination, endpoint_namespace: &str) -> Option<Self> {
        match (&spec.service, &spec.url) {
            (Some(s), None) => Some(Destination::Service {
                name: s.name.clone(),
                namespace: s
                    .namespace
                    .clone()
                    .unwrap_or_else(|| endpoint_namespace.to_owned()),
                port: s.port,
                path: s.path.clone().unwrap_or_else(|| "/".into()),
            }),
            (None, Some(u)) => Some(Destination::Url(u.clone())),
            _ => None,
        }
    }

    pub fn url(&self) -> Result<Url, DestinationError> {
        let text = match self {
            Destination::Service {
                name,
                namespace,
                port,
                path,
            } => format!("http://{name}.{namespace}.svc:{port}{path}"),
            Destination::Url(u) => u.clone(),
        };
        let url = Url::parse(&text).map_err(|_| DestinationError::Unresolvable("invalid URL"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(DestinationError::Unresolvable("not an http(s) URL"));
        }
        Ok(url)
    }
}

const METADATA_HOSTS: [&str; 2] = ["metadata.google.internal", "metadata.google.internal."];

/// Link-local (which holds 169.254.169.254) and cloud metadata addresses.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4.is_link_local();
            }
            let aws_metadata = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == aws_metadata
        }
    }
}

/// Resolution overrides (`host:port` → address) and the guard, shared by every worker
/// and by the HTTP client's resolver.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    overrides: Arc<HashMap<String, SocketAddr>>,
    allow_link_local: bool,
}

impl Resolver {
    pub fn new(overrides: &[(String, SocketAddr)], allow_link_local: bool) -> Self {
        Self {
            overrides: Arc::new(overrides.iter().cloned().collect()),
            allow_link_local,
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), DestinationError> {
        if !self.allow_link_local && is_forbidden_ip(ip) {
            return Err(DestinationError::Forbidden(
                "link-local or metadata address",
            ));
        }
        Ok(())
    }

    /// Resolves and checks `url`; returns the URL to send to. For plain http an override
    /// replaces host and port (tests and the local demo map `*.svc` names to loopback
    /// ports); https keeps its host for TLS, the client's resolver applies the override.
    pub async fn target(&self, url: &Url) -> Result<Url, DestinationError> {
        let host = url
            .host_str()
            .ok_or(DestinationError::Unresolvable("no host"))?;
        let port = url
            .port_or_known_default()
            .ok_or(DestinationError::Unresolvable("no port"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if !self.allow_link_local && METADATA_HOSTS.contains(&bare.to_ascii_lowercase().as_str()) {
            return Err(DestinationError::Forbidden("cloud metadata host"));
        }
        if let Some(addr) = self.overrides.get(&format!("{bare}:{port}")) {
            self.check(addr.ip())?;
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
        if let Ok(ip) = bare.parse::<IpAddr>() {
            self.check(ip)?;
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

    /// The overrides for https hosts, for the HTTP client (`ClientBuilder::resolve`).
    pub fn https_overrides(&self) -> Vec<(String, SocketAddr)> {
        self.overrides
            .iter()
            .filter_map(|(hp, a)| hp.rsplit_once(':').map(|(h, _)| (h.to_owned(), *a)))
            .collect()
    }
}

/// The HTTP client's DNS resolver: system resolution with forbidden addresses removed, so
/// a name that changes its answer between the check and the request (DNS rebinding)
/// still cannot reach metadata.
pub struct GuardedDns {
    pub allow_link_local: bool,
}

impl reqwest::dns::Resolve for GuardedDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_link_local;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow || !is_forbidden_ip(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err("no permitted address".into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        let cases = [
            ("169.254.169.254", true),
            ("169.254.1.1", true),
            ("fe80::1", true),
            ("fd00:ec2::254", true),
            ("::ffff:169.254.169.254", true),
            ("127.0.0.1", false),
            ("10.0.0.1", false),
            ("::1", false),
            ("fd00::1", false),
        ];
        for (ip, want) in cases {
            assert_eq!(is_forbidden_ip(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[tokio::test]
    async fn guard_and_overrides() {
        let over = vec![(
            "sink.ns.svc:8080".to_owned(),
            "127.0.0.1:40001".parse().unwrap(),
        )];
        let r = Resolver::new(&over, false);
        let svc = Destination::Service {
            name: "sink".into(),
            namespace: "ns".into(),
            port: 8080,
            path: "/in".into(),
        };
        let t = r.target(&svc.url().unwrap()).await.unwrap();
        assert_eq!(t.as_str(), "http://127.0.0.1:40001/in");
        for bad in [
            "http://169.254.169.254/latest",
            "http://[fe80::1]:80/",
            "http://metadata.google.internal/computeMetadata",
        ] {
            let u = Destination::Url(bad.into()).url().unwrap();
            assert!(
                matches!(r.target(&u).await, Err(DestinationError::Forbidden(_))),
                "{bad}"
            );
        }
        let allowed = Resolver::new(&[], true);
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
