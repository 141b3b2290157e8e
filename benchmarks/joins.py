"""Rows joining a running batch on an exported, fixed-batch engine (what `zoo serve --backend onnx|mindir|lite`
runs): every join call runs the whole fixed-batch prefill graph, so `k` rows arriving together cost `k` full
prefills joined one a call, one when they join in one call (`Batch.admit`'s grouping). Both ways in one run, on
the same engine, alternating: the time from the admit to every row's first token being ready, median of the
repeats. The graphs are exported here first (`zoo export`). Results are appended to RESULTS.md.

    python benchmarks/joins.py [--shapes tiny,tiny_starcoder] [--backend onnx] [--rows 2,8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append_results, machine
from serve import SEQ_LENGTH, SHAPES  # the served shapes, and the server's rows
from startup import zoo

SLOTS = 8  # benchmarks/serve.py's default --slots
PROMPT_LEN = 40


def export(shape: str, backend: str, out: Path) -> Path:
    subprocess.run(zoo("export", "wizardcoder-tiny", *SHAPES[shape], "--backend", backend, "--output-dir", str(out),
                       "--batch-size", str(SLOTS), "--seq-length", str(SEQ_LENGTH)),
                   check=True, stdout=subprocess.DEVNULL)
    return out


def admit_ms(engine, rows: int, together: bool, rng_seed: int) -> float:
    """Milliseconds to admit `rows` rows into an open, otherwise idle batch: in one `admit` or one a call."""
    import numpy as np

    from registry_spec.generation import Batch, GenerationConfig, Row

    rng = np.random.default_rng(rng_seed)
    batch = Batch(engine, 10**6, 0, SLOTS, SEQ_LENGTH)
    batch.open()
    new = [Row(rng.integers(1, 1000, PROMPT_LEN).tolist(), GenerationConfig(max_new_tokens=1), rng)
           for _ in range(rows)]
    t0 = time.perf_counter()
    if together:
        batch.admit(new)
    else:
        for row in new:
            batch.admit([row])
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,tiny_starcoder")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--rows", default="2,8")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from wizardcoder_plugin.export.runner import ExportedEngine

    lines = ["| shape | rows joining | one a call, ms | in one call, ms | speed-up |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            engine = ExportedEngine(export(shape, args.backend, Path(tmp) / shape), args.backend)
            admit_ms(engine, 1, True, 0)  # warm-up: the runtime's first calls
            for rows in (int(r) for r in args.rows.split(",")):
                times: dict[bool, list[float]] = {False: [], True: []}
                for i in range(args.repeats):
                    for together in ((False, True) if i % 2 else (True, False)):
                        times[together].append(admit_ms(engine, rows, together, i))
                apart, joined = statistics.median(times[False]), statistics.median(times[True])
                lines.append(f"| {shape} | {rows} | {apart:.1f} | {joined:.1f} | {apart / joined:.2f}× |")
                print(lines[-1], flush=True)
    append_results(f"Joins into a running batch on an exported engine ({args.backend})",
                   " ".join(["python benchmarks/joins.py", *sys.argv[1:]]),
                   machine() + f"; {SLOTS}-row graphs, seq_length {SEQ_LENGTH}, {PROMPT_LEN}-token prompts, "
                   f"median of {args.repeats}, the two ways alternating", "\n".join(lines), [])


if __name__ == "__main__":
    main()
