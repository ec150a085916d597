#!/usr/bin/env bash
# Builds the project's images from this checkout without a Docker engine or a registry
# (`make images`), as OCI archives in target/images/:
#
#   kata-lifecycle-manager-agent.tar        <agent repository>:<appVersion>
#   kata-lifecycle-manager-coordinator.tar  <coordinator repository>:<appVersion> (+ helm 4)
#   test-pause.tar, test-kata-deploy.tar, test-verify.tar   the real-node test's own images
#
# Repositories are the chart's defaults (charts/kata-lifecycle-manager/values.yaml), so an
# imported image is what `helm install` asks for; the layout is the Dockerfiles' (docker/*.Dockerfile):
# the binary in /usr/local/bin, uid 65532, the same entrypoint, distroless/static's files.
# Binaries are static: release builds on the host's gnu target with crt-static (no musl
# target is needed), helm 4 from the tools cache (tests/tools/install.sh builds it CGO-free).
#
# Load them into a containerd (the real node of tests/cluster does this itself):
#   ctr -n k8s.io images import target/images/kata-lifecycle-manager-agent.tar
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${KLM_IMAGES_DIR:-$ROOT/target/images}"
CARGO="${CARGO:-cargo}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

chart_value() { # dotted path in values.yaml (two levels under images)
  python3 - "$ROOT/charts/kata-lifecycle-manager/values.yaml" "$1" <<'EOF'
import sys, yaml
v = yaml.safe_load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)
EOF
}
APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/kata-lifecycle-manager/Chart.yaml")"
AGENT_REPO="$(chart_value images.agent.repository)"
COORDINATOR_REPO="$(chart_value images.coordinator.repository)"

log "release build of klm-agent and klm-coordinator ($TRIPLE, static)"
# Naming the target keeps these flags off build scripts and proc macros (host artifacts) and
# the output apart from the ordinary release build: target/<triple>/release.
env "CARGO_TARGET_$(echo "$TRIPLE" | tr 'a-z-' 'A-Z_')_RUSTFLAGS=-C target-feature=+crt-static" \
  "$CARGO" build --release --locked --target "$TRIPLE" -p klm-agent -p klm-coordinator
# A dynamically linked binary would start on the host and fail in an image without a libc.
static_or_die() {
  if readelf -l "$1" | grep -q 'program interpreter'; then log "$1 is dynamically linked"; exit 1; fi
}
mkdir -p "$OUT" "$OUT/bin"
BIN="$OUT/bin"
for b in klm-agent klm-coordinator; do
  static_or_die "$ROOT/target/$TRIPLE/release/$b"
  # Symbols off the image's copy only: the release build keeps its own.
  strip -o "$BIN/$b" "$ROOT/target/$TRIPLE/release/$b"
done

TOOLS="$(bash "$ROOT/tests/tools/install.sh" | tail -n1)"
HELM="$(readlink -f "$TOOLS/helm4")"
static_or_die "$HELM"

IMG=(python3 "$ROOT/docker/oci_image.py")
# What the Dockerfiles' final stages say (USER, EXPOSE, ENTRYPOINT, CMD, ENV).
NONROOT=(--base nonroot --user 65532:65532 --expose 8080)

"${IMG[@]}" --out "$OUT/kata-lifecycle-manager-agent.tar" --name "$AGENT_REPO:$APP_VERSION" "${NONROOT[@]}" \
  --file "$BIN/klm-agent:/usr/local/bin/klm-agent:0755" \
  --entrypoint /usr/local/bin/klm-agent

"${IMG[@]}" --out "$OUT/kata-lifecycle-manager-coordinator.tar" --name "$COORDINATOR_REPO:$APP_VERSION" "${NONROOT[@]}" \
  --file "$HELM:/usr/local/bin/helm:0755" \
  --file "$BIN/klm-coordinator:/usr/local/bin/klm-coordinator:0755" \
  --env HOME=/tmp --env HELM_CACHE_HOME=/tmp/helm/cache --env HELM_CONFIG_HOME=/tmp/helm/config \
  --env HELM_DATA_HOME=/tmp/helm/data \
  --entrypoint /usr/local/bin/klm-coordinator --cmd run

# The real-node test's images (tests/images/*.c): static C, no libc in the image.
for p in pause kata-deploy verify; do
  gcc -static -Os -s -Wall -Wextra -Werror -o "$OUT/bin/$p" "$ROOT/tests/images/$p.c"
done
"${IMG[@]}" --out "$OUT/test-pause.tar" --name klm.test/pause:1 \
  --file "$OUT/bin/pause:/pause:0755" --user 65535:65535 --entrypoint /pause
# One image, tagged with each kata-deploy chart version the test installs: the upstream
# chart's image tag defaults to its version.
kd_names=()
for v in 3.31.0 3.32.0 4.0.0 4.1.0; do kd_names+=(--name "klm.test/kata-deploy:$v"); done
"${IMG[@]}" --out "$OUT/test-kata-deploy.tar" "${kd_names[@]}" \
  --file "$OUT/bin/kata-deploy:/usr/bin/kata-deploy:0755" --entrypoint /usr/bin/kata-deploy --cmd install
"${IMG[@]}" --out "$OUT/test-verify.tar" --name klm.test/verify:1 --base nonroot --user 65532:65532 \
  --file "$OUT/bin/verify:/usr/local/bin/verify:0755" --entrypoint /usr/local/bin/verify

ls -l "$OUT"/*.tar | awk '{printf "%s %.1f MiB\n", $NF, $5 / 1048576}' >&2
