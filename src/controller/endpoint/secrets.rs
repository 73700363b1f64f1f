//! Step 1: read (and create when missing) the Secrets the pass needs: the generated
//! ingress key, the generated `<endpoint>-signing` Secret and the Secrets the spec names.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::api::endpoint::{INGRESS_SECRET_KEY, WebhookEndpoint};
use crate::controller::build::Fetched;
use crate::controller::secrets::{self, OwnedSecretError};
use crate::controller::{Context, Error};

/// What the secrets step hands to rotation.
pub struct SecretsRead {
    /// The ingress key and the referenced Secrets, for the build.
    pub fetched: Fetched,
    /// The data of the generated signing Secret; `None` when someone else owns the name.
    pub owned: Option<BTreeMap<String, Vec<u8>>>,
}

pub async fn read(ep: &WebhookEndpoint, ctx: &Context) -> Result<SecretsRead, Error> {
    let mut fetched = Fetched::default();
    let ingress = ep.ingress_secret_name();
    match secrets::ensure_generated(
        &ctx.secrets,
        ep,
        &ingress,
        INGRESS_SECRET_KEY,
        secrets::random_secret,
    )
    .await
    {
        Ok(key) => fetched.set_owned(&ingress, Ok([(INGRESS_SECRET_KEY.to_string(), key)].into())),
        Err(OwnedSecretError::NotOwned(_)) => fetched.set_owned(&ingress, Err(())),
        Err(OwnedSecretError::Kube(e)) => return Err(e.into()),
    };
    // The signing secret: the user's, or one the operator generates (and regenerates on
    // request). Its rotation state lives in the owned `<endpoint>-signing` Secret.
    let owned = match secrets::read_owned(&ctx.secrets, ep, &ep.signing_secret_name()).await {
        Ok(data) => Some(data),
        Err(OwnedSecretError::NotOwned(_)) => None,
        Err(OwnedSecretError::Kube(e)) => return Err(e.into()),
    };
    let ns = ep.namespace().unwrap_or_default();
    let referenced = ep
        .spec
        .signing
        .as_ref()
        .and_then(|s| s.secret_ref.as_ref())
        .filter(|_| owned.is_some())
        .map(|r| &r.name)
        .into_iter()
        .chain(ep.spec.headers.iter().map(|h| &h.secret_key_ref.name))
        .chain(ep.spec.tls_secret_names());
    for name in referenced {
        fetched.read_referenced(&ctx.secrets, &ns, name).await;
    }
    Ok(SecretsRead { fetched, owned })
}
