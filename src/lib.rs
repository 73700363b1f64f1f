//! webhook-operator: manages provider webhooks as Kubernetes custom resources, receives
//! their events, stores them durably and delivers them to in-cluster services.
//!
//! This crate is the operator: the reconcilers, their configuration and the wiring. The
//! layers below it are crates of their own (ARCHITECTURE.md), re-exported here under the
//! module names they had: `api` (CRD types), `providers` (clients and inbound parsers, no
//! Kubernetes), `dataplane` with `queue`, `delivery`, `health`, `ingress`, `spans`
//! (no Kubernetes), and the kubectl plugin.

pub use kubectl_webhooks::{annotate, plugin, replay};
pub use webhook_api as api;
pub use webhook_api::duration;
pub use webhook_dataplane as dataplane;
pub use webhook_dataplane::{delivery, health, ingress, metrics, queue, spans, trace_context};
pub use webhook_providers as providers;
pub use webhook_providers::inbound;

pub mod allocator;
pub mod config;
pub mod controller;
pub mod demo_consumer;
pub mod leader;
pub mod telemetry;
pub mod transfer;
