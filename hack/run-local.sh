#!/usr/bin/env bash
# Runs the operator end to end on this machine: a real control plane, the CRDs, and the
# operator against it. Ctrl-C stops everything it started.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
dir="$root/.demo"
mkdir -p "$dir"
hack/setup.sh
cargo build --quiet
eval "$(hack/controlplane.sh start "$dir/controlplane" $$)"
trap 'kill $(jobs -p) 2>/dev/null; hack/controlplane.sh stop "$dir/controlplane"' EXIT
kubectl apply -f crds/webhook-operator.yaml
kubectl wait --for=condition=Established --timeout=60s crd --all
echo "KUBECONFIG=$KUBECONFIG"
./target/debug/webhook-operator run --data-dir "$dir/data" \
  --ingress-addr 127.0.0.1:8080 --ops-addr 127.0.0.1:9090 --public-base-url http://127.0.0.1:8080
