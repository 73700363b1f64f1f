//! Provider sync: the provider-side desired state of a spec ([`translate`]), and the call
//! that makes upstream match it (or, for Atllas, the manual set-up), registering the
//! subscription's verification keys with the ingress.

use super::*;

/// The provider-side desired state of a spec, given the URL the provider must call.
pub fn translate(
    namespace: &str,
    name: &str,
    spec: &WebhookSubscriptionSpec,
    hook_url: String,
) -> DesiredSubscription {
    let scope = match spec.provider {
        Provider::Atlas => Scope::Atlas {
            campaign_id: spec
                .atlas
                .as_ref()
                .map(|a| a.campaign_id.clone())
                .unwrap_or_default(),
        },
        Provider::Atomic => {
            let a = spec
                .atomic
                .clone()
                .unwrap_or_else(|| crate::api::subscription::AtomicScope {
                    organization_id: String::new(),
                    environment_id: String::new(),
                    card_template_id: None,
                    action_flow_config_id: None,
                    method: Default::default(),
                    signature: None,
                });
            Scope::Atomic {
                organization_id: a.organization_id,
                environment_id: a.environment_id,
                card_template_id: a.card_template_id,
                action_flow_config_id: a.action_flow_config_id,
                method: crate::controller::to_dataplane::atomic_method(a.method),
            }
        }
        Provider::Smallest => Scope::Smallest {
            agent_ids: spec
                .smallest
                .as_ref()
                .map(|s| s.agent_ids.iter().map(|a| a.0.clone()).collect())
                .unwrap_or_default(),
        },
        Provider::Atllas => Scope::Atllas {
            header_name: spec.atllas_header_name(),
        },
    };
    DesiredSubscription {
        provider: crate::controller::to_dataplane::provider(spec.provider),
        hook_url,
        events: spec.events.iter().map(|e| e.0.clone()).collect(),
        scope,
        owner: format!("{namespace}/{name}"),
    }
}

/// Talks to the provider (or, for Atllas, prepares the manual set-up) and registers the
/// subscription's verification keys with the ingress.
pub(super) async fn sync(
    sub: &WebhookSubscription,
    ctx: &Context,
    hook_url: String,
    creds: &Credentials,
    current: &WebhookSubscriptionStatus,
) -> Result<Outcome, Error> {
    let ns = sub.namespace().unwrap_or_default();
    let name = sub.name_any();
    let desired = translate(&ns, &name, &sub.spec, hook_url.clone());

    if sub.spec.provider == Provider::Atllas {
        let secret_name = sub.atllas_header_secret_name();
        let value =
            secrets::ensure_generated(&ctx.secrets, sub, &secret_name, HEADER_VALUE_KEY, || {
                hex::encode(secrets::random_secret()).into_bytes()
            })
            .await?;
        let mut fetched = build::Fetched::default();
        fetched.set_owned(
            &secret_name,
            Ok([(HEADER_VALUE_KEY.to_string(), value)].into()),
        );
        ctx.routes
            .subscription_keys(sub, build::verification_keys(sub, &fetched));
        return Ok(Outcome::Manual {
            hook_url,
            header_name: sub.spec.atllas_header_name(),
            secret_name,
        });
    }

    let provider = ctx
        .providers
        .get(crate::controller::to_dataplane::provider(sub.spec.provider));
    let result = match sub.spec.management_policy {
        ManagementPolicy::ObserveOnly => match provider.observe(creds, &desired).await {
            Ok(Some(observed)) => Ok((observed, None)),
            Ok(None) => return Ok(Outcome::MissingUpstream),
            Err(e) => Err(e),
        },
        ManagementPolicy::Manage => {
            let previous: Option<DesiredSubscription> = current
                .upstream
                .as_ref()
                .and_then(|u| u.applied.as_deref())
                .and_then(|s| serde_json::from_str(s).ok());
            // Once something was applied, look before writing: a subscription the provider
            // disabled is reported, not silently replaced (re-enabling is the user's call).
            let disabled = match previous.as_ref().filter(|p| **p == desired) {
                Some(_) => match provider.observe(creds, &desired).await {
                    Ok(Some(o)) if matches!(o.state, UpstreamState::Disabled { .. }) => Some(Ok(o)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                },
                None => None,
            };
            match disabled {
                Some(result) => result.map(|o| (o, previous.clone())),
                None => provider
                    .ensure(creds, &desired, previous.as_ref())
                    .await
                    .map(|o| (o, Some(desired.clone()))),
            }
        }
    };
    match result {
        Ok((observed, applied)) => {
            let mut fetched = build::Fetched::default();
            if let Some(secret) = &observed.signing_secret {
                // A changed provider secret (Atomic replacement, Smallest re-read) is
                // accepted in old and new form for the endpoint's rotation window.
                let secret_name = sub.provider_signing_secret_name();
                let owned = secrets::read_owned(&ctx.secrets, sub, &secret_name).await?;
                let decision = rotation::decide(
                    &owned,
                    secret.as_bytes(),
                    jiff::Timestamp::now(),
                    endpoint_overlap(sub, ctx).await,
                );
                let mut next = decision.stored.clone();
                next.insert(SIGNING_SECRET_KEY.into(), secret.as_bytes().to_vec());
                if next != owned {
                    secrets::write_owned(&ctx.secrets, sub, &secret_name, &next).await?;
                }
                if decision.rotated {
                    publish(ctx, sub, EventType::Normal, "ProviderSecretRotated", "Sync", "the provider's signing secret changed; the old one is accepted during the overlap window".into()).await;
                }
                fetched.set_owned(&secret_name, Ok(next));
            }
            ctx.routes
                .subscription_keys(sub, build::verification_keys(sub, &fetched));
            Ok(Outcome::Synced { observed, applied })
        }
        Err(e) => Ok(Outcome::Failed(e)),
    }
}

/// The rotation window of the endpoint the subscription receives on.
pub(super) async fn endpoint_overlap(sub: &WebhookSubscription, ctx: &Context) -> Duration {
    let ns = sub.namespace().unwrap_or_default();
    let ep = match &sub.spec.endpoint_ref {
        Some(r) => ctx.endpoint(&ns, &r.name).await.ok().flatten(),
        None => None,
    };
    crate::controller::endpoint::rotation_overlap(
        ep.as_deref().and_then(|e| e.spec.signing.as_ref()),
    )
}
