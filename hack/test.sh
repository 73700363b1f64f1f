#!/usr/bin/env bash
# The whole test suite: set-up, formatting, lints, then every test (unit, simulator,
# data plane, the chart, the image built from the Dockerfile with buildah (tests/image.rs),
# and the Kubernetes tests against a real kube-apiserver + etcd),
# then the local demo and the benchmark as bounded smoke runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
hack/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every target but the Kubernetes binary, in parallel.
flat_tests=()
for f in tests/*.rs; do flat_tests+=(--test "$(basename "$f" .rs)"); done
cargo test --locked --lib --bins --benches "${flat_tests[@]}"
# The unit tests of the workspace's other crates (crates/: api, providers, dataplane,
# sandbox, kubectl-webhooks).
cargo test --locked --workspace --exclude webhook-operator --lib --bins
# The Kubernetes tests start operator binaries, NATS servers and loads on one shared
# machine; in parallel they measure each other, so they run one at a time.
cargo test --locked --test kubernetes -- --test-threads=1
# The chart on a real node (hack/cluster.sh): helm install, Services and cluster DNS, the
# release's lifecycle under load. One cluster for the binary, one test at a time.
cargo test --locked --test node -- --test-threads=1
hack/run-local.sh --smoke
# The same demo on a single-node cluster: the image, helm install, Services, cluster DNS.
hack/run-local.sh --cluster --smoke
# The benchmark in smoke mode (dev profile: no release build in CI); it only has to complete.
cargo bench --locked --profile dev --bench bench -- --smoke
echo "test.sh: finished in $(( $(date +%s) - start ))s"
