//! Reading Secret keys and keeping operator-generated Secrets. Values never leave this
//! module in an error message.
//!
//! Trust boundary: a Secret named in a spec (`headers[].secretKeyRef`, `signing.secretRef`,
//! `credentialsRef`) is read with the operator's rights, so whoever may create the
//! referring object in a namespace may have any Secret of that namespace read (and header
//! values sent to a destination of their choice). With `--require-secret-label` only
//! Secrets labelled [`REFERABLE_LABEL`]`=true` are read. The operator never writes a
//! Secret it does not own: a generated Secret's name that is already taken is reported,
//! not overwritten.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};

use super::status::FIELD_MANAGER;
use crate::api::conditions::reasons;

/// Why a Secret value could not be read. Names the Secret and key, never a value.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {0} not found")]
    NotFound(String),
    #[error("Secret {0} has no key {1}")]
    MissingKey(String, String),
    #[error("reading Secret {0}: {1}")]
    Api(String, String),
    #[error(
        "Secret {0} does not carry the label {REFERABLE_LABEL}=true, which this operator requires of referenced Secrets"
    )]
    NotReferable(String),
}

impl SecretError {
    /// The condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretError::NotReferable(_) => reasons::SECRET_NOT_REFERABLE,
            _ => reasons::SECRET_MISSING,
        }
    }
}

/// The opt-in label a Secret needs under `--require-secret-label`.
pub const REFERABLE_LABEL: &str = "hooks.webhook-operator.dev/referable";
/// The label on every Secret the operator generates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "webhook-operator");

/// Why an operator-generated Secret cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum OwnedSecretError {
    /// A Secret of that name exists and is not this object's: it is never overwritten.
    #[error(
        "Secret {0} already exists and is not owned by this object; the operator does not overwrite it (rename or delete it)"
    )]
    NotOwned(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Whether `secret` is controlled by the object with `owner_uid`.
pub fn is_owned_by(secret: &ObjectMeta, owner_uid: Option<&str>) -> bool {
    owner_uid.is_some_and(|uid| {
        secret
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true))
    })
}

/// Whether `secret` may be read for a spec reference under `require_label`.
pub fn is_referable(secret: &ObjectMeta, require_label: bool) -> bool {
    !require_label
        || secret
            .labels
            .as_ref()
            .and_then(|l| l.get(REFERABLE_LABEL))
            .is_some_and(|v| v == "true")
}

/// A Secret's data, read once per reconcile.
#[derive(Clone)]
pub struct SecretData {
    pub name: String,
    pub resource_version: Option<String>,
    data: BTreeMap<String, ByteString>,
}

impl SecretData {
    /// The data of `secret` as read (from the API or a cache).
    pub fn of(secret: &Secret) -> SecretData {
        SecretData {
            name: secret.name_any(),
            resource_version: secret.resource_version(),
            data: secret.data.clone().unwrap_or_default(),
        }
    }

    pub fn get(&self, key: &str) -> Result<&[u8], SecretError> {
        self.data
            .get(key)
            .map(|v| v.0.as_slice())
            .ok_or_else(|| SecretError::MissingKey(self.name.clone(), key.to_string()))
    }

    pub fn get_string(&self, key: &str) -> Result<String, SecretError> {
        Ok(String::from_utf8_lossy(self.get(key)?).trim().to_string())
    }

    pub fn optional_string(&self, key: &str) -> Option<String> {
        self.get_string(key).ok().filter(|s| !s.is_empty())
    }

    /// Every key and value.
    pub fn all(&self) -> BTreeMap<String, Vec<u8>> {
        self.data
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect()
    }
}

/// The data of the Secret `name` generated for `owner`, empty when it does not exist yet;
/// `NotOwned` when a Secret of that name exists and belongs to someone else.
pub async fn read_owned<K>(
    client: &Client,
    owner: &K,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, OwnedSecretError>
where
    K: Resource<DynamicType = ()>,
{
    let namespace = owner.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    match api.get_opt(name).await? {
        None => Ok(BTreeMap::new()),
        Some(s) if is_owned_by(&s.metadata, owner.meta().uid.as_deref()) => Ok(s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()),
        Some(_) => Err(OwnedSecretError::NotOwned(name.to_string())),
    }
}

/// A Secret named in a spec; under `require_label` only one carrying [`REFERABLE_LABEL`].
pub async fn read_referenced(
    client: &Client,
    namespace: &str,
    name: &str,
    require_label: bool,
) -> Result<SecretData, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(secret)) if !is_referable(&secret.metadata, require_label) => {
            Err(SecretError::NotReferable(name.to_string()))
        }
        Ok(Some(secret)) => Ok(SecretData::of(&secret)),
        Ok(None) => Err(SecretError::NotFound(name.to_string())),
        Err(e) => Err(SecretError::Api(name.to_string(), e.to_string())),
    }
}

/// A Secret the operator itself reads by name (its own generated Secrets).
pub async fn read(client: &Client, namespace: &str, name: &str) -> Result<SecretData, SecretError> {
    read_referenced(client, namespace, name, false).await
}

/// Returns the value under `key` of the Secret `name` owned by `owner`, creating the
/// Secret with `generate()` when it or the key is missing. Existing keys are kept.
pub async fn ensure_generated<K>(
    client: &Client,
    owner: &K,
    name: &str,
    key: &str,
    generate: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, OwnedSecretError>
where
    K: Resource<DynamicType = ()>,
{
    let mut data = read_owned(client, owner, name).await?;
    if let Some(value) = data.get(key) {
        return Ok(value.clone());
    }
    let value = generate();
    data.insert(key.to_string(), value.clone());
    write_owned(client, owner, name, &data).await?;
    Ok(value)
}

/// Creates or replaces the owned Secret `name` with exactly `data`. Callers have read it
/// with [`read_owned`] first, which refuses a Secret someone else owns.
pub async fn write_owned<K>(
    client: &Client,
    owner: &K,
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()>,
{
    let namespace = owner.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace),
        owner_references: owner_reference(owner).map(|o| vec![o]),
        labels: Some(BTreeMap::from([(
            MANAGED_BY.0.to_string(),
            MANAGED_BY.1.to_string(),
        )])),
        ..Default::default()
    };
    let data: BTreeMap<String, ByteString> = data
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.clone())))
        .collect();
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "data": data,
            "type": "Opaque",
        })),
    )
    .await?;
    Ok(())
}

fn owner_reference<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

/// 32 random bytes.
pub fn random_secret() -> Vec<u8> {
    use rand::RngCore;
    let mut bytes = vec![0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(owner_uid: Option<(&str, bool)>, label: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            owner_references: owner_uid.map(|(uid, controller)| {
                vec![OwnerReference {
                    uid: uid.into(),
                    controller: Some(controller),
                    ..Default::default()
                }]
            }),
            labels: label.map(|v| BTreeMap::from([(REFERABLE_LABEL.to_string(), v.to_string())])),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_is_owned_only_through_a_controller_reference_to_that_uid() {
        assert!(is_owned_by(&meta(Some(("u1", true)), None), Some("u1")));
        assert!(!is_owned_by(&meta(Some(("u1", true)), None), Some("u2")));
        assert!(!is_owned_by(&meta(Some(("u1", false)), None), Some("u1")));
        assert!(!is_owned_by(&meta(None, None), Some("u1")));
        assert!(!is_owned_by(&meta(Some(("u1", true)), None), None));
    }

    #[test]
    fn the_opt_in_label_matters_only_in_strict_mode() {
        assert!(is_referable(&meta(None, None), false));
        assert!(!is_referable(&meta(None, None), true));
        assert!(!is_referable(&meta(None, Some("false")), true));
        assert!(is_referable(&meta(None, Some("true")), true));
    }
}
