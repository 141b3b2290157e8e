"""The compile cache against MindSpore's real semantics: one folder per process, graphs filed by their position in
the process's sequence. Each run is its own process (MindSpore fixes the folder once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, sys
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from wizardcoder_plugin.model.compile_cache import _Session, compile_cell

class Affine(nn.Cell):
    '''x @ w * s, with s held in a ParameterTuple (listed) or a plain tuple (not listed).'''
    def __init__(self, k, n, seed, plain):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.w = Parameter(Tensor(rng.standard_normal((k, n)).astype(np.float32)), name=f"w{k}x{n}")
        s = Parameter(Tensor(rng.standard_normal((n,)).astype(np.float32)), name=f"s{k}x{n}")
        self.s = (s,) if plain else ParameterTuple([s])
    def construct(self, x):
        return ops.matmul(x, self.w) * self.s[0]

seed, out = int(sys.argv[1]), []
for spec in sys.argv[2:]:
    k, n = map(int, spec.rstrip("p").split("x"))
    cell = Affine(k, n, seed + k * 100 + n, spec.endswith("p"))
    x = Tensor(np.arange(2 * k, dtype=np.float32).reshape(2, k) / k)
    compile_cell(cell, (x,), {"test": 1})
    want = x.asnumpy() @ cell.w.asnumpy() * cell.s[0].asnumpy()
    out.append(bool(np.allclose(cell(x).asnumpy(), want, rtol=1e-5, atol=1e-5)))
print(json.dumps({"ok": out, "position": _Session.position}))
"""


def run(cache: Path, seed: int, *graphs: str, **extra: str) -> dict:
    script = cache.parent / "graphs.py"  # MindSpore parses a cell's source: not from `python -c`
    script.write_text(SCRIPT)
    env = {**os.environ, "ZOO_COMPILE_CACHE": str(cache), **extra}
    r = subprocess.run([sys.executable, str(script), str(seed), *graphs], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def files(cache: Path) -> dict[str, float]:
    return {str(p.relative_to(cache)): p.stat().st_mtime for p in cache.rglob("*.mindir")}


def test_a_process_loads_the_graphs_an_earlier_one_cached_in_the_same_order(tmp_path):
    cache = tmp_path / "compile"
    assert run(cache, 0, "4x8", "8x16") == {"ok": [True, True], "position": 2}
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    manifest = (folder / "graphs.txt").read_text().split()
    cached = files(cache)
    assert len(manifest) == 2 and len(cached) == 2
    # other weights of the same shapes: the loaded graphs read the new parameters, and nothing is recompiled
    assert run(cache, 1, "4x8", "8x16") == {"ok": [True, True], "position": 2}
    assert files(cache) == cached
    # a graph the folder's sequence does not hold at this position compiles without the cache (no position
    # taken); the next graph still loads from position 1
    assert run(cache, 2, "4x8", "8x32", "8x16") == {"ok": [True, True, True], "position": 2}
    assert files(cache) == cached and (folder / "graphs.txt").read_text().split() == manifest
    # at the sequence's end a new graph is compiled and appended
    assert run(cache, 3, "4x8", "8x16", "8x32") == {"ok": [True, True, True], "position": 3}
    assert (folder / "graphs.txt").read_text().split()[:2] == manifest and len(files(cache)) == 3
    # another first graph: another folder
    assert run(cache, 4, "4x16")["ok"] == [True]
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_a_graph_with_parameters_the_cache_cannot_bind_compiles_without_it(tmp_path):
    cache = tmp_path / "compile"
    for seed in (0, 1):
        assert run(cache, seed, "4x8p") == {"ok": [True], "position": 0}
    assert not files(cache)


def test_mindspores_own_cache_switch_does_not_shift_the_positions(tmp_path):
    """MS_COMPILER_CACHE_ENABLE in the user's environment would make MindSpore file the graphs compiled without
    the cache too (taking positions): it is ignored, and the sequence still loads in order."""
    cache, theirs = tmp_path / "compile", str(tmp_path / "theirs")
    env = {"MS_COMPILER_CACHE_ENABLE": "1", "MS_COMPILER_CACHE_PATH": theirs}
    assert run(cache, 0, "4x8", "8x16", **env) == {"ok": [True, True], "position": 2}
    cached = files(cache)
    assert run(cache, 1, "4x8", "8x32", "8x16", **env) == {"ok": [True, True, True], "position": 2}
    assert files(cache) == cached and len(cached) == 2 and not Path(theirs).exists()


class _InterruptedCompile:
    """A cell whose compile is interrupted half-way (as Ctrl-C lands inside MindSpore's parser)."""

    def __init__(self, signum: int) -> None:
        self.signum, self.finished = signum, False

    def compile(self, *args: object) -> None:
        os.kill(os.getpid(), self.signum)
        self.finished = True  # reached: the interrupt did not land inside the compile


def test_an_interrupt_during_a_compile_waits_for_it(monkeypatch, capsys):
    import signal

    from wizardcoder_plugin.model.compile_cache import compile_cell

    monkeypatch.setenv("ZOO_COMPILE_CACHE", "0")
    before = signal.getsignal(signal.SIGINT)
    cell = _InterruptedCompile(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        compile_cell(cell, (), {})
    assert cell.finished and "SIGINT: stopping after this graph compiles" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def test_deferred_interrupts_raise_what_the_handler_would_and_a_second_one_at_once():
    import signal

    from registry_spec.cli import Terminated, _terminate
    from wizardcoder_plugin.model.runtime import interrupts_deferred

    previous = signal.signal(signal.SIGTERM, _terminate)  # the CLI's: SIGTERM unwinds like Ctrl-C
    try:
        reached = []
        with pytest.raises(Terminated):
            with interrupts_deferred("work") as pending:
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("after the signal")
                assert pending == [signal.SIGTERM]  # what a loop checks to stop at a point of its choosing
        assert reached == ["after the signal"]
        with pytest.raises(KeyboardInterrupt) as exc:
            with interrupts_deferred("work"):
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)  # asked twice: raised here, and the first not again
                reached.append("after the second")
        assert not isinstance(exc.value, Terminated) and exc.value.__context__ is None
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGTERM) is _terminate
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_deferring_interrupts_off_the_main_thread_does_nothing():
    import threading

    from wizardcoder_plugin.model.runtime import interrupts_deferred

    ran: list[BaseException | None] = []

    def work() -> None:
        try:
            with interrupts_deferred("work"):  # signal.signal would raise ValueError here
                ran.append(None)
        except BaseException as exc:  # noqa: BLE001
            ran.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert ran == [None]
