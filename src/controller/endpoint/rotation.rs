//! Step 2: the generated signing secret (created, or regenerated on request) and its
//! rotation: the replaced secret is kept in force for the overlap window.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::events::EventType;

use super::secrets::SecretsRead;
use crate::api::ROTATE_ANNOTATION;
use crate::api::endpoint::{SIGNING_KEY, WebhookEndpoint};
use crate::controller::build::{self, Fetched};
use crate::controller::{Context, Error, publish, rotation, secrets};

/// The rotation overlap window of an endpoint (24 h when unset).
pub fn rotation_overlap(signing: Option<&crate::api::endpoint::Signing>) -> Duration {
    let fallback = Duration::from_secs(24 * 3600);
    signing.map_or(fallback, |s| {
        crate::duration::parse_go_duration(&s.rotation_overlap).unwrap_or(fallback)
    })
}

/// The rotation request that produced the generated secret.
const ROTATION_REQUEST_KEY: &str = "rotation-request";

/// What rotation hands to validation.
pub struct Rotated {
    /// Every Secret the build reads, the signing Secret as written.
    pub fetched: Fetched,
    /// The `rotate` annotation's value, if any.
    pub rotate_request: Option<String>,
    /// When the replaced secret stops being in force.
    pub overlap_ends: Option<jiff::Timestamp>,
}

pub async fn apply(
    ep: &WebhookEndpoint,
    ctx: &Context,
    read: SecretsRead,
) -> Result<Rotated, Error> {
    let SecretsRead {
        mut fetched,
        mut owned,
    } = read;
    let rotate_request = ep.annotations().get(ROTATE_ANNOTATION).cloned();
    let mut overlap_ends = None;
    if let Some(owned) = owned.as_mut() {
        regenerate(ep, owned, rotate_request.as_ref());
        if let Ok(secret) = build::signing_secret(ep, &fetched, owned) {
            overlap_ends = rotate(ctx, ep, owned, &secret).await?;
        }
    }
    fetched.set_owned(&ep.signing_secret_name(), owned.ok_or(()));
    Ok(Rotated {
        fetched,
        rotate_request,
        overlap_ends,
    })
}

/// Generates the signing secret when the spec names none and there is none yet, or a
/// new rotation request came.
fn regenerate(
    ep: &WebhookEndpoint,
    owned: &mut BTreeMap<String, Vec<u8>>,
    rotate_request: Option<&String>,
) {
    // The handled request is kept next to the secret it produced (read from the API,
    // not the cache), so a pass that sees a stale object cannot rotate twice.
    let handled_rotation = owned
        .get(ROTATION_REQUEST_KEY)
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let rotate_now = rotate_request.is_some() && rotate_request != handled_rotation.as_ref();
    if ep
        .spec
        .signing
        .as_ref()
        .and_then(|s| s.secret_ref.as_ref())
        .is_some()
    {
        return;
    }
    if rotate_now || !owned.contains_key(SIGNING_KEY) {
        owned.insert(SIGNING_KEY.into(), generate_signing_secret());
    }
    if let Some(request) = rotate_request.filter(|_| rotate_now) {
        owned.insert(ROTATION_REQUEST_KEY.into(), request.clone().into_bytes());
    }
}

fn generate_signing_secret() -> Vec<u8> {
    use base64::Engine;
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(secrets::random_secret())
    )
    .into_bytes()
}

/// Records `secret` as the one in force in the generated signing Secret (whose data is
/// `owned`), keeping the one it replaced for the overlap window; writes the Secret when
/// that changes it. Returns when the overlap ends.
async fn rotate(
    ctx: &Context,
    ep: &WebhookEndpoint,
    owned: &mut BTreeMap<String, Vec<u8>>,
    secret: &[u8],
) -> Result<Option<jiff::Timestamp>, Error> {
    let decision = rotation::decide(
        owned,
        secret,
        jiff::Timestamp::now(),
        rotation_overlap(ep.spec.signing.as_ref()),
    );
    let mut next = decision.stored.clone();
    for key in [SIGNING_KEY, ROTATION_REQUEST_KEY] {
        if let Some(v) = owned.get(key) {
            next.insert(key.into(), v.clone());
        }
    }
    if next != *owned {
        secrets::write_owned(&ctx.secrets, ep, &ep.signing_secret_name(), &next).await?;
        *owned = next;
    }
    if decision.rotated {
        let until = decision
            .overlap_ends
            .map_or("now".to_string(), |t| t.to_string());
        publish(
            ctx,
            ep,
            EventType::Normal,
            "SigningSecretRotated",
            "Rotate",
            format!("signing with the new secret; the old one is also used until {until}"),
        )
        .await;
    }
    Ok(decision.overlap_ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(signing: serde_json::Value) -> WebhookEndpoint {
        let spec = serde_json::json!({
            "destination": {"service": {"name": "sink", "port": 8080}},
            "signing": signing,
        });
        crate::controller::test_support::object("WebhookEndpoint", "a", "orders", spec)
    }

    #[test]
    fn a_generated_secret_is_created_once_and_regenerated_once_per_request() {
        let ep = endpoint(serde_json::json!({}));
        let mut owned = BTreeMap::new();
        regenerate(&ep, &mut owned, None);
        let first = owned.get(SIGNING_KEY).cloned().expect("generated");
        assert!(first.starts_with(b"whsec_"));
        regenerate(&ep, &mut owned, None);
        assert_eq!(owned.get(SIGNING_KEY), Some(&first));
        let request = "r1".to_string();
        regenerate(&ep, &mut owned, Some(&request));
        let second = owned.get(SIGNING_KEY).cloned().unwrap();
        assert_ne!(second, first);
        // The same request value seen again (a stale object): no second rotation.
        regenerate(&ep, &mut owned, Some(&request));
        assert_eq!(owned.get(SIGNING_KEY), Some(&second));
    }

    #[test]
    fn a_secret_the_spec_names_is_never_generated() {
        let ep = endpoint(serde_json::json!({"secretRef": {"name": "mine", "key": "k"}}));
        let mut owned = BTreeMap::new();
        regenerate(&ep, &mut owned, Some(&"r1".to_string()));
        assert!(owned.is_empty());
    }
}
