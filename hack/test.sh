#!/usr/bin/env bash
# The whole test suite: set-up, formatting, lints, then every test (unit, simulator,
# data plane, the chart, and the Kubernetes tests against a real kube-apiserver + etcd),
# then the local demo and the benchmark as bounded smoke runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
hack/setup.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
hack/run-local.sh --smoke
# The benchmark in smoke mode (dev profile: no release build in CI); it only has to complete.
cargo bench --locked --profile dev --bench bench -- --smoke
echo "test.sh: finished in $(( $(date +%s) - start ))s"
