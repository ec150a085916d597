#!/usr/bin/env bash
# Builds (or reuses) the pinned control-plane tools the end-to-end tests and the demo need:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, helm, kwok and the real node's
# kubelet (tests/cluster/real-node.sh).
#
# Binaries are cached OUTSIDE the checkout, keyed by version, so a clean clone on the same
# machine reuses them:   ${KLM_TOOLS_CACHE:-$HOME/.cache/kata-lifecycle-manager/tools}/<tool>-<version>/
# Users who already have these binaries can point KLM_TOOLS_DIR at a directory holding them;
# nothing is built then.
#
# Prints the directory holding all six binaries (as symlinks) on its last stdout line.
set -euo pipefail

K8S_VERSION=v1.36.3        # kube-apiserver, kube-controller-manager, kube-scheduler
K8S_STAGING_VERSION=v0.36.3
ETCD_VERSION=v3.6.16
# helm 3 and helm 4: the coordinator supports both (Helm 3's security support ends in
# February 2027; the coordinator image ships Helm 4). `helm` on the tools PATH is HELM_DEFAULT;
# `helm3` and `helm4` name each explicitly.
HELM_VERSION=v3.22.0
HELM4_VERSION=v4.3.1
KWOK_VERSION=v0.8.0

log() { printf '[tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -n "${KLM_TOOLS_DIR:-}" ]]; then
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler helm kwok; do
    [[ -x "$KLM_TOOLS_DIR/$b" ]] || { log "KLM_TOOLS_DIR=$KLM_TOOLS_DIR has no executable '$b'; unset it to build the pinned tools"; exit 1; }
  done
  echo "$KLM_TOOLS_DIR"
  exit 0
fi

CACHE="${KLM_TOOLS_CACHE:-$HOME/.cache/kata-lifecycle-manager/tools}"
mkdir -p "$CACHE"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}"
# Go's own parallelism follows the cores; keep memory well inside a 2-core/24 GiB machine.
export GOMAXPROCS="${GOMAXPROCS:-$(nproc)}"

# Each tool lands in <cache>/<name>-<version>/ and is marked complete by a .done file,
# so an interrupted build is redone rather than trusted.
done_marker() { echo "$CACHE/$1/.done"; }

scratch_module() {
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/klm-tools-XXXXXX")"
  (cd "$dir" && go mod init klm-tools-build >/dev/null 2>&1)
  echo "$dir"
}

build_kubernetes() { # cache-key-name cmd...
  # Each set of commands gets its own cache entry, so adding one (kubelet, for the real node)
  # does not rebuild the others.
  local name="$1"; shift
  local key="$name-$K8S_VERSION" out="$CACHE/$name-$K8S_VERSION"
  [[ -f "$(done_marker "$key")" ]] && { log "$name $K8S_VERSION: cached"; return; }
  log "$name $K8S_VERSION: building $* (cold: tens of minutes)"
  local mod; mod="$(scratch_module)"
  pushd "$mod" >/dev/null
  # k8s.io/kubernetes replaces its staging modules with local folders, which `go install`
  # refuses. Read that replace list from its own go.mod and point each at the published version.
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  local staged
  staged="$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")"
  [[ -n "$staged" ]] || { log "found no staging replaces in $gomod"; exit 1; }
  go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
  for m in $staged; do go mod edit -replace "$m=$m@$K8S_STAGING_VERSION"; done
  log "$name: resolving modules ($(echo "$staged" | wc -l) staging replaces)"
  local cmd pkgs=()
  for cmd in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd@$K8S_VERSION"); done
  go get "${pkgs[@]}" >&2
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$out"
  for cmd in "$@"; do
    log "$name: compiling $cmd"
    go build -trimpath -ldflags "$ldflags" -o "$out/$cmd" "k8s.io/kubernetes/cmd/$cmd"
  done
  popd >/dev/null; rm -rf "$mod"
  touch "$(done_marker "$key")"
  log "$name $K8S_VERSION: done"
}

build_etcd() {
  local key="etcd-$ETCD_VERSION" out="$CACHE/etcd-$ETCD_VERSION"
  [[ -f "$(done_marker "$key")" ]] && { log "etcd $ETCD_VERSION: cached"; return; }
  log "etcd $ETCD_VERSION: building"
  local mod; mod="$(scratch_module)"
  pushd "$mod" >/dev/null
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  mkdir -p "$out"
  go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
  popd >/dev/null; rm -rf "$mod"
  touch "$(done_marker "$key")"
}

build_go_install() { # name version package ldflags [recipe]
  # `recipe` names a change in how a version is built (e.g. new ldflags), so such a change gets
  # a fresh cache entry instead of silently reusing the old binary.
  local name="$1" version="$2" pkg="$3" ldflags="$4" recipe="${5:-}"
  local key="$name-$version${recipe:+-$recipe}" out="$CACHE/$name-$version${recipe:+-$recipe}"
  [[ -f "$(done_marker "$key")" ]] && { log "$name $version: cached"; return; }
  log "$name $version: building"
  mkdir -p "$out"
  GOBIN="$out" go install -trimpath -ldflags "$ldflags" "$pkg@$version"
  touch "$(done_marker "$key")"
}

build_etcd
# Like helm's own release build, tell `helm template`/`lint` which Kubernetes version to assume
# (the minor of the client-go it is built with); without it they assume 1.20 and refuse charts
# with a kubeVersion constraint such as ours.
helm_k8s_minor() {
  local gomod
  gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -1
}
HELM_RECIPE=k8sflags
if [[ ! -f "$(done_marker "helm-$HELM_VERSION-$HELM_RECIPE")" ]]; then
  minor="$(helm_k8s_minor)"
  [[ -n "$minor" ]] || { log "cannot read client-go's version from helm's go.mod"; exit 1; }
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
else
  helm_ldflags=""
fi
build_go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$helm_ldflags" "$HELM_RECIPE"
# Helm 4 takes the Kubernetes version it assumes from its client-go module's build info, so
# only the version stamp is needed.
build_go_install helm "$HELM4_VERSION" helm.sh/helm/v4/cmd/helm \
  "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM4_VERSION -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
build_go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok \
  "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_kubernetes kubernetes kube-apiserver kube-controller-manager kube-scheduler
# The real node's kubelet (tests/cluster, KLM_REAL_NODE): its own cache entry, built the same way.
build_kubernetes kubelet kubelet

# One directory of symlinks per version set, so callers need a single PATH entry.
set_key="set-k8s$K8S_VERSION-etcd$ETCD_VERSION-helm$HELM_VERSION-$HELM_RECIPE-helm$HELM4_VERSION-kwok$KWOK_VERSION"
bin="$CACHE/$set_key"
mkdir -p "$bin"
ln -sf "$CACHE/etcd-$ETCD_VERSION/etcd" "$bin/etcd"
for c in kube-apiserver kube-controller-manager kube-scheduler; do
  ln -sf "$CACHE/kubernetes-$K8S_VERSION/$c" "$bin/$c"
done
ln -sf "$CACHE/helm-$HELM_VERSION-$HELM_RECIPE/helm" "$bin/helm3"
ln -sf "$CACHE/helm-$HELM4_VERSION/helm" "$bin/helm4"
ln -sf "$CACHE/helm-$HELM4_VERSION/helm" "$bin/helm"
ln -sf "$CACHE/kwok-$KWOK_VERSION/kwok" "$bin/kwok"
ln -sf "$CACHE/kubelet-$K8S_VERSION/kubelet" "$bin/kubelet"
echo "$bin"
