#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install the project with the given extras (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
EXTRAS="${1:-test}"
if [ ! -x .venv/bin/python ] || [ "${FRESH:-0}" = 1 ]; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]" 2> >(grep -v "WARNING: Location" >&2)
echo "environment ready: $(pwd)/.venv" >&2
