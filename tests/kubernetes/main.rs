//! Tests against a real kube-apiserver + etcd (see `support`). One binary, so the control
//! plane starts once.

mod support;

mod api_validation;
mod operator_run;
mod subscription_sync;
mod scaleout;

#[path = "../common/nats.rs"]
mod nats;
