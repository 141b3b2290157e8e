"""MindSpore Lite from Python 3.11: the Python 3.7 environment with mindspore-lite 2.0.0 (created on request), the
ONNX fix-ups its converter needs, and a client for `lite_worker.py` running in that interpreter.

`python -m wizardcoder_plugin.export.lite_runtime setup` creates the environment (about 20 s, 560 MB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from registry_spec.errors import BackendUnavailableError, InputError

from .lite_worker import read_array, write_array

LITE_VERSION = "2.0.0"
WORKER = Path(__file__).with_name("lite_worker.py")
INSTALL_HINT = "python -m wizardcoder_plugin.export.lite_runtime setup   (or ZOO_LITE_PYTHON=/path/to/python3.7)"


def default_env() -> Path:
    return Path(os.environ.get("ZOO_LITE_ENV", Path.home() / ".cache" / "zoo" / f"mindspore-lite-{LITE_VERSION}"))


def lite_python() -> Path:
    """The interpreter that imports mindspore_lite, or BackendUnavailableError naming the install step."""
    explicit = os.environ.get("ZOO_LITE_PYTHON")
    candidate = Path(explicit) if explicit else default_env() / "bin" / "python"
    if not candidate.is_file():
        raise BackendUnavailableError("lite", f"no MindSpore Lite interpreter at {candidate}", INSTALL_HINT)
    probe = subprocess.run([str(candidate), "-c", "import mindspore_lite"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise BackendUnavailableError("lite", f"{candidate} cannot import mindspore_lite: "
                                      f"{probe.stderr.strip().splitlines()[-1:]}", INSTALL_HINT)
    return candidate


def find_python37() -> str:
    """A working Python 3.7: pyenv's installs first (its PATH shims may exist without being active), then PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [str(v / "bin" / "python") for v in sorted(pyenv.glob("3.7*"), reverse=True)]
    candidates += [c for c in (shutil.which("python3.7"),) if c]
    for c in candidates:
        ok = subprocess.run([c, "-c", "import sys; assert sys.version_info[:2] == (3, 7)"], capture_output=True)
        if ok.returncode == 0:
            return c
    raise BackendUnavailableError("lite", "mindspore-lite 2.0.0 needs Python 3.7 and none was found",
                                  "`pyenv install 3.7`, then `python -m wizardcoder_plugin.export.lite_runtime setup`")


def setup(env: Path | None = None) -> Path:
    """Create the Python 3.7 environment with mindspore-lite (idempotent)."""
    env = env or default_env()
    python = env / "bin" / "python"
    if python.is_file() and subprocess.run([str(python), "-c", "import mindspore_lite"]).returncode == 0:
        return python
    subprocess.run([find_python37(), "-m", "venv", "--clear", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"mindspore-lite=={LITE_VERSION}"], check=True)
    return python


# ----------------------------------------------------------------------------------------------- ONNX fix-ups
def prepare_onnx_for_lite(src: Path, dst: Path) -> None:
    """Rewrite ReduceSumSquare as Mul + ReduceSum: Lite 2.0's CPU ReduceSumSquare squares its input in place,
    which corrupts the LayerNorm that reads the same tensor afterwards."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    nodes = []
    for node in model.graph.node:
        if node.op_type != "ReduceSumSquare":
            nodes.append(node)
            continue
        sq = node.output[0] + "_squared"
        nodes.append(helper.make_node("Mul", [node.input[0], node.input[0]], [sq], name=node.name + "_mul"))
        nodes.append(helper.make_node("ReduceSum", [sq, *node.input[1:]], list(node.output), name=node.name + "_sum",
                                      **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


# ---------------------------------------------------------------------------------------------------- client
class LiteWorker:
    """One Python 3.7 process holding the loaded Lite models."""

    def __init__(self, python: Path | None = None) -> None:
        self.proc = subprocess.Popen([str(python or lite_python()), str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "GLOG_v": "3"})

    def call(self, header: dict, arrays: tuple[np.ndarray, ...] = ()) -> list[np.ndarray]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(header | {"n_arrays": len(arrays)}) + "\n").encode())
        for a in arrays:
            write_array(self.proc.stdin, a)
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
            raise BackendUnavailableError("lite", f"the Lite worker exited: {err.strip()}", INSTALL_HINT)
        reply = json.loads(line)
        outs = [read_array(self.proc.stdout) for _ in range(reply["n_arrays"])]
        if not reply["ok"]:
            raise InputError(f"MindSpore Lite failed on {header['op']}: {reply['error']}",
                             "re-export the model; see the worker's message")
        return outs

    def convert(self, onnx_path: Path, output: Path) -> Path:
        self.call({"op": "convert", "onnx": str(onnx_path), "output": str(output)})
        return output.with_name(output.name + ".mindir")

    def load(self, name: str, path: Path) -> None:
        self.call({"op": "load", "name": name, "path": str(path)})

    def run(self, name: str, *arrays: np.ndarray) -> list[np.ndarray]:
        return self.call({"op": "run", "name": name}, arrays)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call({"op": "exit"})
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.proc.wait(timeout=10)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        sys.exit("usage: python -m wizardcoder_plugin.export.lite_runtime setup")
    try:
        print(setup())
    except (BackendUnavailableError, subprocess.CalledProcessError) as exc:
        sys.exit(f"error: {exc}")
