#!/usr/bin/env bash
# Set up the environment and run the main job on the embedded default (wizardcoder-tiny, bundled tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export GLOG_v=3
.venv/bin/python -m wizardcoder_plugin.demo "$@"
