#!/usr/bin/env bash
# Runs the project's pinned promtool (tests the chart's alert rules), building it from its
# Go module into the cache on first use.
#   hack/promtool.sh path      print the promtool binary's path (building it if needed)
#   hack/promtool.sh ARGS...   run promtool ARGS...
set -euo pipefail

# Prometheus v3.x is published as Go module versions v0.3xx.y (v3.16.0 = v0.316.0).
PROMETHEUS_MODULE_VERSION=v0.316.0
cache=${WEBHOOK_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator}
bin="$cache/bin/promtool-$PROMETHEUS_MODULE_VERSION"

if [[ ! -x "$bin/promtool" ]]; then
  command -v go >/dev/null || { echo "promtool.sh: go is required (see README: prerequisites)" >&2; exit 1; }
  echo "promtool.sh: building promtool $PROMETHEUS_MODULE_VERSION (once, a few minutes)" >&2
  mkdir -p "$cache/bin"
  tmp=$(mktemp -d "$bin.tmp.XXXXXX")
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION" >&2
  if [[ -x "$bin/promtool" ]]; then rm -rf "$tmp"; else rm -rf "$bin" && mv "$tmp" "$bin"; fi
fi

if [[ "${1:-}" == path ]]; then
  echo "$bin/promtool"
else
  exec "$bin/promtool" "$@"
fi
