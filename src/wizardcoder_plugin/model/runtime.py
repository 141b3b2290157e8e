"""MindSpore start-up done once: GRAPH_MODE, quiet logs, no files in the user's cwd; model construction; graphs
compiled through a correctly keyed compile cache; timing compiled cells against each other."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from registry_spec.errors import InputError, WeightsUnavailableError

from .config import GPTBigCodeConfig

if TYPE_CHECKING:
    from mindspore.nn import Cell

    from .modeling import GPTBigCodeForCausalLM

RANDOM_INIT_OK = {"wizardcoder-tiny"}  # demo/test model: random weights are its documented default


@lru_cache(maxsize=1)
def init_mindspore() -> ModuleType:
    os.environ.setdefault("GLOG_v", "3")
    os.environ.setdefault("GLOG_logtostderr", "1")
    # graph-compile failures dump analyze_fail.ir under $MS_OM_PATH (default: ./rank_0 in the user's cwd)
    os.environ.setdefault("MS_OM_PATH", os.path.join(tempfile.gettempdir(), f"zoo-mindspore-{os.getuid()}"))
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    return ms


def compile_cache_root() -> Path | None:
    """$ZOO_COMPILE_CACHE (0 or off: no cache), else ~/.cache/zoo/compile."""
    value = os.environ.get("ZOO_COMPILE_CACHE", "")
    if value.lower() in ("0", "off", "false", "no"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "zoo" / "compile"


_CACHE_ENV = ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """What a compiled graph depends on besides its key: this plugin's sources, MindSpore and Python."""
    import hashlib

    import mindspore as ms

    h = hashlib.sha256(f"{ms.__version__}|{sys.version}".encode())
    for f in sorted(Path(__file__).parents[1].rglob("*.py")):  # the whole plugin package
        h.update(f.read_bytes())
    return h.hexdigest()


def _prune(root: Path, days: float = 30) -> None:
    """Drop graphs no run has used for `days` (every code change keys new ones)."""
    import shutil

    cutoff = time.time() - days * 86400
    for old in root.glob("*/"):
        if old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def compile_cell(cell: Cell, args: tuple, key: dict) -> None:
    """Compile `cell` for `args` (once) through MindSpore's compile cache, in a folder of its own per graph: MindSpore
    files cached graphs by the order a process compiles them and checks only the entry script for changes, so a
    shared folder hands a later run the wrong graph (seen: the prefill of another prompt length). `key` names
    everything else the graph depends on (configuration, shapes, kernel build); the cell's parameter names,
    shapes and dtypes are added here. Concurrent runs take turns on a folder (flock).

    Graphs with the native kernels (Custom aot ops) are compiled without the cache: loaded from it in a later
    process, they returned wrong tokens in some sequences (a machine's first run, with the kernels built and the
    head layout timed in it; tests/test_generate.py and the second plugin's conformance run reproduce it), and the
    cause inside MindSpore 2.9 is not known."""
    import fcntl
    import hashlib
    import json

    if getattr(cell, "zoo_compiled", False):
        return
    cell.zoo_compiled = True
    init_mindspore()
    root = compile_cache_root()
    native = getattr(cell, "native", None)  # the native kernels' build (library path, source, flags)
    if root is None or native is not None:
        cell.compile(*args)
        return
    params = [(p.name, tuple(p.shape), str(p.dtype)) for p in cell.get_parameters()]
    shapes = [(tuple(a.shape), str(a.dtype)) for a in args]
    blob = json.dumps([_code_digest(), type(cell).__name__, key, shapes, params], sort_keys=True, default=str)
    folder = root / hashlib.sha256(blob.encode()).hexdigest()[:24]
    try:
        if not folder.exists():
            _prune(root)
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # last use, for _prune
        lock = open(folder / ".lock", "w")  # noqa: SIM115 - held for the compile below
    except OSError as exc:  # an unwritable cache costs the compile time only
        print(f"note: compile cache {root} not usable ({exc.strerror}): compiling without it", file=sys.stderr)
        cell.compile(*args)
        return
    from mindspore.graph import api

    saved = {k: os.environ.get(k) for k in _CACHE_ENV}
    entry = getattr(api, "entry_script_path", None)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # MindSpore hashes the entry script and what it imports into the cache's validity; its import walk fails
        # on relative imports (`python -m registry_spec.cli`), and the key above already names the code
        (folder / "key.py").write_text(f"# {blob}\n")
        api.entry_script_path = str(folder / "key.py")
        os.environ.update({"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": str(folder)})
        try:  # MindSpore reads both at each compile (its set_context keys for them are deprecated)
            cell.compile(*args)
        finally:
            api.entry_script_path = entry
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


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
                seed: int = 0, allow_random: bool = False) -> GPTBigCodeForCausalLM:
    """A GPTBigCodeForCausalLM with its weights loaded (or seeded random init for the tiny model)."""
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
        load_into(net, loaders)
    net.set_train(False)
    return net


def save_random_init(model: str, config: GPTBigCodeConfig, path: Path, seed: int = 0) -> Path:
    """Write the seeded random init of `model` as a MindSpore .safetensors checkpoint, atomically."""
    from registry_spec.atomic import atomic_path

    from ..weights import save_params

    with atomic_path(path) as tmp:
        save_params(build_model(model, config, None, seed=seed).get_parameters(), tmp)
    return path
