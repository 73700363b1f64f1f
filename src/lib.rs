//! webhook-operator: manages provider webhooks as Kubernetes custom resources, receives
//! their events, stores them durably and delivers them to in-cluster services.

pub mod allocator;
pub mod annotate;
pub mod api;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod delivery;
pub mod demo_consumer;
pub mod duration;
pub mod health;
pub mod inbound;
pub mod ingress;
pub mod leader;
pub mod metrics;
pub mod plugin;
pub mod providers;
pub mod queue;
pub mod replay;
pub mod sandbox;
pub mod spans;
pub mod telemetry;
pub mod trace_context;
