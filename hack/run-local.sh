#!/usr/bin/env bash
# The local demo, end to end on this machine: a real control plane, the CRDs, the provider
# simulators, a demo consumer and the operator; then the example resources in examples/
# (one subscription per provider, one endpoint each), one event fired from each provider,
# and `kubectl get webhooks` showing Ready, Healthy and the delivered count.
#
#   hack/run-local.sh           run, print the table, keep running until Ctrl-C
#   hack/run-local.sh --smoke   run, print the table, exit 0 (CI); non-zero with
#                               diagnostics when not done within DEMO_TIMEOUT (120 s)
#   hack/run-local.sh --cluster [--smoke]
#                               the same demo on a single-node cluster (hack/cluster.sh):
#                               the image, helm install, Deployments, Services, cluster
#                               DNS (hack/cluster/demo.sh)
#
# Everything it starts is stopped on exit (Ctrl-C included). Logs are in .demo/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

smoke=false
case "${1:-}" in
  --smoke) smoke=true ;;
  --cluster) shift; exec "$root/hack/cluster/demo.sh" "$@" ;;
  "") ;;
  *) echo "usage: $0 [--smoke] | --cluster [--smoke]" >&2; exit 2 ;;
esac
timeout_secs=${DEMO_TIMEOUT:-120}
dir="$root/.demo"
ns=demo

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }

hack/setup.sh
cargo build --quiet --bin webhook-operator
bin="$root/target/debug/webhook-operator"

rm -rf "$dir/data" && mkdir -p "$dir/data"
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # The control plane's processes, by the pids its start wrote; stop asks them to exit,
  # and what still runs after 15 s is killed.
  local cp_pids
  cp_pids=$(cat "$dir/controlplane/apiserver.pid" "$dir/controlplane/etcd.pid" 2>/dev/null || true)
  hack/controlplane.sh stop "$dir/controlplane" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 $cp_pids 2>/dev/null || break
    sleep 0.1
  done
  for pid in $cp_pids; do kill -KILL "$pid" 2>/dev/null || true; done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
sandbox_port=$(free_port); consumer_port=$(free_port); ingress_port=$(free_port); ops_port=$(free_port)
deadline=$(( $(date +%s) + timeout_secs ))
time_left() { (( $(date +%s) < deadline )); }

diagnose() {
  say "FAILED: $*"
  kubectl -n "$ns" get webhooks -o wide >&2 || true
  kubectl -n "$ns" get webhooks -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}:{range .status.conditions[*]} {.type}={.status}({.reason}: {.message}){end}{"\n"}{end}' >&2 || true
  for log in operator sandbox consumer; do
    echo "--- last lines of $dir/$log.log" >&2
    tail -n 25 "$dir/$log.log" >&2 || true
  done
  exit 1
}

wait_http() { # url what
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    time_left || diagnose "$2 did not answer at $1"
    sleep 0.2
  done
}

say "starting the control plane"
eval "$(hack/controlplane.sh start "$dir/controlplane" $$)"
kubectl apply -f crds/webhook-operator.yaml >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null
kubectl create namespace "$ns" >/dev/null

# The consumer's signing secret: in a Secret for the operator, in a file for the consumer.
umask 077
secret_file="$dir/signing-secret"
printf 'whsec_%s' "$(openssl rand -base64 32)" > "$secret_file"  # no newline: it is part of the key
kubectl -n "$ns" create secret generic demo-signing --from-file=secret="$secret_file" >/dev/null

say "starting the provider simulators, the demo consumer and the operator"
"$bin" sandbox --listen "127.0.0.1:$sandbox_port" >"$dir/sandbox.log" 2>&1 &
pids+=($!)
"$bin" demo-consumer --listen "127.0.0.1:$consumer_port" --secret-file "$secret_file" >"$dir/consumer.log" 2>&1 &
pids+=($!)
# --allow-loopback: the demo consumer listens on 127.0.0.1; never set it in a cluster.
"$bin" run --namespace "$ns" --data-dir "$dir/data" --allow-loopback \
  --ingress-addr "127.0.0.1:$ingress_port" --ops-addr "127.0.0.1:$ops_port" \
  --public-base-url "http://127.0.0.1:$ingress_port" \
  --provider-sandbox-url "http://127.0.0.1:$sandbox_port" \
  --resolve "demo-consumer.$ns.svc:8080=127.0.0.1:$consumer_port" >"$dir/operator.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$sandbox_port/_control/atlas/calls" "the simulators"
wait_http "http://127.0.0.1:$consumer_port/_counts" "the demo consumer"
wait_http "http://127.0.0.1:$ops_port/readyz" "the operator"

say "applying examples/ (credentials, endpoints, subscriptions)"
kubectl -n "$ns" apply -f examples/credentials.yaml -f examples/endpoints.yaml -f examples/subscriptions.yaml >/dev/null
left=$(( deadline - $(date +%s) )); (( left > 0 )) || left=1
kubectl -n "$ns" wait --for=condition=Ready --timeout="${left}s" webhookendpoints,webhooksubscriptions --all >/dev/null ||
  diagnose "not every resource became Ready"

# Fires one event; succeeds when every delivery to the hook URLs got a 2xx.
fire() { # provider json
  local out
  out=$(curl -fsS -X POST -H 'content-type: application/json' -d "$2" \
    "http://127.0.0.1:$sandbox_port/_control/$1/fire") || return 1
  python3 -c 'import json,sys; d=json.load(sys.stdin)["deliveries"]; sys.exit(0 if d and all(200<=x["status"]<300 for x in d) else 1)' <<<"$out"
}
jp() { kubectl -n "$ns" get "$1" -o jsonpath="$2"; }
atllas_url=$(jp whs/atllas-calls '{.status.manualSetup.hookURL}')
atllas_header=$(jp whs/atllas-calls '{.status.manualSetup.headerName}')
atllas_secret=$(jp whs/atllas-calls '{.status.manualSetup.secretName}')
atllas_value=$(jp "secret/$atllas_secret" '{.data.value}' | base64 -d)
events=(
  "atlas" '{"event":"call_completed","campaignId":"demo-campaign"}'
  "atomic" '{"event":"card-completed","organizationId":"demo-org","environmentId":"demo-env"}'
  "smallest" '{"event":"post-conversation","agentId":"65f0c0ffee00000000000001"}'
  "atllas" "$(python3 -c 'import json,sys; print(json.dumps({"url":sys.argv[1],"event":"call.finished","headerName":sys.argv[2],"headerValue":sys.argv[3]}))' "$atllas_url" "$atllas_header" "$atllas_value")"
)
unset atllas_value
for ((i = 0; i < ${#events[@]}; i += 2)); do
  say "firing a ${events[i]} event"
  until fire "${events[i]}" "${events[i + 1]}"; do
    time_left || diagnose "the ${events[i]} simulator could not deliver to the operator's ingress"
    sleep 1
  done
done

say "waiting for every endpoint to report a delivery"
until [[ -n "$(jp whe '{.items[*].metadata.name}')" ]] &&
  python3 -c 'import json,sys; items=json.load(sys.stdin)["items"]; sys.exit(0 if items and all((i.get("status",{}).get("delivery",{}).get("delivered") or 0) >= 1 for i in items) else 1)' \
    < <(kubectl -n "$ns" get whe -o json); do
  time_left || diagnose "not every endpoint reported a delivery"
  sleep 1
done

echo
kubectl -n "$ns" get webhooks
echo
echo "verified by the demo consumer (per path): $(curl -fsS "http://127.0.0.1:$consumer_port/_counts")"
if $smoke; then
  say "smoke run passed"
  exit 0
fi
cat <<EOF

Everything is running. In another shell:
  export KUBECONFIG=$KUBECONFIG PATH=$(dirname "$(command -v kubectl)"):\$PATH
  kubectl -n $ns get webhooks
  curl -X POST -d '{"event":"call_completed","campaignId":"demo-campaign"}' http://127.0.0.1:$sandbox_port/_control/atlas/fire
Logs: $dir/{operator,sandbox,consumer}.log. Ctrl-C stops everything.
EOF
wait "${pids[@]}"
