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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::{Client, Resource, ResourceExt};

use super::status::FIELD_MANAGER;
use super::watches;
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
    store: &SecretStore,
    owner: &K,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, OwnedSecretError>
where
    K: Resource<DynamicType = ()>,
{
    let namespace = owner.namespace().unwrap_or_default();
    if store.known_absent(&namespace, name) {
        return Ok(BTreeMap::new());
    }
    match store.get(&namespace, name).await? {
        None => Ok(BTreeMap::new()),
        Some(s) if is_owned_by(&s.metadata, owner.meta().uid.as_deref()) => Ok(s
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect()),
        Some(_) => Err(OwnedSecretError::NotOwned(name.to_string())),
    }
}

/// A Secret named in a spec; when the store requires the label, only one carrying
/// [`REFERABLE_LABEL`].
pub async fn read_referenced(
    store: &SecretStore,
    namespace: &str,
    name: &str,
) -> Result<SecretData, SecretError> {
    read_checked(store, namespace, name, store.require_label).await
}

/// A Secret the operator itself reads by name (its own generated Secrets).
pub async fn read(
    store: &SecretStore,
    namespace: &str,
    name: &str,
) -> Result<SecretData, SecretError> {
    read_checked(store, namespace, name, false).await
}

/// The Secret `namespace/name`; under `require_label` only one carrying [`REFERABLE_LABEL`].
async fn read_checked(
    store: &SecretStore,
    namespace: &str,
    name: &str,
    require_label: bool,
) -> Result<SecretData, SecretError> {
    match store.get(namespace, name).await {
        Ok(Some(secret)) if !is_referable(&secret.metadata, require_label) => {
            Err(SecretError::NotReferable(name.to_string()))
        }
        Ok(Some(secret)) => Ok(SecretData::of(&secret)),
        Ok(None) => Err(SecretError::NotFound(name.to_string())),
        Err(e) => Err(SecretError::Api(name.to_string(), e.to_string())),
    }
}

/// Returns the value under `key` of the Secret `name` owned by `owner`, creating the
/// Secret with `generate()` when it or the key is missing. Existing keys are kept.
pub async fn ensure_generated<K>(
    store: &SecretStore,
    owner: &K,
    name: &str,
    key: &str,
    generate: impl FnOnce() -> Vec<u8>,
) -> Result<Vec<u8>, OwnedSecretError>
where
    K: Resource<DynamicType = ()>,
{
    let mut data = read_owned(store, owner, name).await?;
    if let Some(value) = data.get(key) {
        return Ok(value.clone());
    }
    let value = generate();
    data.insert(key.to_string(), value.clone());
    write_owned(store, owner, name, &data).await?;
    Ok(value)
}

/// Creates or replaces the owned Secret `name` with exactly `data`. Callers have read it
/// with [`read_owned`] first, which refuses a Secret someone else owns. A Secret the store
/// knows to be absent is created, not applied: one someone else made since (which the
/// watch has not shown yet) is refused with a conflict and read on the next pass, never
/// taken over.
pub async fn write_owned<K>(
    store: &SecretStore,
    owner: &K,
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()>,
{
    let namespace = owner.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(store.client.clone(), &namespace);
    let metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.clone()),
        owner_references: owner_reference(owner).map(|o| vec![o]),
        labels: Some(BTreeMap::from([(
            MANAGED_BY.0.to_string(),
            MANAGED_BY.1.to_string(),
        )])),
        ..Default::default()
    };
    let secret = Secret {
        metadata,
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let written = if store.known_absent(&namespace, name) {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.create(&params, &secret).await?
    } else {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(name, &params, &Patch::Apply(&secret)).await?
    };
    store.remember(written);
    Ok(())
}

/// How the leader's passes read Secrets: a GET, unless this store read (or wrote) the
/// Secret at the very resourceVersion the shared Secret watch holds now. The watch carries
/// metadata only (values stay out of the operator's caches until a pass needs them), so
/// the resourceVersion is what tells a kept copy is still the Secret's current content.
/// A pass is triggered by a Secret change only after the watch has recorded it, so a
/// pass never reads a value older than the change that started it.
///
/// Without it, every pass of every subscription GETs its credentials Secret, which
/// thousands of subscriptions share.
pub struct SecretStore {
    client: Client,
    watched: Mutex<Option<watches::Cache<PartialObjectMeta<Secret>>>>,
    /// (namespace, name) → the Secret as last read or written; values only, no annotations.
    kept: Mutex<HashMap<(String, String), Arc<Secret>>>,
    /// `--require-secret-label`: a Secret named in a spec is read only with [`REFERABLE_LABEL`].
    require_label: bool,
}

impl SecretStore {
    /// A store that GETs every read until [`SecretStore::watch`] gives it the watch;
    /// under `require_label` a Secret named in a spec is read only with [`REFERABLE_LABEL`].
    pub fn new(client: Client, require_label: bool) -> Self {
        SecretStore {
            client,
            watched: Mutex::default(),
            kept: Mutex::default(),
            require_label,
        }
    }

    /// Whether a Secret named in a spec needs [`REFERABLE_LABEL`].
    pub fn require_label(&self) -> bool {
        self.require_label
    }

    /// Validates kept copies against `watch` from now on (the leader's shared watch).
    pub fn watch(&self, watch: watches::Cache<PartialObjectMeta<Secret>>) {
        *self.watched.lock().expect("secret store lock") = Some(watch);
        self.kept.lock().expect("secret store lock").clear();
    }

    /// The Secret `namespace/name`, or `None` when it does not exist.
    pub async fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<Secret>>, kube::Error> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(kept) = self.current(&key) {
            return Ok(Some(kept));
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await? {
            Some(secret) => Ok(Some(self.remember(secret))),
            None => {
                self.kept.lock().expect("secret store lock").remove(&key);
                Ok(None)
            }
        }
    }

    /// Whether the Secret does not exist as far as the operator knows: the watch (its
    /// first list in) holds none, and this store has neither read nor written one since.
    /// Only for the operator's own Secrets, whose creation it does itself; a Secret a user
    /// names is read even then (the user may have created it a moment ago).
    fn known_absent(&self, namespace: &str, name: &str) -> bool {
        let Some(watched) = self.watched.lock().expect("secret store lock").clone() else {
            return false;
        };
        let key = (namespace.to_string(), name.to_string());
        matches!(watched.get(namespace, name), Some(None))
            && !self
                .kept
                .lock()
                .expect("secret store lock")
                .contains_key(&key)
    }

    /// The kept copy of `key` if the watch holds the same resourceVersion.
    fn current(&self, key: &(String, String)) -> Option<Arc<Secret>> {
        let watched = self.watched.lock().expect("secret store lock").clone()?;
        let version = watched.get(&key.0, &key.1)??.resource_version()?;
        let kept = self
            .kept
            .lock()
            .expect("secret store lock")
            .get(key)?
            .clone();
        (kept.resource_version().as_deref() == Some(version.as_str())).then_some(kept)
    }

    fn remember(&self, mut secret: Secret) -> Arc<Secret> {
        // Neither is read; `last-applied-configuration` may hold the values a second time.
        secret.metadata.annotations = None;
        secret.metadata.managed_fields = None;
        let secret = Arc::new(secret);
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        self.kept
            .lock()
            .expect("secret store lock")
            .insert(key, secret.clone());
        secret
    }

    /// How many Secrets are kept (for tests).
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.kept.lock().expect("secret store lock").len()
    }
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

    /// A loopback stand-in for the API server's Secret GET and create: counts the GETs
    /// and answers the Secret at the resourceVersion `version` holds (404 when it is
    /// empty); counts the creates and answers each with the Secret sent, at version "9".
    async fn api_server(
        version: Arc<Mutex<String>>,
    ) -> (
        Client,
        Arc<std::sync::atomic::AtomicU64>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        use axum::extract::Path;
        use std::sync::atomic::{AtomicU64, Ordering};
        let gets = Arc::new(AtomicU64::new(0));
        let creates = Arc::new(AtomicU64::new(0));
        let counted = gets.clone();
        let created = creates.clone();
        let app = axum::Router::new()
            .route(
                "/api/v1/namespaces/{ns}/secrets",
                axum::routing::post(move |axum::Json(mut secret): axum::Json<serde_json::Value>| {
                    created.fetch_add(1, Ordering::SeqCst);
                    secret["metadata"]["resourceVersion"] = "9".into();
                    async move { (axum::http::StatusCode::CREATED, axum::Json(secret)) }
                }),
            )
            .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            axum::routing::get(move |Path((ns, name)): Path<(String, String)>| {
                let (gets, version) = (counted.clone(), version.clone());
                async move {
                    gets.fetch_add(1, Ordering::SeqCst);
                    let rv = version.lock().unwrap().clone();
                    if rv.is_empty() {
                        let status = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                            "status": "Failure", "reason": "NotFound", "code": 404});
                        return (axum::http::StatusCode::NOT_FOUND, axum::Json(status));
                    }
                    use base64::Engine;
                    let value = base64::engine::general_purpose::STANDARD.encode(format!("value-{rv}"));
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv,
                                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
                            "data": {"k": value}})),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(url.parse().unwrap());
        (Client::try_from(config).unwrap(), gets, creates)
    }

    fn watched(rv: &str) -> PartialObjectMeta<Secret> {
        let mut meta = PartialObjectMeta::<Secret>::default();
        meta.metadata.name = Some("creds".into());
        meta.metadata.namespace = Some("ns".into());
        meta.metadata.resource_version = Some(rv.into());
        meta
    }

    #[tokio::test]
    async fn a_kept_secret_is_read_again_only_when_the_watch_moves_past_it() {
        use kube::runtime::{reflector, watcher};
        use std::sync::atomic::Ordering;
        let version = Arc::new(Mutex::new("1".to_string()));
        let (client, gets, _) = api_server(version.clone()).await;
        let store = SecretStore::new(client, false);
        let value = |s: &SecretData| s.get_string("k").unwrap();

        // No watch yet (a follower's start, a test context): every read is a GET.
        read(&store, "ns", "creds").await.unwrap();
        read(&store, "ns", "creds").await.unwrap();
        assert_eq!(gets.load(Ordering::SeqCst), 2);

        let (cache, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Apply(watched("1")));
        store.watch(watches::Cache::listed(cache));
        // The first read keeps the copy; while the watch holds its version, no more GETs.
        let first = read(&store, "ns", "creds").await.unwrap();
        for _ in 0..5 {
            assert_eq!(
                value(&read(&store, "ns", "creds").await.unwrap()),
                "value-1"
            );
        }
        assert_eq!(value(&first), "value-1");
        assert_eq!(gets.load(Ordering::SeqCst), 3);
        // Nothing read but the data: no annotation (it may repeat the values) is kept.
        let kept = store.get("ns", "creds").await.unwrap().unwrap();
        assert!(kept.metadata.annotations.is_none());

        // The Secret changes: the watch sees version 2 before any pass it triggers, and
        // the next read fetches the new value once.
        *version.lock().unwrap() = "2".into();
        writer.apply_watcher_event(&watcher::Event::Apply(watched("2")));
        assert_eq!(
            value(&read(&store, "ns", "creds").await.unwrap()),
            "value-2"
        );
        assert_eq!(
            value(&read(&store, "ns", "creds").await.unwrap()),
            "value-2"
        );
        assert_eq!(gets.load(Ordering::SeqCst), 4);

        // Deleted: the watch drops it, a read finds nothing and keeps nothing.
        version.lock().unwrap().clear();
        writer.apply_watcher_event(&watcher::Event::Delete(watched("2")));
        assert!(matches!(
            read(&store, "ns", "creds").await,
            Err(SecretError::NotFound(_))
        ));
        assert_eq!(store.kept(), 0);
        assert_eq!(gets.load(Ordering::SeqCst), 5);
    }

    use k8s_openapi::api::core::v1::ConfigMap;

    #[tokio::test]
    async fn an_owned_secret_the_watch_does_not_hold_is_created_without_a_read() {
        use kube::runtime::{reflector, watcher};
        use std::sync::atomic::Ordering;
        let (client, gets, creates) = api_server(Arc::new(Mutex::new(String::new()))).await;
        let store = SecretStore::new(client, false);
        let mut owner = ConfigMap::default();
        owner.metadata.name = Some("orders".into());
        owner.metadata.namespace = Some("ns".into());
        owner.metadata.uid = Some("uid-1".into());

        // Without the watch the store cannot know whether the Secret exists: it reads.
        assert!(read_owned(&store, &owner, "gen").await.unwrap().is_empty());
        assert_eq!(gets.load(Ordering::SeqCst), 1);

        // The watch's first list is in and holds no such Secret: no read, and the write
        // is a create (a Secret made meanwhile by someone else would be refused).
        let (cache, mut writer) = reflector::store::<PartialObjectMeta<Secret>>();
        writer.apply_watcher_event(&watcher::Event::Apply(watched("1")));
        store.watch(watches::Cache::listed(cache));
        let value = ensure_generated(&store, &owner, "gen", "k", || b"v".to_vec())
            .await
            .unwrap();
        assert_eq!(value, b"v");
        assert_eq!(
            gets.load(Ordering::SeqCst),
            1,
            "no read of a known-absent Secret"
        );
        assert_eq!(creates.load(Ordering::SeqCst), 1);

        // Written through the store: no longer known absent (the watch has not shown it
        // yet), so the next pass reads it rather than creating it again.
        assert!(!store.known_absent("ns", "gen"));
        let _ = read_owned(&store, &owner, "gen").await;
        assert_eq!(gets.load(Ordering::SeqCst), 2);
        assert_eq!(creates.load(Ordering::SeqCst), 1);
    }
}
