//! Tenant isolation of an endpoint's destination, decided the same way by the reconciler
//! and by route sync: a Service in another namespace only with
//! `--allow-cross-namespace-refs`, and the [`AddressPolicy`](crate::delivery::AddressPolicy)
//! applied to what is known before any DNS lookup. Pure: no API call, no resolution.

use crate::api::conditions::reasons;
use crate::api::endpoint::Destination as ApiDestination;
use crate::delivery::{Destination, Resolver};

/// Why an endpoint's destination is refused: a condition reason and a message (no secret).
pub type Refusal = (&'static str, String);

/// From `spec.destination`; a Service without a namespace is in the endpoint's.
pub fn destination(spec: &ApiDestination, endpoint_namespace: &str) -> Option<Destination> {
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

/// Where endpoints may deliver: the operator's flags, as the reconciler and route sync
/// check them.
pub struct Destinations {
    /// `--allow-cross-namespace-refs`.
    pub allow_cross_namespace_refs: bool,
    /// The address policy and resolution overrides.
    pub resolver: Resolver,
}

impl Destinations {
    /// [`check_destination`] under these flags.
    pub fn check(&self, spec: &ApiDestination, endpoint_namespace: &str) -> Result<(), Refusal> {
        check_destination(
            spec,
            endpoint_namespace,
            self.allow_cross_namespace_refs,
            &self.resolver,
        )
    }
}

/// `Err` when the endpoint in `endpoint_namespace` may not deliver to `spec`.
pub fn check_destination(
    spec: &ApiDestination,
    endpoint_namespace: &str,
    allow_cross_namespace_refs: bool,
    resolver: &Resolver,
) -> Result<(), Refusal> {
    let destination = destination(spec, endpoint_namespace).ok_or_else(|| {
        (
            reasons::INVALID_SPEC,
            "exactly one of destination.service or destination.url must be set".to_string(),
        )
    })?;
    if let Destination::Service { namespace, .. } = &destination
        && namespace != endpoint_namespace
        && !allow_cross_namespace_refs
    {
        return Err((
            reasons::CROSS_NAMESPACE_REF_DENIED,
            format!(
                "destination.service.namespace {namespace:?} is not the endpoint's namespace; \
                 the operator does not allow cross-namespace references"
            ),
        ));
    }
    let url = destination
        .url()
        .map_err(|e| (e.reason(), format!("destination: {e}")))?;
    resolver
        .check_static(&url)
        .map_err(|e| (e.reason(), format!("destination: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::endpoint::ServiceDestination;
    use crate::delivery::AddressPolicy;

    fn service(namespace: Option<&str>) -> ApiDestination {
        ApiDestination {
            service: Some(ServiceDestination {
                name: "sink".into(),
                namespace: namespace.map(Into::into),
                port: 8080,
                path: None,
            }),
            url: None,
            tls: None,
        }
    }

    fn url(u: &str) -> ApiDestination {
        ApiDestination {
            service: None,
            url: Some(u.into()),
            tls: None,
        }
    }

    #[test]
    fn refusals_and_their_reasons() {
        let strict = Resolver::new(&[], AddressPolicy::default());
        let loopback = Resolver::new(
            &[],
            AddressPolicy {
                allow_loopback: true,
                ..Default::default()
            },
        );
        let reason = |spec: &ApiDestination, cross: bool, r: &Resolver| {
            check_destination(spec, "team-a", cross, r)
                .err()
                .map(|e| e.0)
        };
        // (destination, cross-namespace allowed, resolver, expected refusal)
        let cases: [(ApiDestination, bool, &Resolver, Option<&str>); 9] = [
            (service(None), false, &strict, None),
            (service(Some("team-a")), false, &strict, None),
            (
                service(Some("team-b")),
                false,
                &strict,
                Some("CrossNamespaceRefDenied"),
            ),
            (service(Some("team-b")), true, &strict, None),
            (
                url("http://127.0.0.1:9090/metrics"),
                false,
                &strict,
                Some("DestinationForbidden"),
            ),
            (url("http://127.0.0.1:9090/metrics"), false, &loopback, None),
            (
                url("https://[::ffff:169.254.169.254]/"),
                false,
                &loopback,
                Some("DestinationForbidden"),
            ),
            (
                url("https://168.63.129.16/"),
                false,
                &loopback,
                Some("DestinationForbidden"),
            ),
            (url("https://hooks.example.com/in"), false, &strict, None),
        ];
        for (spec, cross, r, want) in cases {
            assert_eq!(reason(&spec, cross, r), want, "{spec:?} cross={cross}");
        }
        let mut bad = service(None);
        bad.service.as_mut().unwrap().name = "x@127.0.0.1:9090/metrics#".into();
        assert_eq!(
            reason(&bad, false, &loopback),
            Some("DestinationUnresolvable")
        );
    }
}
