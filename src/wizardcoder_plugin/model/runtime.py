"""MindSpore start-up done once: GRAPH_MODE, quiet logs, no files in the user's cwd, interrupts that wait for its
import and its compiles; finding weights; model construction (compiled graphs: compile_cache.py)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from registry_spec.errors import InputError, WeightsUnavailableError

from .config import GPTBigCodeConfig

if TYPE_CHECKING:
    from .modeling import GPTBigCodeForCausalLM

RANDOM_INIT_OK = {"wizardcoder-tiny"}  # demo/test model: random weights are its documented default


@lru_cache(maxsize=1)
def init_mindspore() -> ModuleType:
    os.environ.setdefault("GLOG_v", "3")
    os.environ.setdefault("GLOG_logtostderr", "1")
    # graph-compile failures dump analyze_fail.ir under $MS_OM_PATH (default: ./rank_0 in the user's cwd)
    os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), f"zoo-mindspore-{os.getuid()}"))
    # MindSpore's own switch would file every graph of the process (timing probes too) by position, out of step with
    # the sequences compile_cache.py keeps: later runs would load the wrong graphs
    from .compile_cache import CACHE_ENV

    if [os.environ.pop(k) for k in CACHE_ENV if k in os.environ]:
        print("note: MS_COMPILER_CACHE_ENABLE/PATH are ignored: zoo keeps its own compile cache (ZOO_COMPILE_CACHE; "
              "0 turns it off)", file=sys.stderr)
    with interrupts_deferred("MindSpore loads"):  # interrupted half-way, its exit handlers abort the process
        import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    return ms


@contextmanager
def interrupts_deferred(what: str) -> Iterator[list[int]]:
    """Ctrl-C or SIGTERM while `what` runs takes effect when it ends (a second one at once). MindSpore's parser runs
    Python during a graph compile and reports an interrupt raised there as a failed compile (pages of [ERROR] trace
    on stderr, an analyze_fail.ir); an `import mindspore` interrupted half-way leaves exit handlers that abort the
    process. Only the main thread receives signals, so elsewhere this does nothing. Yields the signals held back
    so far (a loop can stop early at a point of its choosing)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    pending: list[int] = []

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def deliver(signum: int) -> None:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)  # Python's KeyboardInterrupt, the CLI's Terminated
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def record(signum: int, _frame: object) -> None:
        if pending:  # asked twice: now, trace and all (and not again on the way out)
            pending.clear()
            restore()
            deliver(signum)
            return
        pending.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after {what} (again to stop now)", file=sys.stderr,
              flush=True)

    for s in signals:
        signal.signal(s, record)
    try:
        yield pending
    finally:
        restore()
        if pending:
            deliver(pending[0])


def weights_search_paths(model: str) -> list[Path]:
    roots = [os.environ.get("ZOO_WEIGHTS_DIR"), str(Path.home() / ".cache" / "zoo" / "weights")]
    return [Path(r) / model for r in roots if r]


def find_weights(model: str, weights: Path | None, allow_random: bool = False) -> Path | None:
    """The explicit --weights, else a default location; None means random init (the tiny model, or pretraining
    from scratch)."""
    if weights is not None:
        if not Path(weights).exists():
            raise WeightsUnavailableError(f"weights for {model!r}", [str(weights)])
        return Path(weights)
    candidates = weights_search_paths(model)
    for c in candidates:
        if c.exists():
            return c
    if model in RANDOM_INIT_OK or allow_random:
        return None
    raise WeightsUnavailableError(f"weights for {model!r}", [str(c) for c in candidates],
                                  f"convert the HF checkpoint (`zoo convert {model} --input HF_DIR --output "
                                  f"{candidates[-1]}/model.safetensors`) or pass --weights")


def build_model(model: str, config: GPTBigCodeConfig, weights: Path | None, precision: str = "fp32",
                seed: int = 0, allow_random: bool = False, map_files: bool = True) -> GPTBigCodeForCausalLM:
    """A GPTBigCodeForCausalLM with its weights loaded (or seeded random init for the tiny model); `map_files`:
    parameters over the file's pages (inference) rather than copies (training writes every one)."""
    if precision == "fp32":  # the native kernels' compiler runs while MindSpore starts (once per machine)
        from ..kernels import prebuild

        prebuild()
    ms = init_mindspore()
    from ..compat.mindformers import register_if_loaded
    from ..weights import collect, load_into
    from .modeling import GPTBigCodeForCausalLM

    register_if_loaded()
    if precision == "bf16" and ms.get_context("device_target") == "CPU":
        raise InputError("bf16 compute is not supported by MindSpore's CPU kernels",
                         "use --precision fp32 or fp16 on CPU (bf16 runs on Ascend)")
    ms.set_seed(seed)
    source = find_weights(model, weights, allow_random)
    if source is None:
        print(f"note: no weights given for {model}: using a random init (seed {seed})", file=sys.stderr)
        net = GPTBigCodeForCausalLM(config, precision)
    else:
        from mindspore.nn.utils import no_init_parameters

        loaders = collect(source, config)  # names and shapes checked before anything big is allocated
        with no_init_parameters():  # no random init the checkpoint would overwrite (30 s at 1B parameters)
            net = GPTBigCodeForCausalLM(config, precision)
        load_into(net, loaders, map_files)
    net.set_train(False)
    return net


def save_random_init(model: str, config: GPTBigCodeConfig, path: Path, seed: int = 0) -> Path:
    """Write the seeded random init of `model` as a MindSpore .safetensors checkpoint, atomically."""
    from registry_spec.atomic import atomic_path

    from ..weights import save_params

    with atomic_path(path) as tmp:
        save_params(build_model(model, config, None, seed=seed).get_parameters(), tmp)
    return path
