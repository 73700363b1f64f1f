//! Delivery: workers that lease due events per endpoint and POST them, signed with
//! Standard Webhooks, to the endpoint's destination, under its retry policy, concurrency
//! and rate limits and a per-destination circuit breaker. Provider-agnostic: it sees
//! queued events only. It never decides what an endpoint is; the facade tells it.

pub mod address_policy;
mod breaker;
mod client;
mod destination;
mod envelope;
pub mod filter;
mod pace;
mod policy;
mod signing;

pub use address_policy::AddressPolicy;
pub use breaker::{Admission, Breaker};
pub use destination::{Destination, DestinationError, Resolver, is_dns_label};
pub use envelope::DeliveryFormat;
pub use policy::{Backoff, Policy, RETRY_AFTER_CAP, parse_retry_after};
pub use signing::{SecretError, SigningSecret, signature_header, verify as verify_signature};

mod dispatcher;
mod worker;

pub(crate) use dispatcher::{Dispatcher, DispatcherSettings};
pub(crate) use worker::EndpointRuntime;
