"""Timing-based choices — which implementation runs a given shape fastest on this machine — made once and cached
next to the kernel build cache (`choices.json` in `$ZOO_KERNEL_CACHE`), so later runs time nothing and pick what
the first one picked. The key names the kernel build (source, compiler, flags, CPU), the thread count and the
shape, so another machine or build times afresh.

Cached here: the LM head's layout per batch size (`head_layout`, inference: same tokens either way) and the
trainer's linear layers' backward (`choose_backwards`). It changes results in the last bits
(the native backward sums in another order than MindSpore's), so a run also records the choices it used and a
resume reuses those (`training/trainer.py`): the cache only makes runs that start afresh on one machine agree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cache_dir

if TYPE_CHECKING:
    from ..model.modeling import GPTBigCodeForCausalLM
    from . import NativeKernels


def fastest_call(cells: Mapping[Any, Callable], args: tuple, rounds: int = 4, calls: int = 4,
                 budget_s: float | None = None) -> dict[Any, float]:
    """Each cell's fastest single call `cell(*args)` (seconds) over blocks of calls, the cells taking turns block by
    block in an order that flips every round: the minimum resists the noise of a shared machine, blocks keep one
    cell's weights warm while it is timed, and the flip keeps either from always following the other.
    `budget_s`: after the first two rounds (one each way), a round starts only if it should end within the
    budget, so a probe of large cells (a 1B model's LM head: ~36 ms a call) stops at two rounds while small ones
    take all `rounds`."""

    def call(cell: Callable) -> None:
        out = cell(*args)
        (out[0] if isinstance(out, tuple) else out).asnumpy()  # waits for the graph

    from ..model.runtime import interrupts_deferred

    best = {name: float("inf") for name in cells}
    with interrupts_deferred("the kernel probes compile"):
        for cell in cells.values():
            call(cell)  # compiles
    order = list(cells.items())
    start = time.perf_counter()
    for done in range(rounds):
        elapsed = time.perf_counter() - start
        if budget_s is not None and done >= 2 and elapsed * (done + 1) / done > budget_s:
            break
        for name, cell in order:
            call(cell)
            for _ in range(calls):
                t0 = time.perf_counter()
                call(cell)
                best[name] = min(best[name], time.perf_counter() - t0)
        order.reverse()
    return best


def _path() -> Path:
    return cache_dir() / "choices.json"


def cached() -> dict[str, str]:
    """Every cached choice ({} when the cache is missing, unreadable or torn)."""
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(new: dict[str, str]) -> None:
    """Add choices to the cache (atomically; an unwritable cache is skipped: the next run times again)."""
    from registry_spec.atomic import write_json

    if not new:
        return
    try:
        write_json(_path(), cached() | new)
    except OSError:
        pass


def build_tag(native: NativeKernels | None) -> str:
    """The part of a choice's key that names the kernels it was timed with (build and thread count)."""
    if native is None:
        return "mindspore"
    return f"{native.library.stem}/threads{native.threads}"


HEAD_PROBE_BUDGET_S = 1.5  # seconds of a cold start's head probe beyond its compiles (two rounds at least)
LARGE_HEAD_BYTES = 64 * 2**20  # a head this large is memory-bound on any placement of its small buffers
NATIVE_BLOCKS_CREDIT = 1.2  # the native head may be this much slower and still win: its blocks are faster


def head_layout(model: GPTBigCodeForCausalLM, batch: int, candidates: list[str], native: NativeKernels | None,
                transposed: Callable[[], object]) -> str:
    """The LM head for `batch`-row decoding among `candidates` (native, tied, transposed: the same products):
    cached, else timed. A small head is timed on two compiled instances per candidate (one instance's speed can be
    off for its lifetime: buffer placement), a large one, whose calls stream the head from memory whatever the
    buffers' placement, on one instance with two calls a round (a 1B head's probe: RESULTS.md)."""
    import mindspore as ms
    import numpy as np

    from ..model.inference import LMHeadCell

    wte = model.transformer.wte.weight
    key = f"{build_tag(native)}/head_layout/{wte.shape}/b{batch}/{wte.dtype}/{'+'.join(candidates)}"
    if (known := cached().get(key)) in candidates:  # timed by an earlier run: a warm start probes nothing
        return known
    hidden = ms.Tensor(np.random.default_rng(0).standard_normal((batch, wte.shape[1]), dtype=np.float32),
                       dtype=wte.dtype)
    large = wte.size * wte.itemsize > LARGE_HEAD_BYTES
    cells = {(name, i): LMHeadCell(model, transposed() if name == "transposed" else None,
                                   native.linear if name == "native" else None)
             for name in candidates for i in range(1 if large else 2)}
    timed = fastest_call(cells, (hidden,), calls=2 if large else 4, budget_s=HEAD_PROBE_BUDGET_S)
    best = {name: min(t for (n, _), t in timed.items() if n == name) for name in candidates}
    if "transposed" in best and best["transposed"] >= 0.9 * best.get("tied", float("inf")):
        del best["transposed"]  # only a clear win pays for the copy's memory
    if "native" in best:  # the native blocks come with it, faster than MindSpore's (RESULTS.md)
        best["native"] /= NATIVE_BLOCKS_CREDIT
    winner = min(best, key=best.__getitem__)
    remember({key: winner})
    return winner


BACKWARDS = ("mindspore", "chunked", "native")


def choose_backwards(model: GPTBigCodeForCausalLM, rows: int, native: NativeKernels | None,
                     recorded: dict[str, str] | None = None, min_features: int = 2048,
                     agree: Callable[[dict], dict] | None = None) -> dict[str, str]:
    """On CPU, the backward of each linear shape: MindSpore's, `ChunkedBackwardDense(2)` (shapes of at least
    `min_features` inputs; identical results) or `NativeBackwardDense` (`native` kernels, fp32 weights; fp32 with
    another summation order). The layers of each shape get, in this order of precedence: the `recorded` choice (a
    resumed run's, where it can be honoured here), the machine's cached choice (kernels.choices), or the fastest
    of one timed forward+backward on `rows` random rows (an alternative must win by >= 10%), which is then cached.
    `agree` (data parallel) makes every rank take rank 0's picks. {"NxK": choice} for every shape with a choice."""
    import mindspore as ms
    import numpy as np

    from ..model.modeling import ChunkedBackwardDense, Dense, DenseGrad, Linear
    from .cells import NativeBackwardDense

    if ms.get_context("device_target") != "CPU":
        return {}
    layers: dict[str, list] = {}
    for _, cell in model.cells_and_names():
        if isinstance(cell, Linear):
            layers.setdefault("x".join(map(str, cell.weight.shape)), []).append(cell)
    make: dict[str, Callable[[], Any]] = {"chunked": lambda: ChunkedBackwardDense(2)}
    if native is not None:
        backward = native.linear_backward
        make["native"] = lambda: NativeBackwardDense(backward)
    options = {}
    for shape, cells in layers.items():
        k, dtype = cells[0].weight.shape[1], cells[0].weight.dtype
        names = [n for n, ok in (("chunked", k >= min_features), ("native", native is not None and
                                                                    dtype == ms.float32)) if ok]
        if names:
            options[shape] = names
    honoured = {shape: c for shape, c in (recorded or {}).items()
                if shape in options and (c == "mindspore" or c in options[shape])}
    keys = {shape: f"{build_tag(native)}/linear_backward/{shape}/rows{rows}/{layers[shape][0].weight.dtype}"
            for shape in options if shape not in honoured}
    rng = np.random.default_rng(0)

    def time_them(shapes: list[str]) -> dict[str, str]:
        picked = {}
        for shape in shapes:
            (n, k), dtype = layers[shape][0].weight.shape, layers[shape][0].weight.dtype
            args = tuple(ms.Tensor(rng.standard_normal(dims, dtype=np.float32), dtype=dtype)
                         for dims in ((rows, k), (n, k), (n,), (rows, n)))
            cells = {"mindspore": DenseGrad(Dense())} | {name: DenseGrad(make[name]()) for name in options[shape]}
            best = fastest_call(cells, args, rounds=2, calls=2)
            winner = min(options[shape], key=lambda name: best[name])
            picked[shape] = winner if best[winner] < 0.9 * best["mindspore"] else "mindspore"
        return picked

    known = cached()
    chosen = honoured | {shape: known[key] for shape, key in keys.items() if key in known}
    missing = [shape for shape in keys if shape not in chosen]
    chosen |= time_them(missing)
    if agree is not None:
        chosen = agree(chosen)
    remember({keys[shape]: chosen[shape] for shape in missing})  # after agreeing: what this run used
    for shape, choice in chosen.items():
        for cell in layers[shape]:
            cell.dense = make[choice]() if choice != "mindspore" else None
    return dict(sorted(chosen.items()))


def rank0_choices(chosen: dict[str, str], rank: int) -> dict[str, str]:
    """Every data-parallel rank takes rank 0's backward choices (its own timing could differ)."""
    import numpy as np
    from mindspore import Tensor, ops

    shapes = sorted(chosen)
    codes = np.array([BACKWARDS.index(chosen[s]) if rank == 0 else 0 for s in shapes], np.float32)
    agreed = ops.AllReduce()(Tensor(codes)).asnumpy()
    return {s: BACKWARDS[round(float(c))] for s, c in zip(shapes, agreed, strict=True)}
