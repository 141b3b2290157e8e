"""Training memory: the peak resident set of `zoo train` (a fresh process, random init, two optimizer steps: the
second runs with the optimizer's state in place) against the memory plan's total for the same batch and length,
and HF transformers + torch AdamW taking the same two steps in a process of its own, at several batch sizes and
lengths of the tiny_starcoder shape. Results are appended to RESULTS.md.

    python benchmarks/train_memory.py [--cases 1x128,2x128,4x128,8x128,4x64,2x256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, machine  # noqa: E402
from startup import timed, zoo  # noqa: E402

from wizardcoder_plugin.model.config import load_config  # noqa: E402
from wizardcoder_plugin.model.memory import GIB, training_plan  # noqa: E402

HERE = Path(__file__).parent
CONFIG = HERE / "tiny_starcoder.json"
SAMPLES = HERE.parent / "src/wizardcoder_plugin/data/samples/code_alpaca_400.json"
HF_STEP = """
import json, sys, torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
cfg, batch, length = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**cfg)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for step in range(2):  # the first creates AdamW's state, the second runs beside it
    ids = torch.randint(1, 49000, (batch, length))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1x128,2x128,4x128,8x128,4x64,2x256", help="BATCHxLENGTH, comma-separated")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    config = load_config(CONFIG)
    lines = ["| batch × length | plan | zoo train peak RSS | plan / zoo | HF + torch AdamW peak RSS | zoo / HF |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for length in sorted({length for _, length in cases}):
            subprocess.run(zoo("preprocess", "wizardcoder-tiny", "--input", str(SAMPLES), "--output",
                               str(work / f"d{length}.mindrecord"), "--seq-length", str(length)),
                           check=True, capture_output=True)
        for batch, length in cases:
            _, ours, _ = timed(zoo("train", "wizardcoder-tiny", "--config", str(CONFIG), "--data",
                                   str(work / f"d{length}.mindrecord"), "--mode", "pretrain", "--output-dir",
                                   str(work / f"run-{batch}x{length}"), "--max-steps", "2", "--batch-size",
                                   str(batch), "--seq-length", str(length), "--save-steps", "1000"))
            _, hf, _ = timed([sys.executable, "-c", HF_STEP, str(CONFIG), str(batch), str(length)])
            plan = training_plan(config, "fp32", batch, length).total / GIB
            lines.append(f"| {batch} × {length} | {plan:.2f} GiB | {ours:.2f} GiB | {plan / ours:.2f}× | "
                         f"{hf:.2f} GiB | {ours / hf:.2f}× |")
            print(json.dumps({"batch": batch, "length": length, "plan_gib": plan, "zoo_gib": ours, "hf_gib": hf}),
                  file=sys.stderr, flush=True)
    weights = config.num_parameters() * 4 / GIB
    table = f"tiny_starcoder ({config.num_parameters() / 1e6:.0f}M parameters, {weights:.2f} GiB fp32)\n\n" + \
        "\n".join(lines)
    append_results("Training memory: zoo train against its plan and HF", "python benchmarks/train_memory.py " +
                   " ".join(sys.argv[1:]), machine() + "; two optimizer steps, fp32, random init", table, [])


if __name__ == "__main__":
    main()
