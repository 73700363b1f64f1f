//! The pass's inputs: the URL the provider must call, the credentials, the ingress
//! counters. Typed errors say why an input is not there yet.

use super::*;

/// A pass's inputs, as read.
pub(super) struct Resolved {
    pub(super) target: Result<String, TargetError>,
    pub(super) credentials: Result<(Credentials, Option<String>), CredentialsError>,
    /// What the schedule gate compares.
    pub(super) inputs: Inputs,
}

/// Reads the target URL and the credentials (Atllas needs none).
pub(super) async fn resolve(sub: &WebhookSubscription, ctx: &Context) -> Result<Resolved, Error> {
    let target = resolve_target(sub, ctx).await?;
    let credentials = if sub.spec.provider == Provider::Atllas {
        Ok((Credentials::default(), None))
    } else {
        read_credentials(ctx, &sub.namespace().unwrap_or_default(), &sub.spec).await
    };
    let inputs = Inputs {
        generation: sub.meta().generation,
        credentials_version: credentials.as_ref().ok().and_then(|(_, v)| v.clone()),
        hook_url: target.as_ref().ok().cloned(),
        requested_at: sub.annotations().get(REQUESTED_AT_ANNOTATION).cloned(),
        test_request: test_event::new_request(sub, ctx),
    };
    Ok(Resolved {
        target,
        credentials,
        inputs,
    })
}

/// Why the URL the provider must call is not known yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("neither endpointRef nor url is set")]
    NoTarget,
    #[error("WebhookEndpoint {0} does not exist")]
    EndpointMissing(String),
    #[error(
        "WebhookEndpoint {0} has only an ingress path: configure the operator's public base URL"
    )]
    IngressPathOnly(String),
    #[error("WebhookEndpoint {0} is not Ready yet")]
    EndpointNotReady(String),
}

impl TargetError {
    /// Stable and low-cardinality, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TargetError::NoTarget => "no_target",
            TargetError::EndpointMissing(_) => "endpoint_missing",
            TargetError::IngressPathOnly(_) => "ingress_path_only",
            TargetError::EndpointNotReady(_) => "endpoint_not_ready",
        }
    }
}

/// Why a subscription's provider credentials cannot be read. Names the Secret and key,
/// never a value.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentialsRef is not set")]
    NotSet,
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
}

impl CredentialsError {
    /// Stable and low-cardinality, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CredentialsError::NotSet => "credentials_not_set",
            CredentialsError::Secret(secrets::SecretError::NotFound(_)) => "secret_not_found",
            CredentialsError::Secret(secrets::SecretError::MissingKey(..)) => "secret_missing_key",
            CredentialsError::Secret(secrets::SecretError::Api(..)) => "secret_unreadable",
            CredentialsError::Secret(secrets::SecretError::NotReferable(_)) => {
                "secret_not_referable"
            }
        }
    }
}

/// The URL the provider must call: the endpoint's ingress URL plus the subscription name,
/// or the external `url`. The inner `Err` says why it is not known yet.
pub(crate) async fn resolve_target(
    sub: &WebhookSubscription,
    ctx: &Context,
) -> Result<Result<String, TargetError>, Error> {
    if let Some(url) = &sub.spec.url {
        return Ok(Ok(url.clone()));
    }
    let Some(ep_ref) = &sub.spec.endpoint_ref else {
        return Ok(Err(TargetError::NoTarget));
    };
    let ns = sub.namespace().unwrap_or_default();
    let Some(ep) = ctx.endpoint(&ns, &ep_ref.name).await? else {
        return Ok(Err(TargetError::EndpointMissing(ep_ref.name.clone())));
    };
    let ready = ep.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == types::READY && c.status == "True")
    });
    let url = ep.status.as_ref().and_then(|s| s.ingress_url.clone());
    match url {
        Some(url) if ready && (url.starts_with("https://") || url.starts_with("http://")) => Ok(
            Ok(format!("{}/{}", url.trim_end_matches('/'), sub.name_any())),
        ),
        Some(_) if ready && sub.spec.provider != Provider::Atllas => {
            Ok(Err(TargetError::IngressPathOnly(ep_ref.name.clone())))
        }
        Some(url) if ready => Ok(Ok(format!(
            "{}/{}",
            url.trim_end_matches('/'),
            sub.name_any()
        ))),
        _ => Ok(Err(TargetError::EndpointNotReady(ep_ref.name.clone()))),
    }
}

/// Credentials and the Secret's resourceVersion, or why they cannot be read.
pub(crate) async fn read_credentials(
    ctx: &Context,
    ns: &str,
    spec: &WebhookSubscriptionSpec,
) -> Result<(Credentials, Option<String>), CredentialsError> {
    let Some(r) = &spec.credentials_ref else {
        return Err(CredentialsError::NotSet);
    };
    let secret = secrets::read_referenced(&ctx.secrets, ns, &r.name).await?;
    let creds = match spec.provider {
        Provider::Atomic => Credentials {
            api_key: None,
            client_id: Some(secret.get_string(&r.client_id_key)?),
            client_secret: Some(secret.get_string(&r.client_secret_key)?),
        },
        _ => Credentials {
            api_key: Some(secret.get_string(&r.api_key_key)?),
            client_id: None,
            client_secret: None,
        },
    };
    Ok((creds, secret.resource_version.clone()))
}

/// `status.events` from the ingress counters.
pub(super) fn event_counters(ctx: &Context, sub: &WebhookSubscription) -> Option<EventCounters> {
    let time = |t: Option<std::time::SystemTime>| {
        t.and_then(|t| jiff::Timestamp::try_from(t).ok())
            .and_then(|t| t.round(jiff::Unit::Second).ok())
            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
    };
    let (mismatches, last_mismatch) = ctx.routes.signature_failures(sub).unwrap_or_default();
    ctx.routes
        .counters(sub)
        .map(|(received, last)| EventCounters {
            received,
            last_received_time: time(last),
            signature_mismatches: mismatches,
            last_signature_mismatch_time: time(last_mismatch),
        })
}
