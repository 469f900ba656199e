#!/usr/bin/env bash
# CycloneDX SBOM (JSON, spec 1.6) of the image's Python content: the root component from
# pyproject.toml and every package of requirements.lock, which is exactly what the Dockerfile
# installs into /opt/venv (pip --require-hashes --no-deps); tests/deploy/test_deploy_image.py checks
# that the built image's distributions are the SBOM's components. The OS packages of the base image
# are not in it (scan the image with your registry's scanner for those).
# Usage: scripts/sbom.sh [OUT]   (default: dist/cybedefend-bridge.cdx.json). Needs cyclonedx-bom (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/cybedefend-bridge.cdx.json}
mkdir -p "$(dirname "$OUT")"
CYCLONEDX=${CYCLONEDX:-cyclonedx-py}
"$CYCLONEDX" requirements --pyproject pyproject.toml --mc-type application --output-reproducible \
  --of JSON -o "$OUT" requirements.lock
echo "$OUT"
