#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install the project with the given extras (default: test,export,bench,serve), plus the
# Python 3.7 MindSpore Lite 2.0.0 environment in ./.venv-lite (LITE=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
EXTRAS="${1:-test,export,bench,serve}"
if [ ! -x .venv/bin/python ] || [ "${FRESH:-0}" = 1 ]; then
  rm -rf .venv .venv-lite
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]" 2> >(grep -v "WARNING: Location" >&2)
# the native CPU kernels, compiled for this machine now rather than during the first run (a compiled extension's
# build at install); without a C++ compiler MindSpore's kernels run instead
.venv/bin/python -m wizardcoder_plugin.kernels build >/dev/null \
  || echo "warning: the native CPU kernels were not built (see above); MindSpore's kernels will run" >&2
if [ "${LITE:-1}" = 1 ]; then
  # optional: without Python 3.7 the lite export backend is unavailable, everything else works
  if ZOO_LITE_ENV="$(pwd)/.venv-lite" .venv/bin/python -m wizardcoder_plugin.export.lite_runtime setup \
      2> >(grep -v "WARNING: Location" >&2) >/dev/null; then
    echo "MindSpore Lite 2.0.0 (Python 3.7): $(pwd)/.venv-lite" >&2
  else
    echo "warning: MindSpore Lite was not set up (see above); the lite backend is unavailable" >&2
  fi
fi
echo "environment ready: $(pwd)/.venv" >&2
