"""Running untrusted generated programs: one fresh interpreter per program, in an empty temporary folder, with
a wall-clock timeout, CPU/memory/file-size/process limits, a scrubbed environment, and the destructive parts of
`os`/`shutil`/`subprocess` disabled before the candidate runs (the guard OpenAI's human-eval applies).

This contains accidents of generated code, not a determined attacker: run evaluations of untrusted models in a
container or VM as well.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MEMORY_LIMIT = 2 << 30  # bytes of address space per program
_GUARD = """\
import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
              "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
              "chroot", "lchown", "chdir", "execv", "execve", "execvp", "spawnv", "popen"):
    setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_mod] = None
del _name, _mod
"""


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str = ""


def _limits(timeout: float) -> None:
    """Runs in the child before exec: its own process group and resource limits."""
    os.setsid()
    cpu = int(timeout) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, timeout: float = 3.0) -> Outcome:
    """Execute `program` in a sandboxed interpreter; passed = exit status 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="zoo-exec-") as cwd:
        path = os.path.join(cwd, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + "\n" + program + "\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", path], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: _limits(timeout))  # noqa: PLW1509 - limits must be set pre-exec
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome(False, "timeout", f"no exit within {timeout:g} s")
        finally:
            _kill_group(proc)  # children it may have left behind
        if proc.returncode == 0:
            return Outcome(True, "passed")
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return Outcome(False, "failed", lines[-1][:300] if lines else f"exit status {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(programs: list[str], timeout: float, workers: int, progress: bool = True) -> list[Outcome]:
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(lambda p: run_program(p, timeout), programs), total=len(programs),
                         desc="execute", unit="program", disable=not progress or None, leave=False))
