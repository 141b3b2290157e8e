"""MindSpore's compile cache, used the way it actually works.

MindSpore 2.9 (`compile_cache_manager.cc`) fixes the cache folder at a process's first cache-enabled compile
(later changes of `MS_COMPILER_CACHE_PATH` are ignored) and files the n-th cache-enabled graph of the process as
`compile_cache_{n}.mindir`, trusting the position: the n-th graph of a later run is loaded from it whatever it is,
after one check that the entry script is unchanged. A folder therefore holds one *sequence* of graphs. Here the
folder is keyed by the process's first graph, and a manifest beside it lists the keys of the graphs in order; a
graph takes the cache only when its key is the one at the process's next position (loaded), or the sequence ends
there (compiled and appended). Any other graph compiles without the cache, which consumes no position; so does
a graph whose cell holds parameters it does not list (a loaded graph binds only listed ones). Concurrent runs
take turns on a folder (flock)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry_spec.atomic import atomic_path

if TYPE_CHECKING:
    from mindspore.nn import Cell

CACHE_ENV = ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH")  # MindSpore's switch, set per compile here
MANIFEST = "graphs.txt"  # one graph key per line, in the order MindSpore numbered them


def compile_cache_root() -> Path | None:
    """$ZOO_COMPILE_CACHE (0 or off: no cache), else ~/.cache/zoo/compile."""
    value = os.environ.get("ZOO_COMPILE_CACHE", "")
    if value.lower() in ("0", "off", "false", "no"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "zoo" / "compile"


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """What a compiled graph depends on besides its key: this plugin's sources, MindSpore and Python."""
    import mindspore as ms

    h = hashlib.sha256(f"{ms.__version__}|{sys.version}".encode())
    for f in sorted(Path(__file__).parents[1].rglob("*.py")):  # the whole plugin package
        h.update(f.read_bytes())
    return h.hexdigest()


def graph_key(cell: Cell, args: tuple, key: dict) -> str:
    """`key` (configuration, kernel build, ...) with the code, the cell's type, its inputs' and parameters' shapes
    and dtypes."""
    params = [(p.name, tuple(p.shape), str(p.dtype)) for p in cell.get_parameters()]
    shapes = [(tuple(a.shape), str(a.dtype)) for a in args]
    blob = json.dumps([_code_digest(), type(cell).__name__, key, shapes, params], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def unlisted_parameters(cell: Cell) -> list[str]:
    """Parameters a cell (or a sub-cell) holds in a plain tuple or list: a graph compiled fresh finds them, one
    loaded from the cache binds only the parameters the cell lists (`get_parameters`) and would read unset memory
    for these."""
    from mindspore import Parameter

    listed = {id(p) for p in cell.get_parameters()}
    return [v.name for _, c in cell.cells_and_names() for held in vars(c).values() if isinstance(held, tuple | list)
            for v in held if isinstance(v, Parameter) and id(v) not in listed]


def _prune(root: Path, days: float = 30) -> None:
    """Drop folders no run has used for `days` (every code change keys new ones)."""
    cutoff = time.time() - days * 86400
    for old in root.glob("*/"):
        if old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


class _Session:
    """This process's folder (fixed by its first cached graph, as MindSpore fixes it) and its position in it."""

    folder: Path | None = None
    position = 0
    broken = False  # a cached compile failed: MindSpore's position is unknown, so no more cache in this process


def _open(root: Path, first: str) -> Path:
    folder = root / first
    if not folder.exists():
        _prune(root)
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)  # last use, for _prune
    script = folder / "key.py"
    if not script.exists():  # the entry script MindSpore hashes: the same file for every graph of the folder
        with atomic_path(script) as tmp:
            tmp.write_text(f"# zoo compile cache, sequence starting with {first}\n")
    return folder


def _with_cache(cell: Cell, args: tuple, folder: Path) -> None:
    from mindspore.graph import api

    entry = getattr(api, "entry_script_path", None)
    # MindSpore hashes the entry script and what it imports into the cache's validity; its import walk fails on
    # relative imports (`python -m registry_spec.cli`), and the graph keys already name the code
    api.entry_script_path = str(folder / "key.py")
    os.environ.update({"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": str(folder)})
    try:  # only this compile: init_mindspore removed any value of the user's
        cell.compile(*args)
    finally:
        api.entry_script_path = entry
        for k in CACHE_ENV:
            os.environ.pop(k, None)


def compile_cell(cell: Cell, args: tuple, key: dict[str, Any]) -> None:
    """Compile `cell` for `args` (once per cell), loading it from MindSpore's compile cache when this process's
    sequence of graphs so far matches an earlier run's, else compiling it (and caching it where the sequence ends).
    An interrupt waits for the compile (`interrupts_deferred`)."""
    if getattr(cell, "zoo_compiled", False):
        return
    cell.zoo_compiled = True
    from .runtime import interrupts_deferred

    with interrupts_deferred("this graph compiles"):
        _compile(cell, args, key)


def _compile(cell: Cell, args: tuple, key: dict[str, Any]) -> None:
    from .runtime import init_mindspore

    init_mindspore()
    root = compile_cache_root()
    s = _Session
    if root is None or s.broken or unlisted_parameters(cell):
        cell.compile(*args)
        return
    digest = graph_key(cell, args, key)
    try:
        if s.folder is None:
            s.folder = _open(root, digest)
        lock = open(s.folder / ".lock", "w")  # noqa: SIM115 - held for the compile below
    except OSError as exc:  # an unwritable cache costs the compile time only
        print(f"note: compile cache {root} not usable ({exc.strerror}): compiling without it", file=sys.stderr)
        s.broken = True
        cell.compile(*args)
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = s.folder / MANIFEST
        graphs = manifest.read_text().split() if manifest.exists() else []
        if s.position < len(graphs) and graphs[s.position] != digest:
            cell.compile(*args)  # another run went on differently from here: its graph is not this one
            return
        try:
            _with_cache(cell, args, s.folder)
        except BaseException:
            s.broken = True
            raise
        if s.position == len(graphs):
            with atomic_path(manifest) as tmp:
                tmp.write_text("".join(f"{g}\n" for g in [*graphs, digest]))
        s.position += 1
