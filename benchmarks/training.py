"""Training throughput: this plugin's train step (GRAPH mode, AdamW in-graph) against HF transformers + torch
AdamW on the same batches, same machine; appended to RESULTS.md.

HF runs in a spawned process of its own (PyTorch and MindSpore thread pools in one process slow each other); the
engines take turns step by step (ours, then HF's on the same rows), so a drift in the machine's speed reaches both.

    python benchmarks/training.py [--config tiny_starcoder.json] [--batch-size 8] [--seq-length 128] [--steps 6]
                                  [--settle-s 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_results, hf_train_step, machine

from wizardcoder_plugin.model.config import PRESETS, load_config
from wizardcoder_plugin.training.preprocess import write_mindrecord
from wizardcoder_plugin.training.run_config import TrainSettings
from wizardcoder_plugin.training.trainer import Trainer


def rows(n: int, width: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(1, 49000, size=width).astype(np.int32)
        out.append((ids, ids.copy()))
    return out


def hf_worker(conn, hf_config: dict, data_rows: list, batch: int, threads: int) -> None:
    """HF transformers + torch AdamW in a process of its own: builds the model, says "ready", then runs step i
    for each i it receives (the same rows as ours) and answers its time; None ends it."""
    from wizardcoder_plugin.generation.bench import reference_torch

    torch = reference_torch(threads)
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**hf_config)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    conn.send("ready")
    while (i := conn.recv()) is not None:
        ids = torch.tensor(np.stack([r[0] for r in data_rows[i * batch:(i + 1) * batch]]), dtype=torch.long)
        t0 = time.perf_counter()
        hf_train_step(model, opt, torch, ids)
        conn.send(time.perf_counter() - t0)


def interleaved(config, data: Path, data_rows: list, work: Path, batch: int, steps: int, settle_s: float
                ) -> tuple[list[float], list[float]]:
    """(our step times, HF's), step i of each back to back (ours, then HF's on the same rows), so both see the
    machine in the same state; the first step of each (compilation, warm-up) is dropped. `settle_s` of idle
    before each step: threads the other engine left spinning after its step (measured: HF's step ≈8% slower
    without it) have gone to sleep."""
    import multiprocessing as mp

    from wizardcoder_plugin.generation.bench import reference_threads

    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    worker = ctx.Process(target=hf_worker, args=(theirs, config.to_hf_dict(), data_rows, batch,
                                                 reference_threads()), daemon=True)
    worker.start()
    try:
        s = TrainSettings(data=data, mode="pretrain", output_dir=work / "ours", max_steps=steps, batch_size=batch,
                          learning_rate=1e-4)
        trainer = Trainer(s, config, "bench", config.pad_token_id, progress=False)
        if mine.recv() != "ready":
            raise RuntimeError("the HF worker did not start")
        ours, hf = [], []

        def after_our_step(row: dict) -> None:
            ours.append(row["step_s"])
            time.sleep(settle_s)
            mine.send(row["step"] - 1)
            hf.append(mine.recv())
            time.sleep(settle_s)

        trainer.train([after_our_step])
        mine.send(None)
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
    return ours[1:], hf[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--settle-s", type=float, default=1.0, help="idle seconds before each timed step")
    a = ap.parse_args()
    config = load_config(a.config) if a.config else PRESETS["wizardcoder-tiny"]
    config = config.model_copy(update={"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    data_rows = rows(a.batch_size * a.steps, a.seq_length + 1)
    # the run writes a full checkpoint (1.9 GB on the tiny_starcoder shape): gone when the script ends or fails
    with tempfile.TemporaryDirectory(prefix="zoo-train-bench-") as tmp:
        work = Path(tmp)
        data = work / "d.mindrecord"
        write_mindrecord(data, iter(data_rows), progress=False)
        ours, hf = interleaved(config, data, data_rows, work, a.batch_size, a.steps, a.settle_s)
    mine, ref = statistics.median(ours), statistics.median(hf)
    paired = statistics.median(h / o for o, h in zip(ours, hf, strict=True))
    tokens = a.batch_size * a.seq_length
    def steps(times: list[float]) -> str:
        return " ".join(f"{t:.2f}" for t in times)

    table = ("| engine | step s (median) | tokens/s | steps (s) |\n|---|---|---|---|\n"
             f"| mindspore (this plugin) | {mine:.3f} | {tokens / mine:.0f} | {steps(ours)} |\n"
             f"| hf-transformers + torch AdamW | {ref:.3f} | {tokens / ref:.0f} | {steps(hf)} |\n"
             f"\nMedian of the step-by-step ratios (HF step i / ours): {paired:.3f}\n")
    name = Path(a.config).name if a.config else "wizardcoder-tiny"
    rows_out = [{"backend": "online", "extra": {"step_speedup_vs_hf": round(ref / mine, 3),
                                                "paired_speedup_vs_hf": round(paired, 3)}}]
    append_results(f"Training: {name}, batch {a.batch_size} x {a.seq_length}",
                   "python benchmarks/training.py " + " ".join(sys.argv[1:]), machine(), table, rows_out)


if __name__ == "__main__":
    main()
