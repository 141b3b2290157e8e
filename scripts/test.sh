#!/usr/bin/env bash
# Set up the environment and run lint + the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,export,bench,serve
export GLOG_v=3
[ -x .venv-lite/bin/python ] && export ZOO_LITE_PYTHON="${ZOO_LITE_PYTHON:-$(pwd)/.venv-lite/bin/python}"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
