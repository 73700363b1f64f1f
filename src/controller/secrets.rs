//! Reading Secret keys and keeping operator-generated Secrets. Values never leave this
//! module in an error message.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};

use super::status::FIELD_MANAGER;

/// Why a Secret value could not be read. Names the Secret and key, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {0} not found")]
    NotFound(String),
    #[error("Secret {0} has no key {1}")]
    MissingKey(String, String),
    #[error("reading Secret {0}: {1}")]
    Api(String, kube::Error),
}

/// A Secret's data, read once per reconcile.
pub struct SecretData {
    pub name: String,
    pub resource_version: Option<String>,
    data: BTreeMap<String, ByteString>,
}

impl SecretData {
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

/// The data of an operator-owned Secret, empty when it does not exist yet.
pub async fn read_owned(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, kube::Error> {
    match read(client, namespace, name).await {
        Ok(s) => Ok(s.all()),
        Err(SecretError::NotFound(_) | SecretError::MissingKey(..)) => Ok(BTreeMap::new()),
        Err(SecretError::Api(_, e)) => Err(e),
    }
}

pub async fn read(client: &Client, namespace: &str, name: &str) -> Result<SecretData, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(secret)) => Ok(SecretData {
            name: name.to_string(),
            resource_version: secret.resource_version(),
            data: secret.data.unwrap_or_default(),
        }),
        Ok(None) => Err(SecretError::NotFound(name.to_string())),
        Err(e) => Err(SecretError::Api(name.to_string(), e)),
    }
}

/// Returns the value under `key` of the Secret `name` owned by `owner`, creating the
/// Secret with `generate()` when it or the key is missing. Existing keys are kept.
pub async fn ensure_generated<K>(
    client: &Client,
    owner: &K,
    name: &str,
    key: &str,
    generate: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, kube::Error>
where
    K: Resource<DynamicType = ()>,
{
    let namespace = owner.namespace().unwrap_or_default();
    let mut data = read_owned(client, &namespace, name).await?;
    if let Some(value) = data.get(key) {
        return Ok(value.clone());
    }
    let value = generate();
    data.insert(key.to_string(), value.clone());
    write_owned(client, owner, name, &data).await?;
    Ok(value)
}

/// Creates or replaces the owned Secret `name` with exactly `data`.
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
            "app.kubernetes.io/managed-by".to_string(),
            "webhook-operator".to_string(),
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
