"""Training throughput: this plugin's train step (GRAPH mode, AdamW in-graph) against HF transformers + torch
AdamW on the same batches, same machine; appended to RESULTS.md.

HF runs in a spawned process of its own (PyTorch and MindSpore thread pools in one process slow each other), one
engine after the other, both on the same rows.

    python benchmarks/training.py [--config tiny_starcoder.json] [--batch-size 8] [--seq-length 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_results, machine

from wizardcoder_plugin.config import PRESETS, load_config
from wizardcoder_plugin.preprocess import write_mindrecord
from wizardcoder_plugin.run_config import TrainSettings
from wizardcoder_plugin.train import Trainer


def rows(n: int, width: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(1, 49000, size=width).astype(np.int32)
        out.append((ids, ids.copy()))
    return out


def ours(config, data: Path, work: Path, batch: int, steps: int) -> list[float]:
    times: list[float] = []
    s = TrainSettings(data=data, mode="pretrain", output_dir=work / "ours", max_steps=steps, batch_size=batch,
                      learning_rate=1e-4)
    Trainer(s, config, "bench", config.pad_token_id, progress=False).train([lambda r: times.append(r["step_s"])])
    return times[1:]  # the first step compiles


def hf(config, data_rows: list, batch: int, steps: int) -> list[float]:
    import multiprocessing as mp

    from wizardcoder_plugin.bench import reference_threads

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(hf_steps, (config.to_hf_dict(), data_rows, batch, steps, reference_threads()))


def hf_steps(hf_config: dict, data_rows: list, batch: int, steps: int, threads: int) -> list[float]:
    from wizardcoder_plugin.bench import reference_torch

    torch = reference_torch(threads)
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**hf_config)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps):
        ids = torch.tensor(np.stack([r[0] for r in data_rows[i * batch:(i + 1) * batch]]), dtype=torch.long)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    config = load_config(a.config) if a.config else PRESETS["wizardcoder-tiny"]
    config = config.model_copy(update={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    data_rows = rows(a.batch_size * a.steps, a.seq_length + 1)
    # the run writes a full checkpoint (1.9 GB on the tiny_starcoder shape): gone when the script ends or fails
    with tempfile.TemporaryDirectory(prefix="zoo-train-bench-") as tmp:
        work = Path(tmp)
        data = work / "d.mindrecord"
        write_mindrecord(data, iter(data_rows), progress=False)
        mine = statistics.median(ours(config, data, work, a.batch_size, a.steps))
    ref = statistics.median(hf(config, data_rows, a.batch_size, a.steps))
    tokens = a.batch_size * a.seq_length
    table = ("| engine | step s (median) | tokens/s |\n|---|---|---|\n"
             f"| mindspore (this plugin) | {mine:.3f} | {tokens / mine:.0f} |\n"
             f"| hf-transformers + torch AdamW | {ref:.3f} | {tokens / ref:.0f} |\n")
    name = Path(a.config).name if a.config else "wizardcoder-tiny"
    rows_out = [{"backend": "online", "extra": {"step_speedup_vs_hf": round(ref / mine, 3)}}]
    append_results(f"Training: {name}, batch {a.batch_size} x {a.seq_length}",
                   "python benchmarks/training.py " + " ".join(sys.argv[1:]), machine(), table, rows_out)


if __name__ == "__main__":
    main()
