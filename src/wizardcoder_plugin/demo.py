"""The embedded-default demo: the whole workflow on `wizardcoder-tiny` and the bundled CodeAlpaca sample, through
the `zoo` CLI as a user would run it, then a summary of the numbers and where every artifact is.

preprocess -> finetune (progress bar) -> predict (streaming) -> export (mindir, onnx, lite when set up) -> predict
on the exported graphs -> MBPP evaluation of a few problems -> summary.

`python -m wizardcoder_plugin.demo [--output-dir DIR] [--steps N]` (what `scripts/demo.sh` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).parent / "data" / "samples" / "code_alpaca_400.json"
PROMPT = "Write a Python function that returns the sum of a list."


def _zoo(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "registry_spec.cli", *args]
    print(f"\n$ zoo {shlex.join(args)}", flush=True)
    r = subprocess.run(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    if r.returncode:
        print(r.stdout or "")
        raise SystemExit(f"demo step failed (exit {r.returncode}): zoo {shlex.join(args)}")
    return r


def _lite_ready() -> bool:
    py = os.environ.get("ZOO_LITE_PYTHON")
    return bool(py) and Path(py).is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"))
    parser.add_argument("--steps", type=int, default=60, help="finetuning steps (batch 8 x 128 tokens)")
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, object] = {}
    timings: dict[str, float] = {}

    def timed(name: str, *zoo_args: str, capture: bool = True) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        r = _zoo(*zoo_args, capture=capture)
        timings[name] = round(time.perf_counter() - t0, 1)
        return r

    print(_zoo("models").stdout, end="")

    # 1. preprocess the bundled CodeAlpaca sample into MindRecord rows of 129 tokens
    data = out / "code_alpaca.mindrecord"
    r = timed("preprocess", "preprocess", "wizardcoder-tiny", "--input", str(SAMPLE), "--output", str(data),
              "--seq-length", "128", "--json")
    pre = json.loads(r.stdout)
    summary["preprocessed rows"] = f"{pre['rows_written']} written, {pre['rows_skipped']} skipped -> {data}"

    # 2. finetune from the seeded random init (the progress bar shows loss, lr, tokens/s)
    run = out / "finetune"
    r = timed("finetune", "train", "wizardcoder-tiny", "--data", str(data), "--mode", "finetune", "--output-dir",
              str(run), "--max-steps", str(args.steps), "--batch-size", "8", "--learning-rate", "1e-3",
              "--warmup-steps", "5", "--lr-end", "1e-4", "--save-steps", str(max(1, args.steps // 2)), "--resume",
              "--json")
    tr = json.loads(r.stdout)
    losses = [json.loads(x)["loss"] for x in Path(tr["metrics_file"]).read_text().splitlines()]
    summary["finetune loss"] = f"{losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})"
    summary["finetune tokens/s"] = tr["tokens_per_s"]
    ckpt_dir = str(Path(tr["checkpoint"]).parent)
    summary["checkpoint"] = ckpt_dir

    # 3. predict with the finetuned weights: sampled and streamed (a greedy tiny model repeats one token), then
    #    greedy as JSON, the reference output for the exported graphs
    timed("predict", "predict", "wizardcoder-tiny", "--weights", ckpt_dir, "--prompt", PROMPT, "--max-new-tokens",
          "48", "--do-sample", "--temperature", "0.8", "--top-p", "0.95", "--repetition-penalty", "1.3", "--seed",
          "0", "--stream", capture=False)
    r = _zoo("predict", "wizardcoder-tiny", "--weights", ckpt_dir, "--prompt", PROMPT, "--max-new-tokens", "32",
             "--json", "--output", str(out / "predictions.jsonl"))
    online = json.loads(r.stdout.splitlines()[0])
    summary["online decode tokens/s"] = online["decode_tokens_per_s"]

    # 4. export, then run the exported graphs: their greedy tokens must equal the online model's
    backends = ["mindir", "onnx"] + (["lite"] if _lite_ready() else [])
    for backend in backends:
        folder = out / "export" / backend
        timed(f"export {backend}", "export", "wizardcoder-tiny", "--weights", ckpt_dir, "--backend", backend,
              "--output-dir", str(folder), "--seq-length", "256", "--json")
        r = _zoo("predict", "wizardcoder-tiny", "--backend", backend, "--artifacts", str(folder), "--prompt", PROMPT,
                 "--max-new-tokens", "32", "--json")
        row = json.loads(r.stdout.splitlines()[0])
        same = row["token_ids"] == online["token_ids"]
        summary[f"export {backend}"] = f"{folder} (tokens equal online: {same})"
        if not same:
            raise SystemExit(f"the {backend} export generated different tokens than the online model")
    if not _lite_ready():
        summary["export lite"] = "skipped: run scripts/setup.sh (creates .venv-lite) and set ZOO_LITE_PYTHON"

    # 5. evaluate on a few MBPP problems (a 60-step tiny model solves none: the harness is what is shown)
    r = timed("eval", "eval", "wizardcoder-tiny", "--weights", ckpt_dir, "--task", "mbpp", "--limit", "3",
              "--max-length", "384", "--output-dir", str(out / "eval-mbpp"), "--json")
    ev = json.loads(r.stdout)
    summary["mbpp (3 problems)"] = f"pass@1 {ev['pass@1']:.3f} -> {out / 'eval-mbpp'}"

    print("\n== demo summary ==")
    for k, v in summary.items():
        print(f"{k:24} {v}")
    print(f"{'seconds per step':24} {timings}")
    print(f"{'total seconds':24} {time.perf_counter() - start:.1f}")
    print("note: wizardcoder-tiny starts from random weights; a minute of finetuning lowers its loss but does not "
          "make it write correct code.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
