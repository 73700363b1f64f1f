#!/usr/bin/env bash
# A real Kubernetes control plane for tests and the local demo: etcd + kube-apiserver on
# loopback, built from their Go modules (see hack/controlplane/*/go.mod), cached by version.
#
#   hack/controlplane.sh build          build (or reuse) kube-apiserver, kubectl and etcd; print the bin dir
#   hack/controlplane.sh start [DIR] [OWNER_PID]
#                                       start both in DIR (default .controlplane), wait for /readyz,
#                                       write DIR/kubeconfig; prints `export KUBECONFIG=...`.
#                                       With OWNER_PID, both stop when that process exits.
#   hack/controlplane.sh stop [DIR]     stop what start started
#
# No kubelet, scheduler or controller-manager: nothing garbage-collects and namespaces stay
# Terminating. Tests must not rely on those. hack/cluster.sh adds a node, and sets:
#   CONTROLPLANE_NETNS         run etcd and the API server in this network namespace
#   CONTROLPLANE_NODE_IP       bind every address, advertise this one (pods reach the API
#                              through the `kubernetes` Service), admit ServiceAccounts
#   CONTROLPLANE_SERVICE_CIDR  the Services' ClusterIP range (default 10.0.0.0/24)
#   CONTROLPLANE_SANS          more subjectAltNames for the serving certificate
set -euo pipefail

K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${WEBHOOK_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator}
bin="$cache/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"

log() { echo "controlplane: $*" >&2; }

netns=${CONTROLPLANE_NETNS:-}
node_ip=${CONTROLPLANE_NODE_IP:-}
service_cidr=${CONTROLPLANE_SERVICE_CIDR:-10.0.0.0/24}
# Runs a command in the control plane's network namespace (the machine's by default);
# nsenter execs it, so a background job's $! is the command's pid.
in_ns=()
[[ -n "$netns" ]] && in_ns=(nsenter --net="/run/netns/$netns" --)

build() {
  if [[ -x "$bin/kube-apiserver" && -x "$bin/kubectl" && -x "$bin/etcd" ]]; then
    echo "$bin"
    return
  fi
  command -v go >/dev/null || { log "go is required (see README: prerequisites)"; exit 1; }
  # A build directory of its own, so two runs at once cannot move each other's build away.
  mkdir -p "$(dirname "$bin")"
  local tmp; tmp=$(mktemp -d "$bin.tmp.XXXXXX")
  local major=${K8S_VERSION#v}; major=${major%%.*}
  local minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION \
    -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  log "building kube-apiserver and kubectl $K8S_VERSION (cold build takes several minutes)"
  (cd "$root/hack/controlplane/apiserver" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" \
    -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)
  log "building etcd $ETCD_VERSION"
  (cd "$root/hack/controlplane/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
    -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  if [[ -x "$bin/kube-apiserver" && -x "$bin/kubectl" && -x "$bin/etcd" ]]; then
    rm -rf "$tmp"
  else
    rm -rf "$bin" && mv "$tmp" "$bin"
  fi
  echo "$bin"
}

# A free port below the kernel's ephemeral range (32768 and up by default): a port the
# kernel hands out (bind to 0) can be taken by an outgoing connection before the server
# binds it, and an etcd that then fails with "address already in use" fails the test run.
free_port() {
  "${in_ns[@]}" python3 -c '
import random, socket
while True:
    s = socket.socket()
    try:
        port = random.randint(20000, 32000)
        s.bind(("127.0.0.1", port))
        print(port)
        break
    except OSError:
        pass
    finally:
        s.close()
'
}

start() {
  local dir=${1:-$root/.controlplane}
  build >/dev/null
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  stop "$dir" 2>/dev/null || true
  rm -rf "$dir/etcd-data" "$dir/certs"
  mkdir -p "$dir/certs"
  # A CA, a serving certificate it signs (rustls refuses a self-signed leaf), the
  # service-account key pair, and a static admin token.
  (cd "$dir/certs" &&
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=webhook-operator-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout ca.key -out ca.crt 2>/dev/null &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr 2>/dev/null &&
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost%s\n' "${CONTROLPLANE_SANS:+,$CONTROLPLANE_SANS}" > ext.cnf &&
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile ext.cnf -out apiserver.crt 2>/dev/null &&
    openssl genrsa -out sa.key 2048 2>/dev/null &&
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null)
  local token
  token=$(openssl rand -hex 24)
  echo "$token,admin,admin,system:masters" > "$dir/certs/tokens.csv"

  local attempt
  for attempt in 1 2 3; do
    if launch "$dir" "$token"; then
      if [[ -n "${2:-}" ]]; then
        # Watchdog: tests pass their own pid so a killed test run never leaks servers.
        (while kill -0 "$2" 2>/dev/null; do sleep 1; done; stop "$dir") >/dev/null 2>&1 </dev/null &
        disown
      fi
      echo "export KUBECONFIG=$dir/kubeconfig PATH=$bin:\$PATH"
      return
    fi
    stop "$dir"
    if ((attempt < 3)) && grep -qs "address already in use" "$dir/etcd.log" "$dir/apiserver.log"; then
      log "a port was taken before its server bound it; starting again on other ports"
      rm -rf "$dir/etcd-data"
      continue
    fi
    tail -20 "$dir/etcd.log" "$dir/apiserver.log" >&2
    exit 1
  done
}

# Starts etcd and kube-apiserver on fresh ports and waits until the API server is ready;
# fails as soon as either exits, or after 60 s.
launch() {
  local dir=$1 token=$2 etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  local bind=127.0.0.1 advertise=127.0.0.1 server=127.0.0.1 admission=(--disable-admission-plugins ServiceAccount)
  if [[ -n "$node_ip" ]]; then
    # The kubelet's node name resolves nowhere: the API server reaches it by its IP.
    bind=0.0.0.0 advertise=$node_ip server=$node_ip admission=(--kubelet-preferred-address-types InternalIP)
  fi
  "${in_ns[@]}" "$bin/etcd" --data-dir "$dir/etcd-data" --name cp \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "cp=http://127.0.0.1:$peer_port" --unsafe-no-fsync --log-level error \
    >"$dir/etcd.log" 2>&1 &
  echo $! > "$dir/etcd.pid"

  "${in_ns[@]}" "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$bind" --advertise-address "$advertise" --secure-port "$api_port" \
    --cert-dir "$dir/certs" --tls-cert-file "$dir/certs/apiserver.crt" --tls-private-key-file "$dir/certs/apiserver.key" \
    --service-cluster-ip-range "$service_cidr" --authorization-mode RBAC \
    "${admission[@]}" --token-auth-file "$dir/certs/tokens.csv" \
    --service-account-issuer https://127.0.0.1 --service-account-key-file "$dir/certs/sa.pub" \
    --service-account-signing-key-file "$dir/certs/sa.key" --client-ca-file "$dir/certs/ca.crt" --allow-privileged \
    >"$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"

  cat > "$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://$server:$api_port
    certificate-authority: $dir/certs/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
EOF
  for _ in $(seq 1 120); do
    if "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1; then
      log "ready at https://$server:$api_port"
      return 0
    fi
    kill -0 "$(cat "$dir/etcd.pid")" 2>/dev/null || return 1
    kill -0 "$(cat "$dir/apiserver.pid")" 2>/dev/null || return 1
    sleep 0.5
  done
  log "kube-apiserver did not become ready; see $dir/apiserver.log"
  return 1
}

stop() {
  local dir=${1:-$root/.controlplane}
  for p in apiserver etcd; do
    if [[ -f "$dir/$p.pid" ]]; then
      kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
      rm -f "$dir/$p.pid"
    fi
  done
}

case "${1:-}" in
  build) build ;;
  start) start "${2:-}" "${3:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 build|start [DIR]|stop [DIR]" >&2; exit 2 ;;
esac
