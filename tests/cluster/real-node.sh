# shellcheck shell=bash
# The real node of tests/cluster/cluster.sh (sourced by it): one node run by a real kubelet on a
# real containerd and runc, next to the kwok nodes, so the project's images run as real pods.
#
# Enabled with KLM_REAL_NODE=<node name>; needs root, Debian's containerd, runc and
# containernetworking-plugins (`make deps` installs them), the kubelet of tests/tools/install.sh
# and the images of `make images` (KLM_IMAGES_DIR, default target/images; at least
# test-pause.tar, the sandbox image — nothing can be pulled here).
#
# Everything the node creates lives under <cluster dir>/node or is named after the cluster:
#   containerd  root, state, socket, runc state  <dir>/node/containerd, <dir>/node/containerd.sock
#   kubelet     root dir, pod logs, config        <dir>/node/kubelet, <dir>/node/pod-logs
#   cgroups     /sys/fs/cgroup/<controller>/klm-<id>/{containerd,kubepods}  (cgroupfs driver)
#   network     bridge klm<id> with the gateway address; pods in <subnet> (CNI bridge, no NAT),
#               so pods reach the API server at the gateway (it then listens on all addresses)
# and real_node_teardown (the supervisor's cleanup) kills every process in those cgroups,
# unmounts what containerd and kubelet mounted (rootfs overlays, volumes, pod network
# namespaces), removes the cgroups and the bridge. The kubelet runs as system:node:<name>
# (group system:nodes), so the Node authorizer and NodeRestriction apply to it as in production.

RN_ENV="" # <dir>/real-node.env: what teardown needs, written before anything is created
# Host paths a kubelet or containerd uses whatever it is told (device-plugins socket, CNI result
# cache, shim sockets, /var/log/containers links) or a pod's hostPath makes (kata-deploy's chart
# mounts /etc/crio): removed at teardown if this node created them and no other real node runs.
RN_FIXED_HOST_DIRS="/var/lib/kubelet /var/lib/cni /run/containerd /var/log/containers /etc/crio"

real_node_enabled() { [[ -n "${KLM_REAL_NODE:-}" ]]; }

# Checks the prerequisites and picks the node's names and addresses (before the PKI, which
# puts the gateway address into the API server's certificate).
real_node_init() {
  local tools="$1"
  [[ $(id -u) == 0 ]] || die "KLM_REAL_NODE needs root (containerd, runc, cgroups, mounts)"
  local c
  for c in containerd containerd-shim-runc-v2 runc ctr ip mount umount; do
    command -v "$c" >/dev/null || die "KLM_REAL_NODE: '$c' is missing (Debian: apt-get install containerd runc iproute2; or make deps)"
  done
  RN_CNI_BIN="${KLM_CNI_BIN_DIR:-/usr/lib/cni}"
  [[ -x "$RN_CNI_BIN/bridge" && -x "$RN_CNI_BIN/host-local" && -x "$RN_CNI_BIN/loopback" ]] ||
    die "KLM_REAL_NODE: CNI plugins missing in $RN_CNI_BIN (Debian: apt-get install containernetworking-plugins)"
  [[ -x "$tools/kubelet" ]] || die "KLM_REAL_NODE: $tools has no kubelet (tests/tools/install.sh builds it)"
  RN_IMAGES="${KLM_IMAGES_DIR:-$ROOT/target/images}"
  [[ -f "$RN_IMAGES/test-pause.tar" ]] || die "KLM_REAL_NODE: no $RN_IMAGES/test-pause.tar (run: make images)"

  # Unique per cluster: two clusters with real nodes on one machine (parallel test runs) share
  # no bridge, subnet, cgroup or port.
  local id; id="$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
  RN_ID="$id"
  RN_BRIDGE="klm$id"
  RN_CGROUP="klm-$id"
  # 10.200.0.0/13 split into /24s; a subnet already routed here is skipped.
  local try
  for try in {1..20}; do
    local n=$((0x$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n') % 2048))
    RN_SUBNET="10.$((200 + n / 256)).$((n % 256)).0/24"
    RN_GATEWAY="10.$((200 + n / 256)).$((n % 256)).1"
    [[ -z "$(ip -4 route show to match "$RN_GATEWAY" | grep -v '^default')" ]] && break
    ((try < 20)) || die "KLM_REAL_NODE: found no free /24 in 10.200.0.0/13"
  done
  RN_DIR="$DIR/node"
  RN_ENV="$DIR/real-node.env"
  cat >"$RN_ENV" <<EOF
RN_NAME=$KLM_REAL_NODE
RN_DIR=$RN_DIR
RN_BRIDGE=$RN_BRIDGE
RN_CGROUP=$RN_CGROUP
RN_SUBNET=$RN_SUBNET
RN_GATEWAY=$RN_GATEWAY
RN_HOST_DIRS="$(for d in $RN_FIXED_HOST_DIRS; do [[ -e "$d" ]] || printf '%s ' "$d"; done)"
EOF
  log "real node $KLM_REAL_NODE: bridge $RN_BRIDGE, pods in $RN_SUBNET, cgroups /$RN_CGROUP"
}

# Certificates: the kubelet's client (a node identity) and the API server's client to kubelets
# (logs, exec).
real_node_pki() {
  local client=$'keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth'
  cert kubelet "/O=system:nodes/CN=system:node:$KLM_REAL_NODE" "$client"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  cert kubelet-serving "/CN=system:node:$KLM_REAL_NODE" \
    $'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:'"$RN_GATEWAY"',IP:127.0.0.1,DNS:localhost'
}

# The cgroup mount points (v1 controllers and a v2 hierarchy alike).
cgroup_mounts() {
  awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup" || $(i + 1) == "cgroup2") print $5; break } }' /proc/self/mountinfo
}

real_node_cgroups() {
  local m
  for m in $(cgroup_mounts); do
    mkdir -p "$m/$RN_CGROUP/containerd"
    # A v1 cpuset cgroup takes no task until it has cpus and mems.
    if [[ -f "$m/cpuset.cpus" ]]; then
      local d
      for d in "$m/$RN_CGROUP" "$m/$RN_CGROUP/containerd"; do
        cat "$m/cpuset.cpus" >"$d/cpuset.cpus"
        cat "$m/cpuset.mems" >"$d/cpuset.mems"
      done
    fi
  done
}

real_node_network() {
  # The bridge is ours, with the gateway address, so no CNI plugin has to turn this host into a
  # router (isGateway would switch on ip_forward): pods only talk to this host.
  ip link add "$RN_BRIDGE" type bridge
  ip addr add "${RN_GATEWAY}/24" dev "$RN_BRIDGE"
  ip link set "$RN_BRIDGE" up
  mkdir -p "$RN_DIR/cni/conf" "$RN_DIR/cni/ipam"
  cat >"$RN_DIR/cni/conf/10-klm.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "klm-$RN_ID",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$RN_BRIDGE",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$RN_DIR/cni/ipam",
        "ranges": [[{"subnet": "$RN_SUBNET", "gateway": "$RN_GATEWAY"}]],
        "routes": [{"dst": "0.0.0.0/0", "gw": "$RN_GATEWAY"}]
      }
    }
  ]
}
EOF
}

real_node_containerd() {
  local c="$RN_DIR/containerd"
  mkdir -p "$c/root" "$c/state" "$c/runc" "$c/opt"
  cat >"$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
# Plugins that would reach outside this directory or need other filesystems.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$RN_DIR/containerd.sock"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # Built here (tests/images/pause.c) and imported below: nothing can be pulled.
  sandbox_image = "klm.test/pause:1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # This machine may not let even root lower an oom_score_adj (runc's "failed to update
  # /proc/self/oom_score_adj: Permission denied" for the kubelet's -998 on sandboxes): keep
  # every container's at or above containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$c/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$RN_CNI_BIN"
    conf_dir = "$RN_DIR/cni/conf"
    max_conf_num = 1
EOF
  # containerd and its shims (which outlive containerd) in the node's own cgroup, so teardown
  # finds every one of them; pods go to <cgroup>/kubepods.
  local procs=()
  local m
  for m in $(cgroup_mounts); do procs+=("$m/$RN_CGROUP/containerd/cgroup.procs"); done
  start containerd bash -c 'for f in "${@:2}"; do echo $$ >"$f"; done; exec containerd --config "$1"' \
    containerd "$c/config.toml" "${procs[@]}"
  wait_for containerd ctr --address "$RN_DIR/containerd.sock" version
  local img
  for img in "$RN_IMAGES"/*.tar; do
    ctr --address "$RN_DIR/containerd.sock" -n k8s.io images import "$img" >/dev/null ||
      die "could not import $img into the real node's containerd"
  done
  log "containerd: imported $(ls "$RN_IMAGES"/*.tar | wc -l) image archives from $RN_IMAGES"
}

real_node_kubelet() {
  local tools="$1" k="$RN_DIR/kubelet"
  mkdir -p "$k" "$RN_DIR/pod-logs"
  write_kubeconfig "$RN_DIR/kubelet.kubeconfig" "system:node:$KLM_REAL_NODE" kubelet
  local port healthz
  read -r port healthz < <(free_ports 2)
  cat >"$RN_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine mounts cgroup v1; current kubelets refuse it unless told.
failCgroupV1: false
# containerd 1.6 cannot report its cgroup driver (RuntimeConfig), so the kubelet's is used:
# cgroupfs, as containerd's runc (SystemdCgroup = false); there is no systemd here.
cgroupDriver: cgroupfs
cgroupRoot: /$RN_CGROUP
containerRuntimeEndpoint: unix://$RN_DIR/containerd.sock
# The node's address is the bridge's: a kubelet refuses a loopback node IP, and the API
# server dials it there for logs.
address: $RN_GATEWAY
port: $port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
tlsCertFile: $DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving.key
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: $DIR/pki/ca.crt
# Only certificates of the cluster CA authenticate (the API server's kubelet client).
authorization:
  mode: AlwaysAllow
podLogsDir: $RN_DIR/pod-logs
failSwapOn: false
# A test machine's disk may be nearly full; evicting the product's pods would only hide bugs.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
# The imported images can never be pulled again: never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
registerNode: true
EOF
  start kubelet "$tools/kubelet" --config="$RN_DIR/kubelet.yaml" \
    --kubeconfig="$RN_DIR/kubelet.kubeconfig" --root-dir="$k" \
    --hostname-override="$KLM_REAL_NODE" --node-ip="$RN_GATEWAY" \
    --node-labels="klm.test/real-node=true"
  wait_for "real node $KLM_REAL_NODE" node_ready "$KLM_REAL_NODE"
}

real_node_start() {
  local tools="$1"
  real_node_cgroups
  real_node_network
  real_node_containerd
  real_node_kubelet "$tools"
}

# Tears the node down, whatever state it is in (also for `cluster.sh down` after a supervisor
# that was SIGKILLed): kubelet first (it would restart containers), then every process in the
# node's cgroups (containerd, shims, containers), then mounts, cgroups and the bridge.
real_node_teardown() {
  local env_file="${1:-$DIR/real-node.env}"
  [[ -f "$env_file" ]] || return 0
  # shellcheck disable=SC1090
  source "$env_file"
  local pid name
  for pid in "${!NAMES[@]}"; do
    name="${NAMES[$pid]}"
    if [[ "$name" == kubelet ]]; then kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  done
  python3 - "$RN_CGROUP" "$RN_DIR" <<'EOF' || true
import os, signal, subprocess, sys, time
cg, node_dir = sys.argv[1], os.path.realpath(sys.argv[2])

def mounts():
    with open("/proc/self/mountinfo") as f:
        return [l.split() for l in f]

roots = [m[4] + "/" + cg for m in mounts() if m[m.index("-") + 1] in ("cgroup", "cgroup2")]
roots = [r for r in roots if os.path.isdir(r)]

def pids():
    found = set()
    for r in roots:
        for d, _, files in os.walk(r):
            if "cgroup.procs" in files:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    found.update(int(p) for p in f.read().split())
    return found

# The pods' network namespaces are bind-mounted outside the node directory (/run/netns/cni-*):
# ours are those some process of the node is in.
netns = set()
for p in pids():
    try:
        netns.add(os.readlink(f"/proc/{p}/ns/net"))
    except OSError:
        pass
host_netns = os.readlink("/proc/self/ns/net")
netns.discard(host_netns)

# Freeze-free kill loop: shims may fork while we kill; repeat until the cgroups are empty.
deadline = time.time() + 20
while (left := pids()) and time.time() < deadline:
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.05)
if pids():
    print(f"real node teardown: processes left in /{cg}: {sorted(pids())}", file=sys.stderr)

# Unmount (deepest first) what lies under the node directory and our network namespaces.
targets = []
for m in mounts():
    point = m[4].replace("\\040", " ")
    root = m[3]
    fstype = m[m.index("-") + 1]
    if point == node_dir or point.startswith(node_dir + "/"):
        targets.append(point)
    elif fstype == "nsfs" and root in netns:
        targets.append(point)
for point in sorted(set(targets), key=len, reverse=True):
    if subprocess.run(["umount", point], stderr=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)
    if point.startswith("/run/netns/") or point.startswith("/var/run/netns/"):
        try:
            os.unlink(point)
        except OSError:
            pass

for r in roots:
    for d, _, _ in sorted(os.walk(r), key=lambda w: len(w[0]), reverse=True):
        try:
            os.rmdir(d)
        except OSError as e:
            print(f"real node teardown: cannot remove cgroup {d}: {e}", file=sys.stderr)
EOF
  ip link del "$RN_BRIDGE" 2>/dev/null || true
  # The kubelet's links to this node's container logs.
  local d l
  for l in /var/log/containers/*.log; do
    if [[ "$(readlink "$l" 2>/dev/null)" == "$RN_DIR"/* ]]; then rm -f "$l"; fi
  done
  # Fixed host paths this node created (RN_FIXED_HOST_DIRS), unless another real node (its
  # cgroup) still runs and may use them.
  if ! compgen -G "/sys/fs/cgroup/pids/klm-*" >/dev/null && ! compgen -G "/sys/fs/cgroup/memory/klm-*" >/dev/null; then
    for d in ${RN_HOST_DIRS:-}; do rm -rf "$d"; done
  fi
  rm -f "$env_file"
}
