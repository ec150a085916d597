#!/usr/bin/env bash
# Static tests of charts/kata-lifecycle-manager: `helm lint --strict` and rendering checks
# (tests/chart/render_test.py parses every rendered manifest). No cluster needed; the install
# and RBAC tests on a real control plane are tests/e2e/tests/chart_rbac.rs.
#
#   bash tests/chart/test.sh
#
# helm: $KLM_HELM if set, else the pinned helm that tests/tools/install.sh builds or reuses
# (it prints its bin dir on its last stdout line).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$root/charts/kata-lifecycle-manager"

die() { echo "tests/chart: $*" >&2; exit 1; }

helm="${KLM_HELM:-}"
if [[ -z "$helm" ]]; then
  bin="$(bash "$root/tests/tools/install.sh" | tail -n1)" || die "tests/tools/install.sh failed; cannot get helm (set KLM_HELM=/path/to/helm to use another)"
  helm="$bin/helm"
fi
[[ -x "$helm" ]] || die "helm not found or not executable at '$helm' (set KLM_HELM=/path/to/helm)"

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || die "python3 is needed (with PyYAML: apt-get install python3-yaml, or pip install pyyaml)"
"$python" -c 'import yaml' 2>/dev/null || die "$python has no PyYAML: apt-get install python3-yaml (or pip install pyyaml)"

echo "tests/chart: $("$helm" version --short) on $chart"
exec "$python" "$root/tests/chart/render_test.py" --helm "$helm" --chart "$chart"
