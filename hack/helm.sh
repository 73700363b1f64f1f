#!/usr/bin/env bash
# Runs the project's pinned Helm, building it from its Go module into the cache on first use.
#   hack/helm.sh path      print the helm binary's path (building it if needed)
#   hack/helm.sh ARGS...   run helm ARGS...
set -euo pipefail

HELM_VERSION=v3.21.4
cache=${WEBHOOK_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator}
bin="$cache/bin/helm-$HELM_VERSION"

if [[ ! -x "$bin/helm" ]]; then
  command -v go >/dev/null || { echo "helm.sh: go is required (see README: prerequisites)" >&2; exit 1; }
  echo "helm.sh: building helm $HELM_VERSION (once)" >&2
  # A build directory of its own, so two runs at once cannot move each other's build away.
  mkdir -p "$cache/bin"
  tmp=$(mktemp -d "$bin.tmp.XXXXXX")
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  if [[ -x "$bin/helm" ]]; then rm -rf "$tmp"; else rm -rf "$bin" && mv "$tmp" "$bin"; fi
fi

if [[ "${1:-}" == path ]]; then
  echo "$bin/helm"
else
  # Keep helm's own state out of the user's home.
  export HELM_CACHE_HOME="$cache/helm/cache" HELM_CONFIG_HOME="$cache/helm/config" HELM_DATA_HOME="$cache/helm/data"
  exec "$bin/helm" "$@"
fi
