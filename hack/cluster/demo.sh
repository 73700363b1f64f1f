#!/usr/bin/env bash
# The README's demo on a real single-node cluster (`hack/run-local.sh --cluster`): the
# image built from the Dockerfile, `helm install` of the chart, the provider simulators and
# the demo consumer as Deployments with Services, then examples/ and one event fired from
# each provider, delivered through the Services by cluster DNS name.
#
#   hack/cluster/demo.sh           run, print the table, keep running until Ctrl-C
#   hack/cluster/demo.sh --smoke   run, print the table, exit 0; non-zero with
#                                  diagnostics when not done within DEMO_TIMEOUT (300 s)
#
# Everything it starts is stopped on exit. Logs are in .demo-cluster/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
smoke=false
case "${1:-}" in
  --smoke) smoke=true ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
timeout_secs=${DEMO_TIMEOUT:-300}
deadline=$(( $(date +%s) + timeout_secs ))
dir="$root/.demo-cluster"
ns=demo
release=webhook-operator

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }
time_left() { (( $(date +%s) < deadline )); }
diagnose() {
  say "FAILED: $*"
  kubectl -n "$ns" get pods,svc,pvc -o wide >&2 || true
  kubectl -n "$ns" get webhooks -o wide >&2 || true
  kubectl -n "$ns" logs "statefulset/$release" --tail=25 >&2 || true
  exit 1
}

hack/setup.sh
say "building the image"
# WEBHOOK_OPERATOR_NODE_IMAGE=interim: the binary on a scratch base instead (as tests/node).
if [[ "${WEBHOOK_OPERATOR_NODE_IMAGE:-}" != interim ]]; then
  archive=$(hack/image.sh build | tail -n1) repo=localhost/webhook-operator tag=dev
else
  cargo build --quiet --bin webhook-operator
  mkdir -p "$dir"
  archive=$(hack/cluster.sh interim-image target/debug/webhook-operator "$dir/operator.oci.tar" \
    localhost/webhook-operator-interim:demo) repo=localhost/webhook-operator-interim tag=demo
fi

say "starting a single-node cluster"
trap 'hack/cluster.sh stop "$dir"' EXIT
eval "$(hack/cluster.sh start "$dir" $$)"
hack/cluster.sh load "$dir" "$archive" "$repo"
kubectl create namespace "$ns" >/dev/null
secret="whsec_$(openssl rand -base64 32)"

say "the provider simulators and the demo consumer (Deployments + Services)"
deployment() { # name args
  cat <<EOF
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1}
spec:
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containers:
      - name: $1
        image: $repo:$tag
        imagePullPolicy: Never
        args: $2
        env: [{name: NO_COLOR, value: "1"}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts: [{name: signing, mountPath: /etc/demo, readOnly: true}]
      volumes: [{name: signing, secret: {secretName: demo-signing}}]
---
apiVersion: v1
kind: Service
metadata: {name: $1}
spec:
  selector: {app: $1}
  ports: [{name: http, port: 8080, targetPort: http}]
EOF
}
kubectl -n "$ns" create secret generic demo-signing --from-literal=secret="$secret" >/dev/null
{
  deployment sandbox '[sandbox, --listen, "0.0.0.0:8080"]'
  deployment demo-consumer '[demo-consumer, --listen, "0.0.0.0:8080", --secret-file, /etc/demo/secret]'
} | kubectl -n "$ns" apply -f - >/dev/null
kubectl -n "$ns" rollout status deploy/sandbox deploy/demo-consumer --timeout=120s >/dev/null ||
  diagnose "the simulators or the consumer did not start"

say "helm install $release charts/webhook-operator"
hack/helm.sh install "$release" charts/webhook-operator -n "$ns" \
  --set image.repository="$repo" --set image.tag="$tag" \
  --set operator.publicBaseURL="http://$release-ingress.$ns.svc" \
  --set operator.providers.sandboxURL="http://sandbox.$ns.svc:8080" \
  --wait --timeout 240s >/dev/null || diagnose "helm install did not become Ready"

say "applying examples/ (credentials, endpoints, subscriptions)"
kubectl -n "$ns" apply -f examples/credentials.yaml -f examples/endpoints.yaml -f examples/subscriptions.yaml >/dev/null
left=$(( deadline - $(date +%s) )); (( left > 0 )) || left=1
kubectl -n "$ns" wait --for=condition=Ready --timeout="${left}s" webhookendpoints,webhooksubscriptions --all >/dev/null ||
  diagnose "not every resource became Ready"

sandbox="http://$(kubectl -n "$ns" get svc sandbox -o jsonpath='{.spec.clusterIP}'):8080"
consumer="http://$(kubectl -n "$ns" get svc demo-consumer -o jsonpath='{.spec.clusterIP}'):8080"
fire() { # provider json
  local out
  out=$(curl -fsS -X POST -H 'content-type: application/json' -d "$2" "$sandbox/_control/$1/fire") || return 1
  python3 -c 'import json,sys; d=json.load(sys.stdin)["deliveries"]; sys.exit(0 if d and all(200<=x["status"]<300 for x in d) else 1)' <<<"$out"
}
events=(
  "atlas" '{"event":"call_completed","campaignId":"demo-campaign"}'
  "atomic" '{"event":"card-completed","organizationId":"demo-org","environmentId":"demo-env"}'
  "smallest" '{"event":"post-conversation","agentId":"65f0c0ffee00000000000001"}'
)
for ((i = 0; i < ${#events[@]}; i += 2)); do
  say "firing a ${events[i]} event"
  until fire "${events[i]}" "${events[i + 1]}"; do
    time_left || diagnose "the ${events[i]} simulator could not deliver to the operator's Service"
    sleep 1
  done
done
say "waiting for the consumer to verify them"
until curl -fsS "$consumer/_counts" | python3 -c 'import json,sys; c=json.load(sys.stdin); sys.exit(0 if all(c.get(p,0)>=1 for p in ("/atlas","/atomic","/smallest")) else 1)'; do
  time_left || diagnose "not every event reached the consumer"
  sleep 1
done

echo
kubectl -n "$ns" get webhooks
echo
echo "verified by the demo consumer (per path): $(curl -fsS "$consumer/_counts")"
if $smoke; then
  say "smoke run passed"
  exit 0
fi
cat <<EOF

Everything is running. In another shell:
  export KUBECONFIG=$KUBECONFIG PATH=$(dirname "$(command -v kubectl)"):\$PATH
  kubectl -n $ns get pods,webhooks
  curl -X POST -d '{"event":"call_completed","campaignId":"demo-campaign"}' $sandbox/_control/atlas/fire
Ctrl-C stops everything.
EOF
sleep infinity &
wait $!
