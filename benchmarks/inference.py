"""The reference's inference table on this machine: `zoo bench` for the online model and the exported backends,
side by side with HF transformers (same weights, prompts and machine, interleaved), appended to RESULTS.md.

    python benchmarks/inference.py [--model wizardcoder-tiny] [--config tiny_starcoder.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import append_results, machine

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wizardcoder-tiny")
    ap.add_argument("--config", help="HF config.json for another architecture (e.g. tiny_starcoder.json)")
    ap.add_argument("--backends", default="online,onnx,mindir,lite")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--lengths", default="64,160")
    ap.add_argument("--prompt-length", default="32")
    ap.add_argument("--repeats", default="3")
    ap.add_argument("--out", default=str(HERE / "out" / "inference"))
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "registry_spec.cli", "bench", a.model, "--backends", a.backends, "--batch-sizes",
           a.batch_sizes, "--lengths", a.lengths, "--prompt-length", a.prompt_length, "--repeats", a.repeats,
           "--compare", "hf", "--output-dir", a.out, "--json"]
    if a.config:
        cmd += ["--config", a.config]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr)
    rows = json.loads(res.stdout)["rows"]
    table = (Path(a.out) / "bench.md").read_text()
    append_results(f"Inference: {a.model}" + (f" ({Path(a.config).name})" if a.config else ""),
                   " ".join(cmd), machine(), table, rows)


if __name__ == "__main__":
    main()
