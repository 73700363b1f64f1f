//! `kubectl webhooks`: the kubectl plugin of the webhook-operator (`test`, `rotate`,
//! `replay`). It talks to the API server only, through annotations the operator handles;
//! of this workspace it depends on the API crate alone.

pub mod annotate;
pub mod plugin;
pub mod replay;
