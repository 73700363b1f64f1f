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
    if sub.spec.provider == Provider::Atllas {
        return manual_setup(sub, ctx, hook_url).await;
    }
    let desired = translate(&ns, &name, &sub.spec, hook_url);
    let (observed, applied) = match call_provider(sub, ctx, creds, desired, current).await {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(Outcome::MissingUpstream),
        Err(e) => return Ok(Outcome::Failed(e)),
    };
    let mut fetched = build::Fetched::default();
    if let Some(secret) = &observed.signing_secret {
        store_provider_secret(sub, ctx, secret.as_bytes(), &mut fetched).await?;
    }
    ctx.routes
        .subscription_keys(sub, build::verification_keys(sub, &fetched));
    Ok(Outcome::Synced { observed, applied })
}

/// Atllas has no API: the header value is generated once and registered with the ingress;
/// the user configures the portal.
async fn manual_setup(
    sub: &WebhookSubscription,
    ctx: &Context,
    hook_url: String,
) -> Result<Outcome, Error> {
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
    Ok(Outcome::Manual {
        hook_url,
        header_name: sub.spec.atllas_header_name(),
        secret_name,
    })
}

/// The call the management policy asks for: what the provider holds, and what the operator
/// applied (`None`: nothing written). `Ok(None)`: ObserveOnly and nothing exists upstream.
async fn call_provider(
    sub: &WebhookSubscription,
    ctx: &Context,
    creds: &Credentials,
    desired: DesiredSubscription,
    current: &WebhookSubscriptionStatus,
) -> Result<Option<(Observed, Option<DesiredSubscription>)>, ProviderError> {
    let provider = ctx
        .providers
        .get(crate::controller::to_dataplane::provider(sub.spec.provider));
    if sub.spec.management_policy == ManagementPolicy::ObserveOnly {
        return Ok(provider
            .observe(creds, &desired)
            .await?
            .map(|observed| (observed, None)));
    }
    let previous: Option<DesiredSubscription> = current
        .upstream
        .as_ref()
        .and_then(|u| u.applied.as_deref())
        .and_then(|s| serde_json::from_str(s).ok());
    // Once something was applied, look before writing: a subscription the provider
    // disabled is reported, not silently replaced (re-enabling is the user's call).
    if previous.as_ref() == Some(&desired) {
        let observed = provider.observe(creds, &desired).await?;
        if let Some(o) = observed.filter(|o| matches!(o.state, UpstreamState::Disabled { .. })) {
            return Ok(Some((o, previous)));
        }
    }
    let observed = provider.ensure(creds, &desired, previous.as_ref()).await?;
    Ok(Some((observed, Some(desired))))
}

/// Stores the provider's signing secret in the subscription's own Secret: a changed one
/// (Atomic replacement, Smallest re-read) is accepted in old and new form for the
/// endpoint's rotation window.
async fn store_provider_secret(
    sub: &WebhookSubscription,
    ctx: &Context,
    secret: &[u8],
    fetched: &mut build::Fetched,
) -> Result<(), Error> {
    let secret_name = sub.provider_signing_secret_name();
    let owned = secrets::read_owned(&ctx.secrets, sub, &secret_name).await?;
    let decision = rotation::decide(
        &owned,
        secret,
        jiff::Timestamp::now(),
        endpoint_overlap(sub, ctx).await,
    );
    let mut next = decision.stored.clone();
    next.insert(SIGNING_SECRET_KEY.into(), secret.to_vec());
    if next != owned {
        secrets::write_owned(&ctx.secrets, sub, &secret_name, &next).await?;
    }
    if decision.rotated {
        publish(ctx, sub, EventType::Normal, "ProviderSecretRotated", "Sync", "the provider's signing secret changed; the old one is accepted during the overlap window".into()).await;
    }
    fetched.set_owned(&secret_name, Ok(next));
    Ok(())
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
