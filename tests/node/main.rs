//! Tests on a real single-node cluster (`hack/cluster.sh`): the chart installed as users
//! install it, with the operator's image, Services and cluster DNS. One binary, so the
//! node starts once; run with one thread (hack/test.sh).

mod support;

mod install;
mod jetstream;
mod lifecycle;
