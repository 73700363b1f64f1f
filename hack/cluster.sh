#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, for the tests that need a node
# (helm install, upgrades, pod deletion, Services, cluster DNS) and `run-local.sh --cluster`.
#
#   hack/cluster.sh build                 build (or reuse) kubelet, kube-controller-manager,
#                                         kube-scheduler, kube-proxy (same k8s.io/kubernetes
#                                         module and version as hack/controlplane.sh), CoreDNS
#                                         and a pause image; install containerd, runc and the
#                                         CNI plugins with apt when missing. Prints the bin dir.
#   hack/cluster.sh start [DIR] [OWNER_PID]
#                                         start the control plane (hack/controlplane.sh) and a
#                                         node in DIR (default .cluster); wait until the node is
#                                         Ready and CoreDNS answers; prints `export KUBECONFIG=...`.
#                                         With OWNER_PID, everything stops when that process exits.
#   hack/cluster.sh load DIR OCI_ARCHIVE  import an image archive into the node's containerd
#   hack/cluster.sh stop [DIR]            stop what start started: processes by PID, the
#                                         containers, the bridge and the mounts of this DIR
#
# Every run has names of its own (bridge, CNI network, containerd root and socket, ports,
# subnet), derived from DIR, so two runs on one machine do not meet.
#
# Storage for volume claims: a StorageClass `local` (no provisioner) that the harness makes
# default, and hostPath PersistentVolumes it creates under DIR (see `pv`).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
K8S_VERSION=$(sed -n 's/^K8S_VERSION=//p' "$root/hack/controlplane.sh")
COREDNS_VERSION=$(awk '$1 == "github.com/coredns/coredns" {print $2}' "$root/hack/cluster/coredns/go.mod")
PAUSE_VERSION=1
cache=${WEBHOOK_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/webhook-operator}
bin="$cache/cluster/k8s-$K8S_VERSION-coredns-$COREDNS_VERSION-pause-$PAUSE_VERSION"

log() { echo "cluster: $*" >&2; }

have_bins() {
  local f
  for f in kubelet kube-controller-manager kube-scheduler kube-proxy coredns pause.oci.tar coredns.oci.tar; do
    [[ -e "$bin/$f" ]] || return 1
  done
}

install_packages() {
  local need=()
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
  command -v buildah >/dev/null || need+=(buildah)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
  if ((${#need[@]})); then
    log "installing ${need[*]} with apt-get"
    apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
  fi
}

# buildah with a storage of its own under $1, so no other build on the machine meets it.
buildah_in() {
  local store=$1; shift
  buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"
}

# An image from scratch holding one static binary as its entrypoint, as an OCI archive.
scratch_image() {
  local binary=$1 name=$2 out=$3 store
  store=$(mktemp -d "$out.store.XXXXXX")
  local ctr
  ctr=$(buildah_in "$store" from scratch)
  buildah_in "$store" copy "$ctr" "$binary" "/$(basename "$binary")" >/dev/null
  buildah_in "$store" config --entrypoint "[\"/$(basename "$binary")\"]" "$ctr"
  buildah_in "$store" commit -q "$ctr" "$name" >/dev/null
  rm -f "$out"
  buildah_in "$store" push -q "$name" "oci-archive:$out:$name"
  buildah_in "$store" rm -a >/dev/null || true
  buildah_in "$store" rmi -a -f >/dev/null 2>&1 || true
  rm -rf "$store"
}

# An image of one binary from this machine (a stand-in operator image, the NATS server):
# BINARY, the shared libraries it links, the CA roots, on a scratch base, entrypoint
# /usr/local/bin/<its name>, user 65532.
interim_image() { # BINARY OUT NAME
  local binary=$1 out=$2 name=$3 store ctr lib
  store=$(mktemp -d "$out.store.XXXXXX")
  ctr=$(buildah_in "$store" from scratch)
  local mnt; mnt=$(buildah_in "$store" mount "$ctr")
  mkdir -p "$mnt/usr/local/bin" "$mnt/etc/ssl/certs" "$mnt/tmp"
  cp "$binary" "$mnt/usr/local/bin/$(basename "$binary")"
  for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
    mkdir -p "$mnt$(dirname "$lib")" && cp -L "$lib" "$mnt$lib"
  done
  cp -L /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/"
  chmod 1777 "$mnt/tmp"
  buildah_in "$store" umount "$ctr" >/dev/null
  buildah_in "$store" config --entrypoint "[\"/usr/local/bin/$(basename "$binary")\"]" --user 65532:65532 "$ctr"
  buildah_in "$store" commit -q "$ctr" "$name" >/dev/null
  rm -f "$out"
  buildah_in "$store" push -q "$name" "oci-archive:$out:$name"
  buildah_in "$store" rm -a >/dev/null || true
  buildah_in "$store" rmi -a -f >/dev/null 2>&1 || true
  rm -rf "$store"
  echo "$out"
}

build() {
  if have_bins; then
    echo "$bin"
    return
  fi
  install_packages
  command -v go >/dev/null || { log "go is required (see README: prerequisites)"; exit 1; }
  command -v cc >/dev/null || { log "a C compiler is required for the pause image"; exit 1; }
  mkdir -p "$(dirname "$bin")"
  local tmp; tmp=$(mktemp -d "$bin.tmp.XXXXXX")
  local major=${K8S_VERSION#v}; major=${major%%.*}
  local minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION \
    -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  log "building kubelet, kube-controller-manager, kube-scheduler, kube-proxy $K8S_VERSION (cold: several minutes)"
  (cd "$root/hack/cluster/kubernetes" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy)
  log "building CoreDNS $COREDNS_VERSION"
  (cd "$root/hack/cluster/coredns" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
    -o "$tmp/coredns" github.com/coredns/coredns)
  log "building the pause image"
  cc -static -O2 -o "$tmp/pause" "$root/hack/cluster/pause.c"
  strip "$tmp/pause"
  scratch_image "$tmp/pause" localhost/pause:webhook-operator "$tmp/pause.oci.tar"
  scratch_image "$tmp/coredns" "localhost/coredns:$COREDNS_VERSION" "$tmp/coredns.oci.tar"
  if have_bins; then
    rm -rf "$tmp"
  else
    rm -rf "$bin" && mv "$tmp" "$bin"
  fi
  echo "$bin"
}

# The names and addresses of the run in DIR: everything a run creates on the machine is
# named after a hash of its DIR (netns wo-ID, bridge wobID, veth wohID, cgroup /wo-ID,
# sockets in /run/wo-ID) and uses 10.N.0.0/22 with N picked free at start:
#   10.N.0.0/24 Services (API 10.N.0.1, DNS 10.N.0.10), 10.N.1.0/24 pods (bridge .1),
#   10.N.2.0/30 the link from the machine (.1) to the node's namespace (.2, the node IP).
names() {
  local dir=$1
  id=$(printf %s "$dir" | sha256sum | cut -c1-6)
  netns=wo-$id bridge=wob$id veth=woh$id peer=won$id cgroup=wo-$id run=/run/wo-$id
  sock=$run/containerd.sock
}

pick_octet() {
  local n=$(( 16#${id:0:4} % 200 + 20 )) tries
  for tries in $(seq 1 200); do
    if ! ip route | grep -q "^10\.$n\." && ! ip -o addr | grep -q " 10\.$n\."; then
      echo "$n"; return
    fi
    n=$(( (n - 20 + 1) % 200 + 20 ))
  done
  log "no free 10.N.0.0/22 range"; exit 1
}

in_ns() { nsenter --net="/run/netns/$netns" -- "$@"; }

# Starts a node process in the namespace, its output in DIR/NAME.log, its pid in DIR/NAME.pid
# (nsenter execs the command, so the pid is the command's).
spawn() {
  local name=$1; shift
  nsenter --net="/run/netns/$netns" -- "$@" >"$dir/$name.log" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

kc() { "$cp_bin/kubectl" --kubeconfig "$dir/controlplane/kubeconfig" "$@"; }

start() {
  dir=${1:-$root/.cluster}
  local owner=${2:-}
  build >/dev/null
  cp_bin=$("$root/hack/controlplane.sh" build)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  stop "$dir" 2>/dev/null || true
  names "$dir"
  local n; n=$(pick_octet)
  local node_ip=10.$n.2.2 dns_ip=10.$n.0.10 pods=10.$n.1.0/24 services=10.$n.0.0/24
  rm -rf "$dir"/{kubelet,containerd,cni,pv,controlplane} "$run"
  mkdir -p "$dir"/{kubelet,containerd,cni/net.d,pod-logs,pv} "$run"
  printf 'id=%s\nnetns=%s\noctet=%s\n' "$id" "$netns" "$n" >"$dir/node.env"
  if [[ -n "$owner" ]]; then
    # Watchdog: tests pass their own pid so a killed test run never leaks a node.
    (while kill -0 "$owner" 2>/dev/null; do sleep 1; done; "$root/hack/cluster.sh" stop "$dir") >/dev/null 2>&1 </dev/null &
    disown
  fi

  log "network namespace $netns, node IP $node_ip, pods $pods, Services $services"
  ip netns add "$netns"
  in_ns ip link set lo up
  ip link add "$veth" type veth peer name "$peer" netns "$netns"
  ip addr add "10.$n.2.1/30" dev "$veth"
  ip link set "$veth" up
  in_ns ip addr add "$node_ip/30" dev "$peer"
  in_ns ip link set "$peer" up
  in_ns ip route add default via "10.$n.2.1"
  in_ns ip link add "$bridge" type bridge
  in_ns ip addr add "10.$n.1.1/24" dev "$bridge"
  in_ns ip link set "$bridge" up
  in_ns sysctl -qw net.ipv4.ip_forward=1
  in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
  # The machine reaches the pods and the ClusterIPs through the node's namespace.
  ip route add "10.$n.0.0/23" via "$node_ip"
  local c
  for c in /sys/fs/cgroup/*/; do
    [[ -e "$c/cgroup.procs" ]] && mkdir -p "$c$cgroup"
  done

  CONTROLPLANE_NETNS=$netns CONTROLPLANE_NODE_IP=$node_ip CONTROLPLANE_SERVICE_CIDR=$services \
    CONTROLPLANE_SANS="IP:10.$n.0.1,IP:$node_ip,IP:10.$n.1.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
    "$root/hack/controlplane.sh" start "$dir/controlplane" >/dev/null
  local certs=$dir/controlplane/certs kubeconfig=$dir/controlplane/kubeconfig

  cat >"$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$run/containerd-state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:webhook-operator"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
EOF
  cat >"$dir/cni/net.d/10-$netns.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "$netns", "plugins": [{
  "type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {"type": "host-local", "dataDir": "$dir/cni/ipam",
    "ranges": [[{"subnet": "$pods", "gateway": "10.$n.1.1"}]], "routes": [{"dst": "0.0.0.0/0"}]}
}]}
EOF
  spawn containerd containerd --config "$dir/containerd/config.toml"
  for _ in $(seq 1 100); do [[ -S "$sock" ]] && break; sleep 0.1; done
  [[ -S "$sock" ]] || { tail -20 "$dir/containerd.log" >&2; log "containerd did not start"; exit 1; }
  load_archive "$bin/pause.oci.tar" localhost/pause
  load_archive "$bin/coredns.oci.tar" localhost/coredns

  : >"$dir/resolv.conf"
  cat >"$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$cgroup
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$sock
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
resolvConf: $dir/resolv.conf
podLogsDir: $dir/pod-logs
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
  spawn kubelet "$bin/kubelet" --config "$dir/kubelet/config.yaml" --kubeconfig "$kubeconfig" \
    --root-dir "$dir/kubelet/root" --cert-dir "$dir/kubelet/pki" --hostname-override "$netns" --node-ip "$node_ip" -v 1
  spawn controller-manager "$bin/kube-controller-manager" --kubeconfig "$kubeconfig" --leader-elect=false \
    --secure-port 0 --service-account-private-key-file "$certs/sa.key" --root-ca-file "$certs/ca.crt" \
    --service-cluster-ip-range "$services" --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route' \
    --terminated-pod-gc-threshold 10
  spawn scheduler "$bin/kube-scheduler" --kubeconfig "$kubeconfig" --leader-elect=false --secure-port 0
  spawn kube-proxy "$bin/kube-proxy" --kubeconfig "$kubeconfig" --hostname-override "$netns" \
    --proxy-mode iptables --cluster-cidr "$pods" --masquerade-all --conntrack-max-per-core 0 \
    --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249

  local deadline=$((SECONDS + 120))
  until kc get node "$netns" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True; do
    alive || { log "a node process exited"; exit 1; }
    ((SECONDS < deadline)) || { tail -20 "$dir/kubelet.log" >&2; log "the node did not become Ready"; exit 1; }
    sleep 1
  done
  storage
  coredns "$dns_ip"
  until [[ "$(kc -n kube-system get deploy coredns -o jsonpath='{.status.readyReplicas}' 2>/dev/null)" == 1 ]]; do
    alive || { log "a node process exited"; exit 1; }
    ((SECONDS < deadline)) || { kc -n kube-system describe pods >&2; log "CoreDNS did not become ready"; exit 1; }
    sleep 1
  done
  log "node $netns Ready, CoreDNS at $dns_ip"
  echo "export KUBECONFIG=$kubeconfig PATH=$cp_bin:\$PATH"
}

alive() {
  local p
  for p in containerd kubelet controller-manager scheduler kube-proxy; do
    kill -0 "$(cat "$dir/$p.pid")" 2>/dev/null || { tail -20 "$dir/$p.log" >&2; return 1; }
  done
}

load_archive() { # archive base-name
  in_ns ctr --address "$sock" -n k8s.io images import --snapshotter native --base-name "$2" "$1" >/dev/null
}

# A default StorageClass without a provisioner, and hostPath PersistentVolumes under
# DIR/pv for the claims (owned by the chart's non-root user, 65532).
storage() {
  local i
  {
    cat <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
    for i in 1 2 3 4; do
      mkdir -p "$dir/pv/$i" && chown 65532:65532 "$dir/pv/$i"
      cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: local-$i}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local
  hostPath: {path: "$dir/pv/$i", type: Directory}
EOF
    done
  } | kc apply -f - >/dev/null
}

coredns() { # cluster DNS IP
  kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 5
        loop
        reload
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      containers:
      - name: coredns
        image: localhost/coredns:$COREDNS_VERSION
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: dns-tcp, containerPort: 53, protocol: TCP}
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 2
        livenessProbe:
          httpGet: {path: /health, port: 8080}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $1
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

load() { # DIR ARCHIVE [BASE_NAME]
  dir=$(cd "$1" && pwd)
  names "$dir"
  load_archive "$2" "${3:-localhost/}"
}

# Stops the run in DIR: the node's processes by pid, the containers by the run's cgroup,
# the shims by the run's socket, then the control plane; unmounts what is mounted under
# DIR and /run/wo-ID and the pods' network namespaces; removes the cgroups, the network
# namespace (with the bridge and the pods' veths) and the link.
stop() {
  # Best effort: every step runs even if one before it failed.
  set +e
  dir=${1:-$root/.cluster}
  [[ -d "$dir" ]] || return 0
  dir=$(cd "$dir" && pwd)
  names "$dir"
  local podns=() p pid
  if [[ -S "$sock" ]]; then
    mapfile -t podns < <(for c in $(ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null); do
      ctr --address "$sock" -n k8s.io containers info "$c" 2>/dev/null |
        python3 -c 'import json,sys; [print(n["path"]) for n in json.load(sys.stdin).get("Spec",{}).get("linux",{}).get("namespaces",[]) if n.get("type")=="network" and n.get("path")]' 2>/dev/null
    done | sort -u)
  fi
  stop_pid kubelet
  # Every process of the run's containers, by the run's cgroup.
  for _ in 1 2 3 4 5; do
    local pids
    pids=$(find /sys/fs/cgroup/pids/"$cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null)
    [[ -z "$pids" ]] && break
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  # The containerd shims of this run, by the socket they were started with.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q "containerd-shim.* -address $sock "; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  for p in controller-manager scheduler kube-proxy containerd; do stop_pid "$p"; done
  # The control plane's processes, by the pids its start wrote: asked to exit, and killed
  # if they still run after 15 s.
  local cp_pids
  cp_pids=$(cat "$dir/controlplane/apiserver.pid" "$dir/controlplane/etcd.pid" 2>/dev/null || true)
  "$root/hack/controlplane.sh" stop "$dir/controlplane" 2>/dev/null || true
  for pid in $cp_pids; do
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Mounts under DIR, the run dir and the pods' namespaces, deepest first.
  local m
  for m in $( (awk '{print $2}' /proc/mounts | grep -E "^($dir|$run)/" ; printf '%s\n' "${podns[@]}") | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  for m in "${podns[@]}"; do rm -f "$m"; done
  local c
  for c in /sys/fs/cgroup/*/"$cgroup"; do
    [[ -d "$c" ]] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  ip netns del "$netns" 2>/dev/null || true
  ip link del "$veth" 2>/dev/null || true
  rm -rf "$run"
  # The logs stay in DIR; the images, volumes and etcd's data go (unless a mount is left).
  if ! awk '{print $2}' /proc/mounts | grep -q "^$dir/"; then
    rm -rf "$dir/containerd/root" "$dir/pv" "$dir/kubelet/root" "$dir/controlplane/etcd-data"
  fi
}

stop_pid() {
  local f=$dir/$1.pid pid i
  [[ -f "$f" ]] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

case "${1:-}" in
  build) build ;;
  start) start "${2:-}" "${3:-}" ;;
  load) load "$2" "$3" "${4:-}" ;;
  interim-image) interim_image "$2" "$3" "$4" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 build|start [DIR] [OWNER_PID]|load DIR ARCHIVE|stop [DIR]" >&2; exit 2 ;;
esac
