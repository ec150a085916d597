#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the end-to-end tests and the demo:
# etcd, kube-apiserver (client-cert auth, Node+RBAC authorization), kube-controller-manager,
# kube-scheduler, kwok (simulated nodes and pods, stages from kwok-stages.yaml) and a loopback
# Helm chart repository serving the fixture kata-deploy charts.
#
#   cluster.sh up      start in the background, wait until ready, print the environment
#   cluster.sh down    stop everything and remove the cluster directory
#   cluster.sh env     print `export ...` lines for a running cluster (eval "$(cluster.sh env)")
#   cluster.sh status  show the components, their ports and the control plane's memory (RSS)
#   cluster.sh run     the supervisor, in the foreground (what `up` starts; the Rust testkit runs
#                      it as a child): prints "READY <dir>" on stdout once usable, tears everything
#                      down and removes the directory when it gets SIGTERM/SIGINT/SIGHUP or when any
#                      component dies (except a kube-apiserver stopped on request, below).
#   cluster.sh stop-apiserver   an API outage: SIGKILL kube-apiserver, keep etcd and the rest running
#   cluster.sh start-apiserver  end it: the same kube-apiserver command line (same port, certificates
#                      and etcd, so every object is still there); returns once /readyz answers
#
# Environment:
#   KLM_CLUSTER_DIR  cluster directory (default /tmp/klm-cluster): kubeconfig, cluster.env, pki, logs
#   KLM_NODES        simulated nodes created at start (default 3; the testkit uses 0 and makes its own)
#   KLM_NODE_PREFIX  their names: <prefix>-1..N (default "worker")
#   KLM_TOOLS_DIR    use these binaries instead of building the pinned ones (tests/tools/install.sh)
#   KLM_START_TIMEOUT seconds to wait for readiness (default 180)
#   KLM_REAL_NODE    also start a real node of this name: kubelet + containerd + runc, as root
#                    (tests/cluster/real-node.sh); pods reach the API server at KLM_REAL_NODE_APISERVER
#   KLM_IMAGES_DIR   image archives the real node imports (default target/images, `make images`)
#
# Teardown guarantees: every component runs under `setpriv --pdeathsig KILL`, so it dies with the
# supervisor whatever kills the supervisor; the supervisor's traps kill them at once (the cluster
# is disposable) and remove the directory. `up` detaches the supervisor into its own session (it
# outlives the shell); the testkit instead starts `run` with PR_SET_PDEATHSIG=SIGTERM, so it dies
# with the test process.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=tests/cluster/real-node.sh
source "$HERE/real-node.sh"
DIR="${KLM_CLUSTER_DIR:-/tmp/klm-cluster}"
MARKER=".klm-cluster" # only directories carrying it are ever removed

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Alive and not a zombie (an orphan lingers as one until init reaps it).
alive() {
  local state
  state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [[ -n "$state" && "$state" != Z ]]
}

supervisor_pid() {
  local pid
  pid="$(cat "$DIR/supervisor.pid" 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && alive "$pid" && echo "$pid"
}

print_env() {
  [[ -f "$DIR/cluster.env" ]] || die "no cluster at $DIR (run: $0 up)"
  # shellcheck disable=SC1091
  source "$DIR/cluster.env"
  cat <<EOF
export KLM_CLUSTER_DIR='$KLM_CLUSTER_DIR'
export KLM_KUBECONFIG='$KLM_KUBECONFIG'
export KUBECONFIG='$KLM_KUBECONFIG'
export KLM_CHART_REPO='$KLM_CHART_REPO'
export KLM_TOOLS_DIR='$KLM_TOOLS_DIR'
export PATH='$KLM_TOOLS_DIR':"\$PATH"
EOF
}

# ---------------------------------------------------------------------------------------------
# supervisor
# ---------------------------------------------------------------------------------------------
declare -A NAMES=() # pid -> component
TOOLS_PID=""
APISERVER_CMD=() # kube-apiserver's command line, kept to restart it identically
APISERVER_PID="" # empty while stopped on request
REQUEST=""       # set by the SIGUSR1/SIGUSR2 traps: stop-apiserver / start-apiserver

cleanup() {
  local rc=$?
  # Ignore repeats: the testkit's parent-death signal can arrive once per exiting thread of
  # the test process, and a second SIGTERM must not cut this cleanup short.
  trap '' INT TERM HUP
  trap - EXIT
  if [[ -n "$TOOLS_PID" ]]; then kill -TERM -- "-$TOOLS_PID" 2>/dev/null || true; fi
  # Containers outlive the processes below (their shims are not their children): first.
  real_node_teardown
  local pids=("${!NAMES[@]}")
  if ((${#pids[@]})); then
    # The cluster is disposable (its data is deleted next), so no graceful shutdown: an
    # apiserver draining watches would only make every teardown take seconds.
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  if [[ -f "$DIR/$MARKER" && "${KLM_KEEP_CLUSTER_DIR:-}" != 1 ]]; then rm -rf "$DIR"; fi
  exit "$rc"
}

# Runs a component in the background; it gets SIGKILL if the supervisor dies.
start() {
  local name="$1"; shift
  setpriv --pdeathsig KILL -- "$@" >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  NAMES[$!]="$name"
}

check_alive() {
  local pid
  for pid in "${!NAMES[@]}"; do
    if ! alive "$pid"; then
      log "${NAMES[$pid]} exited during start-up; last lines of $DIR/logs/${NAMES[$pid]}.log:"
      tail -n 30 "$DIR/logs/${NAMES[$pid]}.log" >&2 || true
      exit 1
    fi
  done
}

write_components() {
  {
    for pid in "${!NAMES[@]}"; do echo "$pid ${NAMES[$pid]}"; done
  } >"$DIR/components"
}

start_apiserver() {
  start kube-apiserver "${APISERVER_CMD[@]}"
  APISERVER_PID=$!
  wait_for kube-apiserver api GET /readyz
  write_components
  echo running >"$DIR/apiserver.state"
}

# A crash, as far as clients can tell: connections reset, nothing answers on the port.
stop_apiserver() {
  local pid="$APISERVER_PID"
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "NAMES[$pid]"
  APISERVER_PID=""
  write_components
  echo stopped >"$DIR/apiserver.state"
  log "kube-apiserver stopped on request (etcd and the other components keep running)"
}

# Start-up readiness: a short poll of a local endpoint, bounded by KLM_START_TIMEOUT.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + ${KLM_START_TIMEOUT:-180}))
  until "$@" >/dev/null 2>&1; do
    check_alive
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.1
  done
  log "$what: ready"
}

api() { # METHOD PATH [curl args...]
  local method="$1" path="$2"; shift 2
  curl -sS --fail --max-time 10 -X "$method" --cacert "$DIR/pki/ca.crt" \
    --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" "$@" "https://127.0.0.1:$P_API$path"
}

free_ports() { # N -> N distinct free loopback ports
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

gen_pki() {
  local p="$DIR/pki"
  mkdir -p "$p"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$p/ca.key" -out "$p/ca.crt" -days 3650 -subj "/CN=klm-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  # Certificates are valid from a day ago: tests run product binaries with their wall clock
  # shifted (libfaketime), and a client whose clock is behind must still accept the API server's
  # certificate. `openssl x509 -req` cannot backdate; `openssl ca -startdate` can.
  mkdir -p "$p/ca-db"
  : >"$p/ca-db/index.txt"
  cat >"$p/ca-db/ca.cnf" <<EOF
[ca]
default_ca = klm
[klm]
database = $p/ca-db/index.txt
new_certs_dir = $p/ca-db
certificate = $p/ca.crt
private_key = $p/ca.key
rand_serial = yes
default_md = sha256
policy = any
unique_subject = no
[any]
organizationName = optional
commonName = supplied
EOF
  local start; start="$(date -u -d '1 day ago' +%Y%m%d%H%M%SZ)"
  cert() { # name subject extensions
    openssl req "${ec[@]}" -keyout "$p/$1.key" -out "$p/$1.csr" -subj "$2" 2>/dev/null
    openssl ca -batch -notext -preserveDN -config "$p/ca-db/ca.cnf" -startdate "$start" -days 3650 \
      -in "$p/$1.csr" -out "$p/$1.crt" -extfile <(printf '%s\n' "$3") 2>/dev/null
    rm -f "$p/$1.csr"
  }
  local client=$'keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth'
  cert apiserver "/CN=kube-apiserver" $'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,'"${RN_GATEWAY:+IP:$RN_GATEWAY,}"$'DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local'
  cert admin "/O=system:masters/CN=klm-admin" "$client"
  cert controller-manager "/CN=system:kube-controller-manager" "$client"
  cert scheduler "/CN=system:kube-scheduler" "$client"
  # kwok plays every kubelet and deletes pods: cluster-admin is the honest grant.
  cert kwok "/O=system:masters/CN=kwok" "$client"
  if real_node_enabled; then real_node_pki; fi
  # Service-account tokens: RSA, the algorithm every client of the token-review path accepts.
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
}

write_kubeconfig() { # file user cert-name
  local b64=(base64 -w0)
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: klm
  cluster:
    server: https://127.0.0.1:$P_API
    certificate-authority-data: $("${b64[@]}" <"$DIR/pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $("${b64[@]}" <"$DIR/pki/$3.crt")
    client-key-data: $("${b64[@]}" <"$DIR/pki/$3.key")
contexts:
- name: klm
  context:
    cluster: klm
    user: $2
current-context: klm
EOF
  chmod 600 "$1"
}

create_node() { # name
  api POST /api/v1/nodes -H 'Content-Type: application/json' -o /dev/null -d @- <<EOF
{"apiVersion":"v1","kind":"Node","metadata":{"name":"$1",
 "labels":{"kubernetes.io/hostname":"$1","kubernetes.io/os":"linux","kubernetes.io/arch":"amd64","type":"kwok"},
 "annotations":{"kwok.x-k8s.io/node":"fake","node.alpha.kubernetes.io/ttl":"0"}}}
EOF
}

node_ready() {
  api GET "/api/v1/nodes/$1" | python3 -c '
import json, sys
n = json.load(sys.stdin)
sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", [])) else 1)'
}

lease_held() { # namespace name
  api GET "/apis/coordination.k8s.io/v1/namespaces/$1/leases/$2" | grep -q '"holderIdentity"'
}

run_supervisor() {
  for c in openssl curl python3 setpriv setsid base64; do
    command -v "$c" >/dev/null || die "'$c' is required (Debian: apt-get install openssl curl python3 util-linux coreutils)"
  done
  mkdir -p "$DIR"
  if pid="$(supervisor_pid)" && [[ "$pid" != $$ ]]; then die "a cluster is already running in $DIR (pid $pid)"; fi
  if [[ -f "$DIR/$MARKER" ]]; then
    # Left over by a supervisor that was SIGKILLed: start from scratch (stale etcd data, ready marker).
    real_node_teardown
    find "$DIR" -mindepth 1 -maxdepth 1 ! -name supervisor.log ! -name "$MARKER" -exec rm -rf {} +
  else
    # Never take over (and later delete) a directory that isn't ours.
    [[ -z "$(ls -A "$DIR" | grep -v '^supervisor.log$' || true)" ]] || die "$DIR exists and is not a cluster directory"
    touch "$DIR/$MARKER"
  fi
  echo $$ >"$DIR/supervisor.pid"
  trap cleanup EXIT
  trap "trap '' INT TERM HUP; exit 143" TERM
  trap "trap '' INT TERM HUP; exit 130" INT
  trap "trap '' INT TERM HUP; exit 129" HUP
  mkdir -p "$DIR/logs" "$DIR/etcd" "$DIR/kwok"
  local t0=$SECONDS

  # Tools (warm: a few file checks). In its own process group so a teardown during a cold
  # build stops the Go compilers too.
  setsid "$ROOT/tests/tools/install.sh" >"$DIR/tools.out" &
  TOOLS_PID=$!
  wait "$TOOLS_PID" || die "tests/tools/install.sh failed"
  TOOLS_PID=""
  local tools; tools="$(tail -n1 "$DIR/tools.out")"
  [[ -x "$tools/kube-apiserver" ]] || die "install.sh printed '$tools', which has no kube-apiserver"

  read -r P_ETCD P_PEER P_API P_REPO < <(free_ports 4)
  if real_node_enabled; then real_node_init "$tools"; fi
  gen_pki
  write_kubeconfig "$DIR/kubeconfig" klm-admin admin
  write_kubeconfig "$DIR/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
  write_kubeconfig "$DIR/scheduler.kubeconfig" system:kube-scheduler scheduler
  write_kubeconfig "$DIR/kwok.kubeconfig" kwok kwok

  start etcd "$tools/etcd" --name=klm --data-dir="$DIR/etcd" \
    --listen-client-urls="http://127.0.0.1:$P_ETCD" --advertise-client-urls="http://127.0.0.1:$P_ETCD" \
    --listen-peer-urls="http://127.0.0.1:$P_PEER" --initial-advertise-peer-urls="http://127.0.0.1:$P_PEER" \
    --initial-cluster="klm=http://127.0.0.1:$P_PEER" --listen-metrics-urls="" \
    --unsafe-no-fsync --auto-compaction-retention=1 --quota-backend-bytes=2147483648 --log-level=warn
  wait_for etcd curl -sf "http://127.0.0.1:$P_ETCD/health"

  # --endpoint-reconciler-type=none: the `kubernetes` Service endpoints may not hold a loopback
  # address, and nothing in a kwok cluster dials it.
  APISERVER_CMD=("$tools/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$P_ETCD" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$P_API" \
    --endpoint-reconciler-type=none \
    --tls-cert-file="$DIR/pki/apiserver.crt" --tls-private-key-file="$DIR/pki/apiserver.key" \
    --client-ca-file="$DIR/pki/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$DIR/pki/sa.pub" \
    --service-account-signing-key-file="$DIR/pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --allow-privileged=true --profiling=false \
    --enable-admission-plugins=NodeRestriction)
  if real_node_enabled; then
    # Pods reach the API server at the real node's bridge address (no kube-proxy here), and
    # the API server reaches the kubelet (logs) with a client certificate.
    APISERVER_CMD+=(--bind-address=0.0.0.0 --kubelet-preferred-address-types=InternalIP
      --kubelet-client-certificate="$DIR/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key="$DIR/pki/apiserver-kubelet-client.key")
  fi
  start_apiserver

  # A leader that cannot renew its Lease within the renew deadline exits (by design). The tests
  # stop the API server for up to a minute and a half: stretch the deadlines past that, so the
  # controllers ride out an outage instead of taking the cluster down. (Each runs alone.)
  local LEADER_ELECTION=(--leader-elect-lease-duration=150s --leader-elect-renew-deadline=120s
    --leader-elect-retry-period=2s)
  start kube-controller-manager "$tools/kube-controller-manager" \
    --kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --secure-port=0 --controllers='*' --use-service-account-credentials=true \
    --root-ca-file="$DIR/pki/ca.crt" --service-account-private-key-file="$DIR/pki/sa.key" \
    --cluster-signing-cert-file="$DIR/pki/ca.crt" --cluster-signing-key-file="$DIR/pki/ca.key" \
    "${LEADER_ELECTION[@]}" --profiling=false
  start kube-scheduler "$tools/kube-scheduler" \
    --kubeconfig="$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
    --secure-port=0 "${LEADER_ELECTION[@]}" --profiling=false
  # HOME: kwok also loads ~/.kwok/kwok.yaml when present; keep the user's out of the test cluster.
  start kwok env HOME="$DIR/kwok" "$tools/kwok" \
    --kubeconfig="$DIR/kwok.kubeconfig" --config="$HERE/kwok-stages.yaml" \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-ip=127.0.0.1 --cidr=10.0.0.0/16 --node-lease-duration-seconds=40

  "$ROOT/tests/fixtures/charts/package.sh" "$tools/helm" "$DIR/charts" >/dev/null
  start chart-repo python3 -m http.server "$P_REPO" --bind 127.0.0.1 --directory "$DIR/charts"

  wait_for "kube-controller-manager (lease)" lease_held kube-system kube-controller-manager
  wait_for "kube-scheduler (lease)" lease_held kube-system kube-scheduler
  wait_for "default ServiceAccount" api GET /api/v1/namespaces/default/serviceaccounts/default
  wait_for "chart repository" curl -sf "http://127.0.0.1:$P_REPO/index.yaml"

  local n
  for ((n = 1; n <= ${KLM_NODES:-3}; n++)); do create_node "${KLM_NODE_PREFIX:-worker}-$n"; done
  for ((n = 1; n <= ${KLM_NODES:-3}; n++)); do wait_for "node ${KLM_NODE_PREFIX:-worker}-$n" node_ready "${KLM_NODE_PREFIX:-worker}-$n"; done
  if real_node_enabled; then real_node_start "$tools"; fi

  cat >"$DIR/cluster.env" <<EOF
KLM_CLUSTER_DIR=$DIR
KLM_KUBECONFIG=$DIR/kubeconfig
KLM_CHART_REPO=http://127.0.0.1:$P_REPO
KLM_TOOLS_DIR=$tools
KLM_APISERVER=https://127.0.0.1:$P_API
KLM_REAL_NODE=${KLM_REAL_NODE:-}
KLM_REAL_NODE_APISERVER=${RN_GATEWAY:+$RN_GATEWAY:$P_API}
EOF
  write_components
  touch "$DIR/ready"
  log "cluster ready in $((SECONDS - t0))s: apiserver https://127.0.0.1:$P_API, charts http://127.0.0.1:$P_REPO, dir $DIR"
  echo "READY $DIR"

  # Supervise: any component dying ends the cluster (loudly) rather than leaving half of one,
  # except kube-apiserver stopped on request (SIGUSR1; SIGUSR2 starts it again). A trapped signal
  # makes `wait` return at once; the requester re-sends until it sees the state it asked for, so
  # a signal landing between the REQUEST check and `wait` is only late, never lost.
  trap 'REQUEST=stop-apiserver' USR1
  trap 'REQUEST=start-apiserver' USR2
  local dead
  while :; do
    case "$REQUEST" in
      stop-apiserver) REQUEST=""; [[ -z "$APISERVER_PID" ]] || stop_apiserver; continue ;;
      start-apiserver) REQUEST=""; [[ -n "$APISERVER_PID" ]] || start_apiserver; continue ;;
    esac
    dead=""
    wait -n -p dead "${!NAMES[@]}" || true
    [[ -n "${dead:-}" ]] || continue # woken by a request
    log "${NAMES[$dead]:-a component} exited; tearing the cluster down. Last lines of its log:"
    tail -n 30 "$DIR/logs/${NAMES[$dead]:-kube-apiserver}.log" >&2 || true
    exit 1
  done
}

# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
cmd_up() {
  if supervisor_pid >/dev/null && [[ -f "$DIR/ready" ]]; then
    log "already running in $DIR"
    print_env
    return
  fi
  supervisor_pid >/dev/null && die "a cluster is starting in $DIR; wait for it or run: $0 down"
  # A stale directory of ours (supervisor SIGKILLed, machine rebooted): start clean.
  if [[ -f "$DIR/$MARKER" ]]; then real_node_teardown; rm -rf "$DIR"; fi
  mkdir -p "$DIR"
  # Own session: the cluster outlives this shell until `cluster.sh down`.
  setsid "$0" run </dev/null >"$DIR/supervisor.log" 2>&1 &
  local pid=$!
  log "starting (supervisor pid $pid, log $DIR/supervisor.log)"
  until [[ -f "$DIR/ready" ]]; do
    if ! alive "$pid"; then
      tail -n 40 "$DIR/supervisor.log" >&2 2>/dev/null || true
      die "cluster failed to start"
    fi
    sleep 0.2
  done
  print_env
}

cmd_down() {
  local pid
  if pid="$(supervisor_pid)"; then
    kill -TERM "$pid"
    local deadline=$((SECONDS + 30))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
    # A wedged supervisor: SIGKILL it; its components die with it (pdeathsig).
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # A real node whose supervisor was SIGKILLed left its containers running: stop them.
  real_node_teardown
  if [[ -f "$DIR/$MARKER" ]]; then rm -rf "$DIR"; fi
  log "stopped ($DIR removed)"
}

# stop-apiserver / start-apiserver: signal the supervisor, wait until it reports the state.
cmd_apiserver() { # stop|start
  local want sig pid
  case "$1" in
    stop) want=stopped sig=USR1 ;;
    start) want=running sig=USR2 ;;
  esac
  pid="$(supervisor_pid)" && [[ -f "$DIR/ready" ]] || die "no running cluster in $DIR"
  local deadline=$((SECONDS + ${KLM_START_TIMEOUT:-180})) next=0
  until [[ "$(cat "$DIR/apiserver.state" 2>/dev/null)" == "$want" ]]; do
    alive "$pid" || die "the supervisor (pid $pid) exited"
    ((SECONDS < deadline)) || die "kube-apiserver not $want after ${KLM_START_TIMEOUT:-180}s"
    if ((SECONDS >= next)); then kill "-$sig" "$pid"; next=$((SECONDS + 2)); fi
    sleep 0.05
  done
  log "kube-apiserver $want"
}

cmd_status() {
  local pid
  pid="$(supervisor_pid)" || { echo "not running ($DIR)"; return 1; }
  echo "supervisor pid $pid, dir $DIR"
  [[ -f "$DIR/components" ]] || { echo "starting"; return 0; }
  local total=0 rss
  while read -r cpid name; do
    rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$cpid/status" 2>/dev/null || echo 0)"
    total=$((total + rss))
    printf '  %-24s pid %-8s RSS %6d MiB\n' "$name" "$cpid" $((rss / 1024))
  done <"$DIR/components"
  printf '  %-24s              RSS %6d MiB\n' total $((total / 1024))
  print_env
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) print_env ;;
  status) cmd_status ;;
  run) run_supervisor ;;
  stop-apiserver) cmd_apiserver stop ;;
  start-apiserver) cmd_apiserver start ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
