#!/usr/bin/env bash
# Regenerates the CRD YAML from the Rust types into crds/ and the chart.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo run --quiet -- crd > crds/webhook-operator.yaml
cp crds/webhook-operator.yaml charts/webhook-operator/crds/webhook-operator.yaml
echo "wrote crds/webhook-operator.yaml and charts/webhook-operator/crds/webhook-operator.yaml"
