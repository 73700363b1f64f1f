//! Tests against a real kube-apiserver + etcd (see `support`). One binary, so the control
//! plane starts once.

mod fixtures;
mod support;

mod api_validation;
mod behaviours;
mod bounds;
mod chart;
mod dedupe;
mod delivery_e2e;
mod filter;
mod health_scripts;
mod isolation;
mod key_race;
mod operator_run;
mod pace;
mod plugin;
mod powercut;
mod routes_race;
mod scaleout;
mod subscription_sync;
mod through_binary;
mod tls;

#[path = "../common/nats.rs"]
mod nats;
#[path = "../common/ports.rs"]
mod ports;
#[path = "../common/process.rs"]
mod process;
#[path = "../common/sdk.rs"]
mod sdk;
