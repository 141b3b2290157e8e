"""The embedded-default demo: runs the zoo commands that work today on `wizardcoder-tiny`, prints a summary.

`python -m wizardcoder_plugin.demo [--output-dir DIR]` (what `scripts/demo.sh` runs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _zoo(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "registry_spec.cli", *args]
    print(f"\n$ zoo {shlex.join(args)}", flush=True)
    r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
    if r.returncode:
        print(r.stdout)
        raise SystemExit(f"demo step failed (exit {r.returncode}): zoo {shlex.join(args)}")
    return r


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, object] = {}

    print(_zoo("models").stdout, end="")

    # 1. a checkpoint to work with: the tiny model's seeded random init, saved as a MindSpore ckpt
    from .config import PRESETS
    from .runtime import save_random_init

    ckpt = save_random_init("wizardcoder-tiny", PRESETS["wizardcoder-tiny"], out / "tiny-init.ckpt")
    summary["mindspore checkpoint"] = str(ckpt)

    # 2. convert MindSpore -> HF safetensors -> MindSpore
    hf_dir = out / "tiny-hf"
    r = _zoo("convert", "wizardcoder-tiny", "--input", str(ckpt), "--output", str(hf_dir), "--to", "hf", "--json")
    summary["hf checkpoint"] = str(hf_dir)
    summary["parameters"] = json.loads(r.stdout)["parameters"]
    back = out / "tiny-roundtrip.ckpt"
    _zoo("convert", "wizardcoder-tiny", "--input", str(hf_dir), "--output", str(back), "--json")

    # 3. predict with streaming, then as JSON with timings
    prompt = "Write a Python function that returns the sum of a list."
    r = _zoo("predict", "wizardcoder-tiny", "--weights", str(hf_dir), "--prompt", prompt, "--max-new-tokens", "24",
             "--stream")
    print(r.stdout, end="")
    r = _zoo("predict", "wizardcoder-tiny", "--weights", str(back), "--prompt", prompt, "--max-new-tokens", "24",
             "--json", "--output", str(out / "predictions.jsonl"))
    row = json.loads(r.stdout.splitlines()[0])
    summary["predictions"] = str(out / "predictions.jsonl")
    summary["prefill ms"] = row["prefill_ms"]
    summary["decode tokens/s"] = row["decode_tokens_per_s"]

    print("\n== demo summary ==")
    for k, v in summary.items():
        print(f"{k:22} {v}")
    print(f"{'total seconds':22} {time.perf_counter() - start:.1f}")
    print("note: the tiny model is randomly initialised, so its text is noise; training comes with `zoo train`.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
