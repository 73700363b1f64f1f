#!/usr/bin/env bash
# Installs what the build, the tests and the local demo need, pinned, and builds the
# cached control plane. Safe to run again: every step is skipped when already done.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

need_apt=()
# lua5.1: the chart's Argo CD health script runs under it in the tests (gopher-lua is 5.1).
for tool in openssl python3 curl lua5.1; do
  command -v "$tool" >/dev/null || need_apt+=("$tool")
done
# nginx: the keep-alive reverse proxy the benchmark compares the delivery path with
# (benches/bench/delivery.rs configures and starts its own instance on loopback).
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need_apt+=(nginx)
# `python3 -m venv` (for the SDK conformance test) needs ensurepip: python3-venv on Debian.
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# buildah and debootstrap: hack/image.sh builds the Dockerfile (no Docker engine needed) on a
# debian:bookworm-slim stand-in that debootstrap makes; runc runs the image in tests/image.rs.
# Debian's bookworm versions (buildah 1.28, debootstrap 1.0.128, runc 1.1.5).
for tool in buildah debootstrap runc; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || need_apt+=("$tool")
done
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# A CEL evaluator for the chart's Flux health expressions (tests/health/flux_cel.py), pinned.
CEL_PYTHON_VERSION=0.5.0
if ! python3 -c "import importlib.metadata as m; assert m.version('cel-python') == '$CEL_PYTHON_VERSION'" 2>/dev/null; then
  python3 -m pip install -q "cel-python==$CEL_PYTHON_VERSION"
fi
for tool in go cargo; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required (Go >= 1.25, Rust stable >= 1.89)" >&2; exit 1; }
done
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

# kube-apiserver, kubectl and etcd from their Go modules (cached by version).
"$root/hack/controlplane.sh" build >/dev/null
# The single-node cluster of tests/node (hack/cluster.sh): containerd, runc, the CNI plugins
# and buildah from Debian's packages; kubelet, kube-controller-manager, kube-scheduler,
# kube-proxy and CoreDNS from their Go modules; a pause image (all cached by version).
"$root/hack/cluster.sh" build >/dev/null

# Helm, for the chart's lint/template tests (pinned; built from its Go module once).
"$root/hack/helm.sh" version >/dev/null
# promtool, for `promtool test rules` on the chart's alerts (pinned; built once).
"$root/hack/promtool.sh" --version >/dev/null
# nats-server with JetStream, for the JetStream queue and scale-out tests, from its Go
# module (pinned; the tests look for it here).
NATS_SERVER_VERSION=v2.14.9
nats_bin="${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator/bin"
if ! "$nats_bin/nats-server" --version 2>/dev/null | grep -q "${NATS_SERVER_VERSION#v}"; then
  mkdir -p "$nats_bin"
  GOBIN="$nats_bin" go install "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION"
fi
# lazyfs, the FUSE file system of the power-cut test (tests/kubernetes/powercut.rs, which
# builds it): its modules, pinned by tests/powercut/lazyfs/go.sum, into the module cache.
(cd "$root/tests/powercut/lazyfs" && go mod download)

# The official Smallest Python SDK, pinned, in its own venv: the conformance test
# smallest_official_sdk_conforms (tests/providers_sim.rs) runs
# tests/conformance/smallest_sdk.py with it against the Smallest simulator.
SMALLESTAI_VERSION=5.14.0
sdk_venv="${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator/sdk-venv"
if ! "$sdk_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('smallestai') != '$SMALLESTAI_VERSION')" 2>/dev/null; then
  python3 -m venv "$sdk_venv"
  "$sdk_venv/bin/pip" install --quiet "smallestai==$SMALLESTAI_VERSION"
fi
# The CloudEvents Python SDK, pinned, in the same venv: the consumer of
# cloudevents_format_is_read_back_by_the_cloudevents_sdk (tests/dataplane.rs).
CLOUDEVENTS_VERSION=2.2.0
if ! "$sdk_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('cloudevents') != '$CLOUDEVENTS_VERSION')" 2>/dev/null; then
  "$sdk_venv/bin/pip" install --quiet "cloudevents==$CLOUDEVENTS_VERSION"
fi
# The OpenTelemetry protocol's Python package, pinned, in the same venv: the collector of
# otlp_export_through_the_binary_is_read_by_opentelemetry_proto (tests/kubernetes/through_binary.rs)
# decodes the operator's OTLP export with it (tests/conformance/otlp_collector.py).
OTEL_PROTO_VERSION=1.45.2
if ! "$sdk_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('opentelemetry-proto') != '$OTEL_PROTO_VERSION')" 2>/dev/null; then
  "$sdk_venv/bin/pip" install --quiet "opentelemetry-proto==$OTEL_PROTO_VERSION"
fi
