#!/usr/bin/env bash
# Set up the environment and run the main job on the embedded default (wizardcoder-tiny, bundled tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLOG_v=3
[ -x .venv-lite/bin/python ] && export ZOO_LITE_PYTHON="${ZOO_LITE_PYTHON:-$(pwd)/.venv-lite/bin/python}"
.venv/bin/python -m wizardcoder_plugin.demo "$@"
