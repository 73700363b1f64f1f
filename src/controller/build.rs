//! The one build of what the data plane needs from the cluster's objects: an endpoint's
//! delivery settings ([`endpoint_delivery`]) and a subscription's verification keys
//! ([`verification_keys`]). The leader's reconcilers and a follower's route sync both
//! build through here, so the two cannot drift.
//!
//! The build writes nothing and calls no one: it reads Secrets through [`SecretRead`],
//! which the leader implements with what its pass read from (and wrote to) the API
//! ([`Fetched`]) and a follower with its cache (`route_sync::SecretCache`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use hmac::{Hmac, Mac};
use kube::ResourceExt;
use kube::api::ObjectMeta;
use sha2::Sha256;

use super::rotation;
use super::routes::EndpointDelivery;
use super::secrets::{self, OwnedSecretError, SecretData, SecretError, SecretStore};
use crate::api::conditions::reasons;
use crate::api::endpoint::{INGRESS_SECRET_KEY, SIGNING_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::api::subscription::{HEADER_VALUE_KEY, SIGNING_SECRET_KEY};
use crate::api::{Provider, WebhookEndpoint, WebhookSubscription};
use crate::dataplane::DestinationTls;
use crate::inbound::VerificationKeys;

/// A reason a build cannot finish (condition reason, message without any value).
pub type Problem = (&'static str, String);

/// How the build reads Secrets.
pub trait SecretRead {
    /// The data of the Secret `name` the operator generated for `owner`: `None` while it
    /// does not exist, `NotOwned` when a Secret of that name is someone else's.
    fn owned(
        &self,
        owner: &ObjectMeta,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, OwnedSecretError>;
    /// A Secret a spec names, in `namespace`, under the opt-in label rule.
    fn referenced(&self, namespace: &str, name: &str) -> Result<SecretData, SecretError>;
}

/// What a leader's pass read from and wrote to the API, as the build reads it.
#[derive(Default)]
pub struct Fetched {
    /// Generated Secrets by name: their data, or `Err` when someone else owns the name.
    owned: HashMap<String, Result<BTreeMap<String, Vec<u8>>, ()>>,
    referenced: HashMap<String, Result<SecretData, SecretError>>,
}

impl Fetched {
    /// Records a generated Secret's data as read or written (or that it is not ours).
    pub fn set_owned(&mut self, name: &str, data: Result<BTreeMap<String, Vec<u8>>, ()>) {
        self.owned.insert(name.to_string(), data);
    }

    /// Reads the generated Secret `name` of `owner` from the API (nothing recorded while
    /// it does not exist).
    pub async fn read_owned<K: kube::Resource<DynamicType = ()>>(
        &mut self,
        store: &SecretStore,
        owner: &K,
        name: &str,
    ) -> Result<(), OwnedSecretError> {
        let data = secrets::read_owned(store, owner, name).await?;
        if !data.is_empty() {
            self.set_owned(name, Ok(data));
        }
        Ok(())
    }

    /// Reads the Secret `name` a spec names from the API, once per pass.
    pub async fn read_referenced(&mut self, store: &SecretStore, namespace: &str, name: &str) {
        if !self.referenced.contains_key(name) {
            let read = secrets::read_referenced(store, namespace, name).await;
            self.referenced.insert(name.to_string(), read);
        }
    }
}

impl SecretRead for Fetched {
    fn owned(
        &self,
        _owner: &ObjectMeta,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, OwnedSecretError> {
        match self.owned.get(name) {
            None => Ok(None),
            Some(Ok(data)) => Ok(Some(data.clone())),
            Some(Err(())) => Err(OwnedSecretError::NotOwned(name.to_string())),
        }
    }

    fn referenced(&self, _namespace: &str, name: &str) -> Result<SecretData, SecretError> {
        self.referenced
            .get(name)
            .cloned()
            .unwrap_or_else(|| Err(SecretError::NotFound(name.to_string())))
    }
}

/// The path token: derived from the endpoint's random key, not from its name, so knowing
/// the name does not reveal the URL.
pub fn ingress_token(key: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"webhook-operator ingress token v1");
    hex::encode(&mac.finalize().into_bytes()[..20])
}

/// The secrets in force for `current`, newest first: it and, inside the overlap window
/// recorded in the generated Secret's `stored` data, the one it replaced.
fn in_force(stored: &BTreeMap<String, Vec<u8>>, current: Vec<u8>) -> Vec<Vec<u8>> {
    // The window's end is stored, so the overlap length does not matter here.
    rotation::decide(stored, &current, jiff::Timestamp::now(), Duration::ZERO).secrets
}

/// The value under `key` of the generated Secret `name`.
fn owned_key(
    secrets: &impl SecretRead,
    owner: &ObjectMeta,
    name: &str,
    key: &str,
) -> Result<Vec<u8>, Problem> {
    match secrets.owned(owner, name) {
        Ok(data) => data.and_then(|d| d.get(key).cloned()).ok_or_else(|| {
            let e = SecretError::MissingKey(name.to_string(), key.to_string());
            (e.reason(), e.to_string())
        }),
        Err(e) => Err((reasons::SECRET_NOT_OWNED, e.to_string())),
    }
}

/// The endpoint's signing secret: the one its spec names, else the generated one in
/// `owned` (the data of `<endpoint>-signing`).
pub fn signing_secret(
    ep: &WebhookEndpoint,
    secrets: &impl SecretRead,
    owned: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<u8>, Problem> {
    match ep.spec.signing.as_ref().and_then(|s| s.secret_ref.as_ref()) {
        Some(r) => secrets
            .referenced(&ep.namespace().unwrap_or_default(), &r.name)
            .and_then(|s| s.get(&r.key).map(<[u8]>::to_vec))
            .map_err(|e| (e.reason(), format!("signing secret: {e}"))),
        None => owned.get(SIGNING_KEY).cloned().ok_or_else(|| {
            let e = SecretError::MissingKey(ep.signing_secret_name(), SIGNING_KEY.into());
            (e.reason(), e.to_string())
        }),
    }
}

/// Everything delivery needs about `ep`, or every reason it cannot be built yet.
pub fn endpoint_delivery(
    ep: &WebhookEndpoint,
    secrets: &impl SecretRead,
) -> Result<EndpointDelivery, Vec<Problem>> {
    let ns = ep.namespace().unwrap_or_default();
    let mut problems = Vec::new();
    let token = owned_key(
        secrets,
        &ep.metadata,
        &ep.ingress_secret_name(),
        INGRESS_SECRET_KEY,
    )
    .map_err(|p| problems.push(p))
    .ok();
    // The rotation state lives in the generated `<endpoint>-signing` Secret: one someone
    // else owns means no signing secret at all.
    let owned = secrets
        .owned(&ep.metadata, &ep.signing_secret_name())
        .map_err(|e| problems.push((reasons::SECRET_NOT_OWNED, e.to_string())))
        .ok()
        .map(Option::unwrap_or_default);
    let signing = owned.as_ref().and_then(|owned| {
        signing_secret(ep, secrets, owned)
            .map_err(|p| problems.push(p))
            .ok()
            .map(|current| in_force(owned, current))
    });
    let mut headers = Vec::new();
    for h in &ep.spec.headers {
        let r = &h.secret_key_ref;
        match secrets
            .referenced(&ns, &r.name)
            .and_then(|s| s.get_string(&r.key))
        {
            Ok(v) => headers.push((h.name.clone(), v)),
            Err(e) => problems.push((e.reason(), format!("header {}: {e}", h.name))),
        }
    }
    let tls = destination_tls(ep, secrets, &ns)
        .map_err(|p| problems.push(p))
        .ok();
    match (token, signing, tls) {
        (Some(token), Some(signing_secrets), Some(tls)) if problems.is_empty() => {
            Ok(EndpointDelivery {
                key: super::routes::key_of(ep),
                token: ingress_token(&token),
                spec: ep.spec.clone(),
                signing_secrets,
                headers,
                filter: ep
                    .spec
                    .filter
                    .as_deref()
                    .map(crate::delivery::filter::Filter::compile)
                    .transpose(),
                dedupe: ep.spec.dedupe.as_ref().map(dedupe_key).transpose(),
                tls,
            })
        }
        _ => Err(problems),
    }
}

/// `spec.destination.tls` with its Secrets read: the CA bundle under its key, the client
/// certificate and key of a `kubernetes.io/tls` Secret.
fn destination_tls(
    ep: &WebhookEndpoint,
    secrets: &impl SecretRead,
    ns: &str,
) -> Result<Option<DestinationTls>, Problem> {
    let Some(tls) = ep.spec.destination.tls.as_ref() else {
        return Ok(None);
    };
    let ca_pem = match &tls.ca_secret_ref {
        Some(r) => Some(
            secrets
                .referenced(ns, &r.name)
                .and_then(|s| s.get(&r.key).map(<[u8]>::to_vec))
                .map_err(|e| (e.reason(), format!("destination.tls.caSecretRef: {e}")))?,
        ),
        None => None,
    };
    let client_cert_pem = match &tls.client_cert_secret_ref {
        Some(r) => {
            let pair = secrets
                .referenced(ns, &r.name)
                .and_then(|s| Ok((s.get(TLS_CERT_KEY)?.to_vec(), s.get(TLS_KEY_KEY)?.to_vec())));
            Some(pair.map_err(|e| {
                (
                    e.reason(),
                    format!("destination.tls.clientCertSecretRef: {e}"),
                )
            })?)
        }
        None => None,
    };
    Ok(Some(DestinationTls {
        ca_pem,
        client_cert_pem,
    }))
}

/// The keys the ingress verifies `sub`'s requests with: the Atllas header value, or the
/// provider's signing secret (none while the provider has not issued one) with the
/// signature scheme of the spec. `None` while a generated Secret it needs is missing or
/// someone else's.
pub fn verification_keys(
    sub: &WebhookSubscription,
    secrets: &impl SecretRead,
) -> Option<VerificationKeys> {
    let (signature_header, signature_encoding) = sub.spec.signature_scheme();
    let signature_encoding = super::to_dataplane::signature_encoding(signature_encoding);
    if sub.spec.provider == Provider::Atllas {
        let name = sub.atllas_header_secret_name();
        let value = owned_key(secrets, &sub.metadata, &name, HEADER_VALUE_KEY).ok()?;
        return Some(VerificationKeys {
            secrets: vec![value],
            header_name: Some(sub.spec.atllas_header_name()),
            signature_encoding,
        });
    }
    let stored = secrets
        .owned(&sub.metadata, &sub.provider_signing_secret_name())
        .ok()
        .flatten()
        .unwrap_or_default();
    let keys = stored
        .get(SIGNING_SECRET_KEY)
        .map(|current| in_force(&stored, current.clone()))
        .unwrap_or_default();
    Some(VerificationKeys {
        secrets: keys,
        header_name: signature_header,
        signature_encoding,
    })
}

/// `spec.dedupe`, compiled; `Err` names the field at fault.
fn dedupe_key(d: &crate::api::endpoint::Dedupe) -> Result<crate::ingress::DedupeKey, String> {
    let window = d
        .window
        .as_deref()
        .map(crate::api::duration::parse_go_duration)
        .transpose()
        .map_err(|e| format!("window: {e}"))?;
    crate::ingress::DedupeKey::compile(&d.key, window).map_err(|e| format!("key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::subscription::DEFAULT_ATLLAS_HEADER;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    type Pairs<'a> = &'a [(&'a str, &'a [u8])];

    fn map(data: Pairs) -> BTreeMap<String, Vec<u8>> {
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect()
    }

    /// Secrets as a pass read them: generated ones (`None`: someone else owns the name)
    /// and referenced ones (`None`: not labelled referable).
    fn given(owned: &[(&str, Option<Pairs>)], referenced: &[(&str, Option<Pairs>)]) -> Fetched {
        let mut fetched = Fetched::default();
        for (name, data) in owned {
            fetched.set_owned(name, data.map(map).ok_or(()));
        }
        for (name, data) in referenced {
            let read = data
                .map(|data| {
                    SecretData::of(&Secret {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            ..Default::default()
                        },
                        data: Some(
                            map(data)
                                .into_iter()
                                .map(|(k, v)| (k, ByteString(v)))
                                .collect(),
                        ),
                        ..Default::default()
                    })
                })
                .ok_or_else(|| SecretError::NotReferable(name.to_string()));
            fetched.referenced.insert(name.to_string(), read);
        }
        fetched
    }

    fn object<K: serde::de::DeserializeOwned>(
        kind: &str,
        name: &str,
        mut spec: serde_json::Value,
        extra: serde_json::Value,
    ) -> K {
        for (k, v) in extra.as_object().expect("an object") {
            spec[k] = v.clone();
        }
        super::super::test_support::object(kind, "a", name, spec)
    }

    fn endpoint(extra: serde_json::Value) -> WebhookEndpoint {
        let spec = serde_json::json!({"destination": {"service": {"name": "sink", "port": 8080}}});
        object("WebhookEndpoint", "orders", spec, extra)
    }

    const INGRESS: (&str, Option<Pairs>) =
        ("orders-ingress", Some(&[(INGRESS_SECRET_KEY, b"key")]));
    const SIGNING: (&str, Option<Pairs>) = ("orders-signing", Some(&[(SIGNING_KEY, b"gen")]));

    #[test]
    fn destination_tls_from_its_secrets() {
        let tls = serde_json::json!({"destination": {
            "url": "https://sink.example/hook",
            "tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}, "clientCertSecretRef": {"name": "cert"}},
        }});
        let ep = endpoint(tls);
        let cert: Pairs = &[(TLS_CERT_KEY, b"CERT"), (TLS_KEY_KEY, b"KEY")];
        let all = given(
            &[INGRESS, SIGNING],
            &[("ca", Some(&[("ca.crt", b"CA")])), ("cert", Some(cert))],
        );
        let d = endpoint_delivery(&ep, &all).map_err(|_| ()).unwrap();
        assert_eq!(
            d.tls,
            Some(DestinationTls {
                ca_pem: Some(b"CA".to_vec()),
                client_cert_pem: Some((b"CERT".to_vec(), b"KEY".to_vec())),
            })
        );
        // A client certificate Secret without its key, and a missing CA Secret: each named.
        let partial = given(
            &[INGRESS, SIGNING],
            &[("cert", Some(&[(TLS_CERT_KEY, b"CERT")]))],
        );
        let problems = endpoint_delivery(&ep, &partial).err().unwrap();
        assert_eq!(
            problems,
            vec![(
                reasons::SECRET_MISSING,
                "destination.tls.caSecretRef: Secret ca not found".to_string()
            )]
        );
        let no_key = given(
            &[INGRESS, SIGNING],
            &[
                ("ca", Some(&[("ca.crt", b"CA")])),
                ("cert", Some(&[(TLS_CERT_KEY, b"CERT")])),
            ],
        );
        let problems = endpoint_delivery(&ep, &no_key).err().unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .1
                .starts_with("destination.tls.clientCertSecretRef: ")
                && problems[0].1.contains(TLS_KEY_KEY),
            "{problems:?}"
        );
        // No tls: none.
        let plain = endpoint(serde_json::json!({}));
        let d = endpoint_delivery(&plain, &given(&[INGRESS, SIGNING], &[]))
            .map_err(|_| ())
            .unwrap();
        assert_eq!(d.tls, None);
    }

    #[test]
    fn endpoint_delivery_from_the_secrets_it_names() {
        let header = serde_json::json!({"headers": [{"name": "X-Token", "secretKeyRef": {"name": "auth", "key": "t"}}]});
        let by_ref = serde_json::json!({"signing": {"secretRef": {"name": "mine", "key": "k"}}});
        let until = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
        let rotating: Pairs = &[
            (SIGNING_KEY, b"new"),
            (rotation::ACTIVE, b"new"),
            (rotation::PREVIOUS, b"old"),
            (rotation::PREVIOUS_UNTIL, until.as_bytes()),
        ];
        type Want = Result<(Vec<&'static [u8]>, Vec<(&'static str, &'static str)>), Vec<Problem>>;
        let cases: Vec<(&str, serde_json::Value, Fetched, Want)> = vec![
            (
                "generated signing secret, no headers",
                serde_json::json!({}),
                given(&[INGRESS, SIGNING], &[]),
                Ok((vec![b"gen"], vec![])),
            ),
            (
                "the secret the spec names wins over the generated one",
                by_ref.clone(),
                given(&[INGRESS, SIGNING], &[("mine", Some(&[("k", b"user")]))]),
                Ok((vec![b"user"], vec![])),
            ),
            (
                "inside a rotation window both secrets sign, newest first",
                serde_json::json!({}),
                given(&[INGRESS, ("orders-signing", Some(rotating))], &[]),
                Ok((vec![b"new", b"old"], vec![])),
            ),
            (
                "header values are read and trimmed",
                header.clone(),
                given(&[INGRESS, SIGNING], &[("auth", Some(&[("t", b" tok\n")]))]),
                Ok((vec![b"gen"], vec![("X-Token", "tok")])),
            ),
            (
                "a missing header Secret is named, with the header",
                header.clone(),
                given(&[INGRESS, SIGNING], &[]),
                Err(vec![(
                    reasons::SECRET_MISSING,
                    "header X-Token: Secret auth not found".into(),
                )]),
            ),
            (
                "an unlabelled referenced Secret is refused",
                by_ref.clone(),
                given(&[INGRESS, SIGNING], &[("mine", None)]),
                Err(vec![(
                    reasons::SECRET_NOT_REFERABLE,
                    format!(
                        "signing secret: {}",
                        SecretError::NotReferable("mine".into())
                    ),
                )]),
            ),
            (
                "look-alike generated Secrets are never used",
                serde_json::json!({}),
                given(&[("orders-ingress", None), ("orders-signing", None)], &[]),
                Err(["orders-ingress", "orders-signing"]
                    .map(|n| {
                        (
                            reasons::SECRET_NOT_OWNED,
                            OwnedSecretError::NotOwned(n.into()).to_string(),
                        )
                    })
                    .into()),
            ),
            (
                "nothing generated yet: no route",
                serde_json::json!({}),
                given(&[], &[]),
                Err(vec![
                    (
                        reasons::SECRET_MISSING,
                        "Secret orders-ingress has no key token-key".into(),
                    ),
                    (
                        reasons::SECRET_MISSING,
                        "Secret orders-signing has no key secret".into(),
                    ),
                ]),
            ),
        ];
        for (case, spec, fetched, want) in cases {
            let got = endpoint_delivery(&endpoint(spec), &fetched).map(|d| {
                assert_eq!(
                    d.key,
                    super::super::routes::EndpointKey::new("a", "orders"),
                    "{case}"
                );
                assert_eq!(d.token, ingress_token(b"key"), "{case}");
                (d.signing_secrets, d.headers)
            });
            let want = want.map(|(secrets, headers)| {
                (
                    secrets.into_iter().map(<[u8]>::to_vec).collect::<Vec<_>>(),
                    headers
                        .into_iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect::<Vec<_>>(),
                )
            });
            assert_eq!(got, want, "{case}");
        }
    }

    /// `spec.filter` is compiled by the build, once: the settings carry the program, or
    /// why it does not compile (for the condition and for the data plane's refusal).
    #[test]
    fn the_build_carries_the_compiled_filter() {
        let secrets = given(&[INGRESS, SIGNING], &[]);
        let filter_of = |extra| endpoint_delivery(&endpoint(extra), &secrets).map(|d| d.filter);
        let none = filter_of(serde_json::json!({}));
        assert!(
            matches!(none, Ok(Ok(None))),
            "no filter: nothing to compile"
        );
        let valid = filter_of(serde_json::json!({"filter": "event.type == 'a'"}));
        assert!(
            matches!(valid, Ok(Ok(Some(_)))),
            "a valid filter is compiled"
        );
        let invalid = filter_of(serde_json::json!({"filter": "event.type =="}));
        match invalid {
            Ok(Err(message)) => assert!(!message.is_empty()),
            _ => panic!("an invalid filter is carried as its error, the settings still built"),
        }
    }

    fn subscription(provider: &str, extra: serde_json::Value) -> WebhookSubscription {
        let spec = serde_json::json!({"provider": provider, "events": [], "endpointRef": {"name": "orders"}});
        object("WebhookSubscription", "calls", spec, extra)
    }

    #[test]
    fn verification_keys_per_provider() {
        const STORED: (&str, Option<Pairs>) = (
            "calls-provider-signing",
            Some(&[(SIGNING_SECRET_KEY, b"whsec"), (rotation::ACTIVE, b"whsec")]),
        );
        const HEADER: (&str, Option<Pairs>) =
            ("calls-atllas-header", Some(&[(HEADER_VALUE_KEY, b"v")]));
        let atomic_header = serde_json::json!({"atomic": {"organizationId": "o", "environmentId": "e", "signature": {"header": "X-Sig", "encoding": "base64"}}});
        type Want<'a> = Option<(Vec<&'a [u8]>, Option<&'a str>)>;
        let atllas = || subscription("atllas", serde_json::json!({}));
        let smallest = || subscription("smallest", serde_json::json!({}));
        let cases: Vec<(&str, WebhookSubscription, Fetched, Want)> = vec![
            (
                "atllas: the generated header value under the default header",
                atllas(),
                given(&[HEADER], &[]),
                Some((vec![b"v"], Some(DEFAULT_ATLLAS_HEADER))),
            ),
            (
                "atllas: no value generated yet, no keys",
                atllas(),
                given(&[], &[]),
                None,
            ),
            (
                "atllas: a look-alike Secret is not used",
                atllas(),
                given(&[("calls-atllas-header", None)], &[]),
                None,
            ),
            (
                "smallest: the stored provider secret",
                smallest(),
                given(&[STORED], &[]),
                Some((vec![b"whsec"], None)),
            ),
            (
                "atomic: the spec's signature header",
                subscription("atomic", atomic_header),
                given(&[STORED], &[]),
                Some((vec![b"whsec"], Some("X-Sig"))),
            ),
            (
                "no secret issued yet: no keys, still a route",
                smallest(),
                given(&[], &[]),
                Some((vec![], None)),
            ),
        ];
        for (case, sub, fetched, want) in cases {
            let got = verification_keys(&sub, &fetched).map(|k| (k.secrets, k.header_name));
            let want = want.map(|(s, h)| {
                (
                    s.into_iter().map(<[u8]>::to_vec).collect::<Vec<_>>(),
                    h.map(String::from),
                )
            });
            assert_eq!(got, want, "{case}");
        }
    }
}
