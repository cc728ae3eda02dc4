#!/usr/bin/env bash
# A single-node Kubernetes on this machine that runs real pods, from the installer's binaries
# (tests/e2e/tools/install.sh kubernetes kubelab): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet with containerd and runc, the CNI bridge plugin, kube-proxy (iptables)
# and CoreDNS (a process on the node, answering for cluster.local). No systemd, no Docker engine.
#
#   tests/e2e/lab/kube.sh up [IMAGES_DIR]   start it all; import the OCI archives of IMAGES_DIR
#                                           (tests/e2e/lab/images.sh makes them), anthill and
#                                           anthill-operator under each tag of LAB_IMAGE_TAGS
#                                           (default "0.1.0 0.1.1": an upgrade to roll out);
#                                           print the kubeconfig's path
#   tests/e2e/lab/kube.sh down              stop it all and remove what it made
#   tests/e2e/lab/kube.sh env               `export KUBECONFIG=...` for a shell
#
# Everything lives in ANTHILL_KUBELAB (default /tmp/anthill-kubelab): configs, logs, pids, data.
# The node's address is 10.88.0.1 on a bridge the lab makes (`anthill0`, pods in 10.88.0.0/16);
# Services are in 10.96.0.0/16; nothing listens on or sends to another address. Volumes: twelve
# hostPath PersistentVolumes of storage class `lab` under the lab's folder.
# Traps on the way (../shared/notes/real-components.md): containerd needs restrict_oom_score_adj
# (no CAP_SYS_RESOURCE here); the kubelet runs with cgroupfs and without QoS cgroups on cgroup v1;
# pods reaching a Service whose endpoint is on the same bridge need kube-proxy's masquerade-all
# (no br_netfilter); pods go before containerd stops, or their mounts and namespaces stay.
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
bin="$repo/.tools/bin"
lab="${ANTHILL_KUBELAB:-/tmp/anthill-kubelab}"
NODE_IP=10.88.0.1
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
BRIDGE=anthill0
NODE_NAME=anthill-lab
API_PORT=6443
say() { echo "tests/e2e/lab/kube.sh: $*" >&2; }

# Starts `$1` (a name for its pid and log files) as `$2...` in the background.
start() {
    local name="$1"
    shift
    setsid "$@" >"$lab/logs/$name.log" 2>&1 </dev/null &
    echo $! >"$lab/pids/$name"
}

running() { [[ -f "$lab/pids/$1" ]] && kill -0 "$(cat "$lab/pids/$1")" 2>/dev/null; }

stop() {
    local name="$1" pid
    [[ -f "$lab/pids/$name" ]] || return 0
    pid="$(cat "$lab/pids/$name")"
    # Only a process the lab started (a stale or foreign pid file must not kill anything else).
    if ! [[ "$pid" =~ ^[0-9]+$ ]] || ((pid <= 1)) || ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$name"; then
        rm -f "$lab/pids/$name"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$lab/pids/$name"
}

# Waits up to `$1` seconds for `$2...` to succeed; fails with `$name`'s log otherwise.
wait_for() {
    local seconds="$1" what="$2"
    shift 2
    for _ in $(seq $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    say "$what did not come up in $seconds s; the end of its log:"
    tail -n 30 "$lab/logs/$what.log" >&2 || true
    return 1
}

kubectl() { "$bin/kubectl" --kubeconfig "$lab/kubeconfig" "$@"; }

certificates() {
    local pki="$lab/pki"
    mkdir -p "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=anthill-lab-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:%s,IP:%s,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' \
        "$NODE_IP" "$API_SERVICE_IP" >"$pki/apiserver.ext"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
        -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    local token
    token="anthill-lab-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
    printf '%s,admin,admin,"system:masters"\n' "$token" >"$pki/tokens.csv"
    cat >"$lab/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: lab
  context: {cluster: lab, user: admin}
current-context: lab
EOF
}

network() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$NODE_IP/16" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    sysctl -qw net.ipv4.ip_forward=1
    mkdir -p "$lab/cni/net.d"
    cat >"$lab/cni/net.d/10-anthill.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "anthill-lab",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "isDefaultGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP", "rangeStart": "10.88.1.2"}]],
              "dataDir": "$lab/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
}

control_plane() {
    local pki="$lab/pki"
    start etcd "$(command -v etcd)" --name lab --data-dir "$lab/etcd" \
        --listen-client-urls http://127.0.0.1:2479 --advertise-client-urls http://127.0.0.1:2479 \
        --listen-peer-urls http://127.0.0.1:2480 --initial-advertise-peer-urls http://127.0.0.1:2480 \
        --initial-cluster lab=http://127.0.0.1:2480
    start kube-apiserver "$bin/kube-apiserver" --etcd-servers http://127.0.0.1:2479 \
        --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$API_PORT" \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" --client-ca-file "$pki/ca.crt" \
        --token-auth-file "$pki/tokens.csv" --authorization-mode Node,RBAC \
        --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
        --kubelet-preferred-address-types InternalIP
    wait_for 90 kube-apiserver kubectl get --raw /readyz
    start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$lab/kubeconfig" \
        --controllers '*,-nodeipam' --leader-elect=false --use-service-account-credentials=false --bind-address 127.0.0.1 \
        --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
        --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key"
    start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$lab/kubeconfig" --leader-elect=false --bind-address 127.0.0.1
}

containerd_up() {
    cat >"$lab/containerd.toml" <<EOF
version = 2
root = "$lab/containerd/root"
state = "$lab/containerd/state"
[grpc]
  address = "$lab/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "anthill.local/pause:1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$lab/cni/net.d"
EOF
    start containerd "$(command -v containerd)" --config "$lab/containerd.toml"
    wait_for 30 containerd ctr --address "$lab/containerd.sock" version
}

import_images() {
    local dir="$1" file name ref
    for file in "$dir"/*.tar; do
        name="$(basename "$file" .tar)"
        case "$name" in
            pause) ref="anthill.local/pause:1" ;;
            *) ref="docker.io/library/$name" ;;
        esac
        if [[ "$name" == pause ]]; then
            ctr --address "$lab/containerd.sock" -n k8s.io images import --index-name "$ref" "$file" >/dev/null
            say "imported $ref"
            continue
        fi
        # Each of the lab's tags (the same build): an upgrade from the first to the second can
        # be rolled out.
        local tag
        for tag in ${LAB_IMAGE_TAGS:-0.1.0 0.1.1}; do
            ctr --address "$lab/containerd.sock" -n k8s.io images import --index-name "$ref:$tag" "$file" >/dev/null
            say "imported $ref:$tag"
        done
    done
}

node_up() {
    cat >"$lab/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$lab/containerd.sock
address: $NODE_IP
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: /etc/resolv.conf
podLogsDir: $lab/pod-logs
serializeImagePulls: false
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
    start kubelet "$bin/kubelet" --config "$lab/kubelet.yaml" --kubeconfig "$lab/kubeconfig" \
        --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --root-dir "$lab/kubelet"
    wait_for 120 kubelet kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
    start kube-proxy "$bin/kube-proxy" --kubeconfig "$lab/kubeconfig" --hostname-override "$NODE_NAME" \
        --proxy-mode iptables --cluster-cidr "$POD_CIDR" --masquerade-all --conntrack-max-per-core 0 \
        --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 --nodeport-addresses "$NODE_IP/32"
    cat >"$lab/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $lab/kubeconfig lab
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    errors
}
EOF
    start coredns "$bin/coredns" -conf "$lab/Corefile"
}

volumes() {
    local i
    for i in $(seq 0 11); do
        mkdir -p "$lab/volumes/pv-$i"
        chmod 0777 "$lab/volumes/pv-$i"
        kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: lab-pv-$i}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Delete
  storageClassName: lab
  hostPath: {path: $lab/volumes/pv-$i, type: Directory}
EOF
    done
    kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: lab}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
EOF
}

# Three Consul servers beside the Kubernetes, for clusters that decide ownership in Consul:
# server i on 127.0.0.5i (Raft and Serf), its HTTP API on that address and on the lab's
# bridge address, port 850i, where the pods reach it; ACLs on with a default deny, the
# management token in `$lab/consul/management-token` (root only).
consul_up() {
    local dir="$lab/consul" i token
    mkdir -p "$dir"
    (umask 077 && cat /proc/sys/kernel/random/uuid >"$dir/management-token")
    token="$(cat "$dir/management-token")"
    for i in 1 2 3; do
        local others
        others="$(for j in 1 2 3; do [[ $j == "$i" ]] || printf '"127.0.0.5%s:8301"\n' "$j"; done | paste -sd, -)"
        (umask 077 && cat >"$dir/consul-$i.json" <<EOF
{
  "node_name": "consul-$i", "datacenter": "dc1", "server": true, "bootstrap_expect": 3,
  "data_dir": "$dir/consul-$i", "bind_addr": "127.0.0.5$i", "advertise_addr": "127.0.0.5$i",
  "client_addr": "127.0.0.5$i $NODE_IP",
  "ports": { "http": 850$i, "serf_lan": 8301, "server": 8300, "dns": -1, "serf_wan": -1, "grpc": -1, "grpc_tls": -1 },
  "retry_join": [$others], "retry_interval": "1s",
  "acl": { "enabled": true, "default_policy": "deny", "enable_token_persistence": true,
           "tokens": { "initial_management": "$token", "agent": "$token" } },
  "disable_update_check": true, "log_level": "info", "performance": { "raft_multiplier": 1 }, "ui_config": { "enabled": false }
}
EOF
        )
        start "consul-$i" "$bin/consul" agent "-config-file=$dir/consul-$i.json"
    done
    # Up once the leader made the management token and ACLs answer.
    wait_for 90 consul-1 env CONSUL_HTTP_ADDR="http://127.0.0.51:8501" CONSUL_HTTP_TOKEN_FILE="$dir/management-token" \
        "$bin/consul" acl policy list
}

up() {
    local images="${1:-}"
    [[ $EUID -eq 0 ]] || { say "the lab needs root (network, containers)"; exit 1; }
    bash "$repo/tests/e2e/tools/install.sh" kubernetes kubelab consul
    if [[ -d "$lab/pids" ]] && ls "$lab/pids" | grep -q .; then
        say "a lab is running already ($lab); tests/e2e/lab/kube.sh down first"
        exit 1
    fi
    if [[ -L "$lab" ]] || { [[ -e "$lab" ]] && [[ ! -O "$lab" ]]; }; then
        say "$lab is a link or belongs to someone else; set ANTHILL_KUBELAB to a folder of your own"
        exit 1
    fi
    rm -rf "$lab"
    mkdir -p "$lab/logs" "$lab/pids"
    chmod 700 "$lab"
    cat /proc/sys/net/ipv4/ip_forward >"$lab/ip_forward.before"
    # The network namespaces there before the lab: any cni-* one made since is the lab's.
    { ip netns list | awk '{print $1}' || true; } >"$lab/netns.before"
    # A step that fails leaves nothing running.
    trap 'say "up failed; tearing down"; down' ERR
    # The admin token and the keys are for root alone (not a umask for everything: containerd
    # would make the images' folders unreadable to the pods' users).
    (umask 077 && certificates)
    network
    control_plane
    containerd_up
    [[ -n "$images" ]] && import_images "$images"
    node_up
    volumes
    consul_up
    trap - ERR
    say "up: KUBECONFIG=$lab/kubeconfig"
    echo "$lab/kubeconfig"
}

down() {
    [[ -d "$lab" ]] || return 0
    # Nothing makes or places new pods from here on.
    stop kube-controller-manager
    stop kube-scheduler
    # Pods first, while the kubelet and containerd still run: their sandboxes, mounts and
    # network namespaces go with them.
    if running kube-apiserver && running kubelet; then
        kubectl delete pods --all --all-namespaces --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
        for _ in $(seq 60); do
            [[ -z "$(kubectl get pods -A -o name 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    stop kubelet
    if running containerd; then
        local task
        for task in $(ctr --address "$lab/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr --address "$lab/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
        done
        sleep 1
    fi
    stop containerd
    stop kube-proxy
    [[ -x "$bin/kube-proxy" ]] && "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
    for name in coredns kube-apiserver etcd consul-1 consul-2 consul-3; do stop "$name"; done
    # What a killed shim left: its processes, mounts under the lab, network namespaces.
    pkill -KILL -f "containerd-shim.*$lab" 2>/dev/null || true
    { grep " $lab" /proc/mounts || true; } | awk '{print $2}' | sort -r | while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
    # The chains the kubelet made (kube-proxy's went with --cleanup).
    local tool table rule chain
    for tool in iptables ip6tables; do
        command -v "$tool" >/dev/null || continue
        for table in filter nat mangle; do
            { "$tool" -t "$table" -S 2>/dev/null | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' || true; } | while read -r rule; do
                eval "$tool -t $table ${rule/-A/-D}" 2>/dev/null || true
            done
            for chain in $("$tool" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
                "$tool" -t "$table" -F "$chain" 2>/dev/null || true
            done
            for chain in $("$tool" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
                "$tool" -t "$table" -X "$chain" 2>/dev/null || true
            done
        done
    done
    # Network namespaces CNI made for the lab's pods that no sandbox deleted: those with an
    # address in the lab's pod network, and any cni-* one made since `up` (CNI may have taken
    # its interface away already, leaving only lo).
    local ns
    for ns in $(ip netns list | awk '/^cni-/ {print $1}'); do
        if ip netns exec "$ns" ip -4 -o addr show 2>/dev/null | grep -q " ${POD_CIDR%.*.*}\."; then
            ip netns delete "$ns" 2>/dev/null || true
        elif [[ -f "$lab/netns.before" ]] && ! grep -qx "$ns" "$lab/netns.before"; then
            ip netns delete "$ns" 2>/dev/null || true
        fi
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    [[ -f "$lab/ip_forward.before" ]] && sysctl -qw "net.ipv4.ip_forward=$(cat "$lab/ip_forward.before")" || true
    rm -rf "$lab"
    say "down"
}

case "${1:-}" in
    up) up "${2:-}" ;;
    down) down ;;
    env)
        echo "export KUBECONFIG=$lab/kubeconfig"
        # Consul as the host reaches it; the pods use port 8501 (8502, 8503) of the bridge address.
        echo "export CONSUL_HTTP_ADDR=http://127.0.0.51:8501 CONSUL_HTTP_TOKEN_FILE=$lab/consul/management-token"
        ;;
    *) say "usage: tests/e2e/lab/kube.sh up [IMAGES_DIR] | down | env"; exit 2 ;;
esac
