"""Running untrusted generated programs: one sandboxed interpreter per program (see `sandbox` for the modes and
`harness` for what runs inside), a wall-clock timeout, and a pass only when the harness reports that the test
code ran to its end (a per-run nonce on a channel of its own: exit statuses and output prove nothing).

The evaluator keeps at most a few KiB of what a program prints (stdout goes to /dev/null, the tail of stderr is
kept for the failure detail), so its memory stays flat whatever the programs do.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from registry_spec.errors import InputError

from .sandbox import CHOICES, INSTALL_HINT, MODES, Sandbox

__all__ = ["CHOICES", "MODES", "Outcome", "Sandbox", "resolve", "run_program", "run_programs"]

MEMORY_LIMIT = 2 << 30  # bytes of address space per program
LIMITS = {"AS": MEMORY_LIMIT, "FSIZE": 16 << 20, "NPROC": 64, "CORE": 0, "NOFILE": 256}
STDERR_KEEP = 4096
SYSTEM_FOLDERS = ("/usr", "/bin", "/lib", "/lib64", "/sbin", "/dev", "/proc")  # what the namespace modes show
HARNESS = (Path(__file__).with_name("harness.py")).read_text(encoding="utf-8")
_resolved: dict[str, Sandbox] = {}


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str = ""


class SandboxError(InputError):
    """The sandbox itself could not start a program (not the program's fault)."""


def resolve(choice: str = "auto") -> Sandbox:
    """The sandbox for `choice`: `auto` is the strongest mode that starts a program here; a named mode that
    cannot is refused with what is missing."""
    if choice not in CHOICES:
        raise InputError(f"unknown sandbox {choice!r}", f"use one of {', '.join(CHOICES)}")
    if choice in _resolved:
        return _resolved[choice]
    errors = []
    for mode in MODES if choice == "auto" else (choice,):
        box = Sandbox.create(mode)
        missing = box.missing()
        if missing:
            errors.append(f"{mode}: {', '.join(missing)} not found")
            continue
        try:
            probe = run_program("pass", 10.0, box)
        except SandboxError as exc:
            errors.append(f"{mode}: {exc.message}")
            continue
        if probe.passed:
            _resolved[choice] = box
            return box
        errors.append(f"{mode}: a trivial program did not pass ({probe.detail})")
    raise InputError(f"sandbox {choice!r} is not available here ({'; '.join(errors)})",
                     f"{INSTALL_HINT}, or pass --sandbox auto")


def run_program(program: str, timeout: float = 3.0, sandbox: Sandbox | None = None) -> Outcome:
    """Execute `program`; passed = the harness reported, within `timeout` seconds, that its last line ran."""
    box = sandbox or resolve()
    folder = Path(tempfile.mkdtemp(prefix="zoo-exec-"))
    try:
        return _run(box, folder, program, timeout)
    finally:
        _remove(folder)


def _run(box: Sandbox, folder: Path, program: str, timeout: float) -> Outcome:
    work = folder / "work"
    work.mkdir()
    (folder / "root").mkdir()  # the unshare mode's mount point for the new root
    (work / "program.py").write_text(program, encoding="utf-8")
    (work / "harness.py").write_text(HARNESS, encoding="utf-8")
    uid = box.program_uid()
    os.chmod(folder, 0o755)
    if uid is not None:
        for path in (work, work / "program.py", work / "harness.py"):
            os.chown(path, uid, uid)
    inside = box.program_dir(work)
    read_end, write_end = os.pipe()
    settings = {"program": f"{inside}/program.py", "result_fd": write_end, "guard": box.mode == "process",
                "limits": LIMITS | {"CPU": int(timeout) + 1}, "writable": [inside],
                "readable": [inside, *box.prefixes, *SYSTEM_FOLDERS]}
    as_user = {"user": uid, "group": uid, "extra_groups": []} if box.mode == "process" and uid is not None else {}
    nonce = secrets.token_hex(16).encode()
    try:
        proc = subprocess.Popen(box.command(folder, uid, [json.dumps(settings)]), cwd=work, env=box.env(work),
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=(write_end,), start_new_session=True, **as_user)
    except OSError as exc:
        os.close(read_end)
        raise SandboxError(f"cannot start the {box.mode} sandbox: {exc}", INSTALL_HINT) from None
    finally:
        os.close(write_end)
    try:
        with open(read_end, "rb", buffering=0) as result:
            try:
                proc.stdin.write(nonce)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            report, err, timed_out = _collect(proc, result, timeout)
    finally:
        _stop(proc, box, uid)
    if timed_out:
        return Outcome(False, "timeout", f"no exit within {timeout:g} s")
    if not report.startswith(b"R"):
        raise SandboxError(f"the {box.mode} sandbox did not start the program: {_last_line(err) or 'no output'}",
                           f"pass --sandbox with another mode ({', '.join(MODES)}), or {INSTALL_HINT}")
    if report == b"R" + nonce:
        return Outcome(True, "passed")
    code = proc.returncode
    if box.mode != "process" and code > 128:
        code = 128 - code  # bwrap and the unshare shell report a child's signal N as exit status 128 + N
    killed = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else ""
    detail = _last_line(err, "zoo-eval: ") or killed or _last_line(err) or f"exit status {code}"
    if code == 0:
        detail = "exited with status 0 before the tests finished"
    return Outcome(False, "failed", detail[:300])


def _collect(proc: subprocess.Popen, result: object, timeout: float) -> tuple[bytes, bytes, bool]:
    """Read the result channel (64 bytes at most) and the tail of stderr until the process exits or the
    deadline passes. The process's exit is watched through a pidfd, so a descendant that keeps the pipes open
    does not hold the evaluator."""
    import time

    deadline = time.monotonic() + timeout
    report, err = b"", b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    sel.register(result, selectors.EVENT_READ, "result")
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return report, err, True
            exited = False
            for key, _ in sel.select(left):
                if key.data == "exit":
                    exited = True
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "err":
                    err = (err + chunk)[-STDERR_KEEP:]
                elif len(report) < 64:
                    report += chunk[: 64 - len(report)]
            if exited:
                proc.wait()
                report, err = _drain(result, report, 64, head=True), _drain(proc.stderr, err, STDERR_KEEP)
                return report, err, False
    finally:
        sel.close()
        os.close(pidfd)


def _drain(stream: object, kept: bytes, keep: int, head: bool = False) -> bytes:
    """What is already buffered in a pipe, without blocking on writers that are still alive."""
    os.set_blocking(stream.fileno(), False)
    try:
        while chunk := os.read(stream.fileno(), 65536):
            kept = (kept + chunk)[:keep] if head else (kept + chunk)[-keep:]
    except (BlockingIOError, OSError):
        pass
    return kept


def _stop(proc: subprocess.Popen, box: Sandbox, uid: int | None) -> None:
    """Kill whatever is left: the namespace modes lose every process with their first (bwrap / unshare kill
    it); the process mode kills its session and, with a dropped uid, every process of that uid."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    proc.stderr.close()
    if box.mode == "process" and uid is not None:
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def _last_line(data: bytes, prefix: str = "") -> str:
    lines = [x for x in data.decode("utf-8", "replace").splitlines() if x.strip() and x.startswith(prefix)]
    return lines[-1][len(prefix):].strip() if lines else ""


def _remove(folder: Path) -> None:
    """Remove a program's folder whatever it did to it (read-only or unsearchable subfolders included)."""
    def unlock(func: Callable, path: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=unlock)


def run_programs(programs: list[str], timeout: float, workers: int, sandbox: Sandbox | None = None,
                 progress: bool = True, done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run every program, `workers` at a time; `done(i, outcome)` is called in this thread as each finishes."""
    from tqdm import tqdm

    box = sandbox or resolve()
    outcomes: list[Outcome | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(programs), desc=f"execute ({box.mode})", unit="program",
                 disable=not progress or None, leave=False, file=sys.stderr) as bar:
        futures = {pool.submit(run_program, p, timeout, box): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            i = futures[future]
            outcomes[i] = future.result()
            if done is not None:
                done(i, outcomes[i])
            bar.update(1)
    return outcomes  # type: ignore[return-value]
