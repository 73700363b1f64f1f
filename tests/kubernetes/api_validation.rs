//! The CRDs on a real API server: established, valid objects round-trip, status is
//! writable, and invalid objects are refused by the API server with the field named.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use webhook_operator::api::endpoint::*;
use webhook_operator::api::subscription::*;
use webhook_operator::api::{Provider, SecretKeyRef};

use crate::support::test_env;

fn full_endpoint_spec() -> WebhookEndpointSpec {
    WebhookEndpointSpec {
        destination: Destination {
            service: Some(ServiceDestination {
                name: "consumer".into(),
                namespace: Some("apps".into()),
                port: 8080,
                path: Some("/events".into()),
            }),
            url: None,
            tls: None,
        },
        delivery: DeliveryPolicy {
            timeout: "5s".into(),
            retry: RetryPolicy {
                max_attempts: 5,
                backoff: Backoff::Linear,
                initial_delay: "200ms".into(),
                max_delay: "1m".into(),
                max_age: "2h".into(),
            },
            max_in_flight: 4,
            adaptive_concurrency: false,
            rate_per_second: 50,
            dead_letter: DeadLetterPolicy {
                retention: "72h".into(),
            },
        },
        signing: Some(Signing {
            secret_ref: Some(SecretKeyRef {
                name: "signing".into(),
                key: "secret".into(),
            }),
            rotation_overlap: "1h".into(),
        }),
        headers: vec![HeaderFromSecret {
            name: "X-Api-Token".into(),
            secret_key_ref: SecretKeyRef {
                name: "consumer-auth".into(),
                key: "token".into(),
            },
        }],
        event_types: vec![EventTypeName("call_completed".into())],
        max_queued_events: Some(5000),
        max_queued_bytes: Some(64 * 1024 * 1024),
        ingress_rate_limit: Some(IngressRateLimit {
            requests_per_second: 50,
            burst: Some(200),
        }),
        format: Default::default(),
        filter: None,
        dedupe: Some(Dedupe {
            key: "payload.call.id + ':' + eventType".into(),
            window: Some("10m".into()),
        }),
    }
}

fn full_subscription_spec() -> WebhookSubscriptionSpec {
    WebhookSubscriptionSpec {
        provider: Provider::Smallest,
        credentials_ref: Some(CredentialsRef {
            name: "smallest-creds".into(),
            api_key_key: "apiKey".into(),
            client_id_key: "clientId".into(),
            client_secret_key: "clientSecret".into(),
        }),
        events: vec![EventName("post-conversation".into())],
        atlas: None,
        atomic: None,
        smallest: Some(SmallestScope {
            agent_ids: vec![AgentId("65f0c0ffee00000000000001".into())],
        }),
        atllas: None,
        endpoint_ref: Some(EndpointRef {
            name: "orders".into(),
        }),
        url: None,
        deletion_policy: DeletionPolicy::Orphan,
        management_policy: ManagementPolicy::ObserveOnly,
        resync_interval: "10m".into(),
    }
}

#[tokio::test]
async fn crds_are_established_and_listed_by_category() {
    let env = test_env("crd").await;
    let out = env.cp.kubectl(&["get", "crd", "-o", "json"]);
    let crds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in [
        "webhookendpoints.hooks.webhook-operator.dev",
        "webhooksubscriptions.hooks.webhook-operator.dev",
    ] {
        let crd = crds["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{name} not installed"));
        let established = crd["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        assert!(established, "{name} not Established");
    }
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    endpoints
        .create(
            &PostParams::default(),
            &WebhookEndpoint::new("listed", full_endpoint_spec()),
        )
        .await
        .unwrap();
    let out = env
        .cp
        .kubectl(&["get", "webhooks", "-n", &env.namespace, "-o", "name"]);
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(
        names.contains("webhookendpoint.hooks.webhook-operator.dev/listed"),
        "`kubectl get webhooks` did not list the endpoint: {names} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.cp.kubectl(&[
        "explain",
        "webhookendpoints.spec.delivery.retry.maxAttempts",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Attempts in all"), "kubectl explain: {text}");
}

#[tokio::test]
async fn valid_objects_round_trip_and_status_is_writable() {
    let env = test_env("roundtrip").await;
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(env.client.clone(), &env.namespace);
    let subs: Api<WebhookSubscription> = Api::namespaced(env.client.clone(), &env.namespace);

    let created = endpoints
        .create(
            &PostParams::default(),
            &WebhookEndpoint::new("orders", full_endpoint_spec()),
        )
        .await
        .unwrap();
    assert_eq!(created.spec, full_endpoint_spec());
    assert_eq!(
        endpoints.get("orders").await.unwrap().spec,
        full_endpoint_spec()
    );

    let created = subs
        .create(
            &PostParams::default(),
            &WebhookSubscription::new("calls", full_subscription_spec()),
        )
        .await
        .unwrap();
    assert_eq!(created.spec, full_subscription_spec());

    // A minimal object gets the documented defaults from the schema.
    let minimal: WebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "hooks.webhook-operator.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": "minimal"},
        "spec": {"destination": {"url": "https://consumer.example.com/hook"}}
    }))
    .unwrap();
    let created = endpoints
        .create(&PostParams::default(), &minimal)
        .await
        .unwrap();
    assert_eq!(created.spec.delivery, DeliveryPolicy::default());

    // Status through the status subresource.
    let condition = Condition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: "IngressAssigned".into(),
        message: "ingress URL assigned".into(),
        last_transition_time: Time(jiff::Timestamp::now().round(jiff::Unit::Second).unwrap()),
        observed_generation: Some(1),
    };
    let status = json!({"status": {
        "observedGeneration": 1,
        "conditions": [condition],
        "ingressURL": "/hooks/abc",
        "delivery": {"delivered": 3, "failed": 0, "retrying": 0, "deadLettered": 0, "consecutiveFailures": 0}
    }});
    endpoints
        .patch_status("orders", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let read = endpoints.get_status("orders").await.unwrap();
    let st = read.status.expect("status written");
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.conditions, vec![condition]);
    assert_eq!(st.ingress_url.as_deref(), Some("/hooks/abc"));
    assert_eq!(st.delivery.unwrap().delivered, 3);
    // The spec is untouched by a status write.
    assert_eq!(read.spec, full_endpoint_spec());
}

/// Each case: kind, spec, and the field path the API server's message must name.
fn invalid_cases() -> Vec<(&'static str, &'static str, serde_json::Value, &'static str)> {
    let https = "https://consumer.example.com";
    vec![
        (
            "two destinations",
            "WebhookEndpoint",
            json!({"destination": {"service": {"name": "c", "port": 80}, "url": https}}),
            "spec.destination",
        ),
        (
            "no destination",
            "WebhookEndpoint",
            json!({"destination": {}}),
            "spec.destination",
        ),
        (
            "http URL to a public host",
            "WebhookEndpoint",
            json!({"destination": {"url": "http://consumer.example.com/hook"}}),
            "spec.destination.url",
        ),
        (
            "TLS settings for a Service destination",
            "WebhookEndpoint",
            json!({"destination": {"service": {"name": "c", "port": 80}, "tls": {"clientCertSecretRef": {"name": "cert"}}}}),
            "spec.destination",
        ),
        (
            "TLS settings for an http URL",
            "WebhookEndpoint",
            json!({"destination": {"url": "http://consumer.apps.svc/hook", "tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}}}}),
            "spec.destination",
        ),
        (
            "negative retry count",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "delivery": {"retry": {"maxAttempts": -1}}}),
            "spec.delivery.retry.maxAttempts",
        ),
        (
            "a dedupe window past the queue's",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "dedupe": {"key": "payload.id", "window": "48h"}}),
            "spec.dedupe.window",
        ),
        (
            "a dedupe without a key",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "dedupe": {"window": "1h"}}),
            "spec.dedupe.key",
        ),
        (
            "a backlog bound of zero",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "maxQueuedEvents": 0}),
            "spec.maxQueuedEvents",
        ),
        (
            "a byte bound of zero",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "maxQueuedBytes": 0}),
            "spec.maxQueuedBytes",
        ),
        (
            "a rate limit of zero requests per second",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "ingressRateLimit": {"requestsPerSecond": 0}}),
            "spec.ingressRateLimit.requestsPerSecond",
        ),
        (
            "timeout out of range",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "delivery": {"timeout": "10m"}}),
            "spec.delivery.timeout",
        ),
        (
            "not a duration",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "delivery": {"retry": {"initialDelay": "soon"}}}),
            "spec.delivery.retry.initialDelay",
        ),
        (
            "reserved header",
            "WebhookEndpoint",
            json!({"destination": {"url": https}, "headers": [{"name": "Webhook-Signature", "secretKeyRef": {"name": "s", "key": "k"}}]}),
            "spec.headers[0].name",
        ),
        (
            "unknown provider",
            "WebhookSubscription",
            json!({"provider": "zapier", "credentialsRef": {"name": "c"}, "events": ["call_started"], "endpointRef": {"name": "e"}}),
            "spec.provider",
        ),
        (
            "atlas events on an atomic subscription",
            "WebhookSubscription",
            json!({"provider": "atomic", "credentialsRef": {"name": "c"}, "events": ["call_started"],
                   "atomic": {"organizationId": "o", "environmentId": "e"}, "endpointRef": {"name": "e"}}),
            "spec.events",
        ),
        (
            "atomic signature header that is not a header name",
            "WebhookSubscription",
            json!({"provider": "atomic", "credentialsRef": {"name": "c"}, "events": ["card-published"],
                   "atomic": {"organizationId": "o", "environmentId": "e", "signature": {"header": "X Sig"}}, "endpointRef": {"name": "e"}}),
            "spec.atomic.signature.header",
        ),
        (
            "atomic signature encoding unknown",
            "WebhookSubscription",
            json!({"provider": "atomic", "credentialsRef": {"name": "c"}, "events": ["card-published"],
                   "atomic": {"organizationId": "o", "environmentId": "e", "signature": {"encoding": "base32"}}, "endpointRef": {"name": "e"}}),
            "spec.atomic.signature.encoding",
        ),
        (
            "atlas without campaignId",
            "WebhookSubscription",
            json!({"provider": "atlas", "credentialsRef": {"name": "c"}, "events": ["call_started"], "endpointRef": {"name": "e"}}),
            "spec.atlas",
        ),
        (
            "atlas scope with empty campaignId",
            "WebhookSubscription",
            json!({"provider": "atlas", "credentialsRef": {"name": "c"}, "events": ["call_started"],
                   "atlas": {}, "endpointRef": {"name": "e"}}),
            "spec.atlas.campaignId",
        ),
        (
            "unknown event name",
            "WebhookSubscription",
            json!({"provider": "smallest", "credentialsRef": {"name": "c"}, "events": ["call-ended"],
                   "smallest": {"agentIds": ["a1"]}, "endpointRef": {"name": "e"}}),
            "spec.events",
        ),
        (
            "scope of another provider",
            "WebhookSubscription",
            json!({"provider": "atlas", "credentialsRef": {"name": "c"}, "events": ["call_started"],
                   "atlas": {"campaignId": "*"}, "smallest": {"agentIds": ["a1"]}, "endpointRef": {"name": "e"}}),
            "spec.smallest",
        ),
        (
            "missing credentials",
            "WebhookSubscription",
            json!({"provider": "atlas", "events": ["call_started"], "atlas": {"campaignId": "*"}, "endpointRef": {"name": "e"}}),
            "spec.credentialsRef",
        ),
        (
            "endpointRef and url",
            "WebhookSubscription",
            json!({"provider": "atlas", "credentialsRef": {"name": "c"}, "events": ["call_started"],
                   "atlas": {"campaignId": "*"}, "endpointRef": {"name": "e"}, "url": https}),
            "spec.endpointRef",
        ),
        (
            "resync too fast",
            "WebhookSubscription",
            json!({"provider": "atlas", "credentialsRef": {"name": "c"}, "events": ["call_started"],
                   "atlas": {"campaignId": "*"}, "endpointRef": {"name": "e"}, "resyncInterval": "1s"}),
            "spec.resyncInterval",
        ),
    ]
}

#[tokio::test]
async fn invalid_objects_are_rejected_naming_the_field() {
    let env = test_env("invalid").await;
    let cases = invalid_cases();
    for (i, (what, kind, spec, field)) in cases.into_iter().enumerate() {
        let resource = if kind == "WebhookEndpoint" {
            ApiResource::erase::<WebhookEndpoint>(&())
        } else {
            ApiResource::erase::<WebhookSubscription>(&())
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(env.client.clone(), &env.namespace, &resource);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "hooks.webhook-operator.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": format!("bad-{i}")},
            "spec": spec,
        }))
        .unwrap();
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => panic!("{what}: accepted, should be rejected"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{what}: {status:?}");
                assert!(
                    status.message.contains(&format!("{field}:")),
                    "{what}: message does not name {field}: {}",
                    status.message
                );
            }
            Err(e) => panic!("{what}: unexpected error {e}"),
        }
    }
}
