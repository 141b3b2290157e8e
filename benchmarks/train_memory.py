"""Training memory: the peak resident set of `zoo train` (a fresh process, random init, two optimizer steps: the
second runs with the optimizer's state in place) against the memory plan's total for the same batch and length,
and HF transformers + torch AdamW taking the same two steps in a process of its own, at several batch sizes and
lengths of the tiny_starcoder shape; and, in one `zoo train` process at the first case, what the trainer's
construction, its first forward + backward and its first optimizer update each add to the resident set.
Results are appended to RESULTS.md.

    python benchmarks/train_memory.py [--cases 1x128,2x128,4x128,8x128,4x64,2x256] [--recompute]

`--recompute` also runs each case with activation checkpointing per block (`{"parallel": {"recompute": true}}`).
"""

from __future__ import annotations

import argparse
import ast
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
HF_STEP = f"""
import json, sys, torch
sys.path.insert(0, {str(HERE)!r})
from common import hf_train_step
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM
cfg, batch, length = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**cfg)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for step in range(2):  # the first creates AdamW's state, the second runs beside it
    hf_train_step(model, opt, torch, torch.randint(1, 49000, (batch, length)))
"""

# `zoo train` in this process, the resident set read after the trainer is built and after each graph's first call
PHASES = """
import sys
from wizardcoder_plugin.training import trainer as T
from registry_spec.cli import main

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 2**20

built = T.Trainer.__init__
seen = []

class First:
    # the cell, noting the resident set after its first call (its other attributes as they are)
    def __init__(self, cell, name):
        self.cell, self.name = cell, name
    def __call__(self, *args):
        out = self.cell(*args)
        out.asnumpy()
        if self.name not in [s[0] for s in seen]:
            seen.append((self.name, rss()))
        return out
    def __getattr__(self, attr):
        return getattr(self.cell, attr)

def init(self, *a, **k):
    built(self, *a, **k)
    seen.append(("trainer built", rss()))
    for name in ("accumulate", "adamw"):
        setattr(self, name, First(getattr(self, name), name))

T.Trainer.__init__ = init
sys.argv = ["zoo", "train", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print(seen)
"""


def phases(args: list[str]) -> list[tuple[str, float]]:
    out = subprocess.run([sys.executable, "-c", PHASES, *args], check=True, capture_output=True, text=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="1x128,2x128,4x128,8x128,4x64,2x256", help="BATCHxLENGTH, comma-separated")
    ap.add_argument("--recompute", action="store_true", help="also run each case with recompute per block")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    config = load_config(CONFIG)
    head = "| batch × length | plan | zoo train peak RSS | plan / zoo | HF + torch AdamW peak RSS | zoo / HF |"
    lines = [head + (" zoo train, recompute |" if args.recompute else ""),
             "|---|---|---|---|---|---|" + ("---|" if args.recompute else "")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "recompute.json").write_text(json.dumps({"parallel": {"recompute": True}}))
        for length in sorted({length for _, length in cases}):
            subprocess.run(zoo("preprocess", "wizardcoder-tiny", "--input", str(SAMPLES), "--output",
                               str(work / f"d{length}.mindrecord"), "--seq-length", str(length)),
                           check=True, capture_output=True)
        def train_args(batch: int, length: int, run: str) -> list[str]:
            return ["wizardcoder-tiny", "--config", str(CONFIG), "--data", str(work / f"d{length}.mindrecord"),
                    "--mode", "pretrain", "--output-dir", str(work / run), "--max-steps", "2", "--batch-size",
                    str(batch), "--seq-length", str(length), "--save-steps", "1000"]

        for batch, length in cases:
            _, ours, _ = timed(zoo("train", *train_args(batch, length, f"run-{batch}x{length}")))
            _, hf, _ = timed([sys.executable, "-c", HF_STEP, str(CONFIG), str(batch), str(length)])
            plan = training_plan(config, "fp32", batch, length).total / GIB
            lines.append(f"| {batch} × {length} | {plan:.2f} GiB | {ours:.2f} GiB | {plan / ours:.2f}× | "
                         f"{hf:.2f} GiB | {ours / hf:.2f}× |")
            if args.recompute:
                _, rc, _ = timed(zoo("train", *train_args(batch, length, f"rc-{batch}x{length}"), "--spec",
                                     str(work / "recompute.json")))
                lines[-1] += f" {rc:.2f} GiB |"
            print(json.dumps({"batch": batch, "length": length, "plan_gib": plan, "zoo_gib": ours, "hf_gib": hf}),
                  file=sys.stderr, flush=True)
        batch, length = cases[0]
        seen = phases(train_args(batch, length, "run-phases"))
    weights = config.num_parameters() * 4 / GIB
    label = {"accumulate": "forward + backward", "adamw": "AdamW update"}
    steps = ", ".join(f"{label[name]} +{now - before:.2f} GiB"
                      for (_, before), (name, now) in zip(seen, seen[1:], strict=False))
    table = f"tiny_starcoder ({config.num_parameters() / 1e6:.0f}M parameters, {weights:.2f} GiB fp32)\n\n" + \
        "\n".join(lines) + f"\n\nIn one `zoo train` process at {batch} × {length}: {seen[0][1]:.2f} GiB once the " \
        f"trainer is built (weights and optimizer state), then the first call of each graph: {steps}."
    append_results("Training memory: zoo train against its plan and HF", "python benchmarks/train_memory.py " +
                   " ".join(sys.argv[1:]), machine() + "; two optimizer steps, fp32, random init", table, [])


if __name__ == "__main__":
    main()
