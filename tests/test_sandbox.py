"""Hostile generated programs, in every sandbox mode this machine has: none passes, none leaves a side effect
behind, none takes the evaluator down. CI sets ZOO_REQUIRE_SANDBOX so a mode it installed cannot silently skip.

Each case asserts the recorded status and the absence of what the program tried to do. The `process` mode has
no namespaces: there the harness's guard refuses what the kernel would otherwise allow, so its cases check the
refusal (and that nothing happened) rather than the isolation."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, zoo

from registry_spec.errors import InputError
from wizardcoder_plugin.evaluation.execution import MODES, Sandbox, resolve, run_program, run_programs

REQUIRED = [m for m in os.environ.get("ZOO_REQUIRE_SANDBOX", "").split(",") if m]


def _box(mode: str):
    try:
        return resolve(mode)
    except InputError as exc:
        if mode in REQUIRED:
            raise
        pytest.skip(f"{mode} sandbox unavailable here: {exc.message}")


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.fixture(params=[*MODES, "process-as-root"])
def box(request):
    """Every mode, plus `process` as root with a system interpreter other users can run: the branch where each
    program gets a dropped uid of its own and the leftovers of that uid are killed afterwards."""
    if request.param != "process-as-root":
        return _box(request.param)
    if os.geteuid() != 0 or SYSTEM_PYTHON is None:
        pytest.skip("needs root and a system python3")
    return Sandbox("process", os.path.realpath(SYSTEM_PYTHON), (), True)


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


EXIT_TRICKS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "raise SystemExit(0)": "raise SystemExit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "exit()": "exit()",
    "quit()": "quit()",
    "SIGKILL itself": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "abort": "import os\nos.abort()",
    "exit in a thread": "import os, threading, time\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                        "time.sleep(5)",
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(0)",
    "fake success output": "import os, sys\nprint('passed', flush=True)\nprint('OK', file=sys.stderr)\nos._exit(0)",
    "write every fd": "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'R' + b'0' * 32)\n"
                      "    except OSError: pass\nos._exit(0)",
    "trace away the asserts": "import sys\nsys.settrace(lambda *a: None)",
    "close stderr and exit": "import os\nos.close(2)\nos._exit(0)",
}


@pytest.mark.parametrize("trick", list(EXIT_TRICKS))
def test_exit_tricks_fail(box, trick):
    out = run_program(EXIT_TRICKS[trick] + "\nassert False, 'the tests ran and failed'\n", 3.0, box)
    assert (out.passed, out.status) == (False, "failed"), out


STEAL = """
import os, sys, re
seen = []
def look(text):
    seen.extend(re.findall(rb"[0-9a-f]{32}", text if isinstance(text, bytes) else str(text).encode()))
for attempt in (lambda: look(sys.stdin.buffer.read()), lambda: look(repr(sys._getframe(1).f_locals)),
                lambda: [look(repr(o)) for o in __import__("gc").get_objects() if isinstance(o, (bytes, dict))],
                lambda: look(open("/proc/self/mem", "rb").read(1)), lambda: __import__("ctypes"),
                lambda: look(repr(sys.exc_info())), lambda: sys.settrace(lambda *a: None)):
    try:
        attempt()
    except BaseException:
        pass
try:
    raise ValueError
except ValueError as e:
    try:
        look(repr(e.__traceback__.tb_frame.f_back.f_locals))
    except BaseException:
        pass
for fd in range(3, 64):
    for nonce in seen:
        try:
            os.write(fd, b"R" + nonce)
        except OSError:
            pass
os._exit(0)
"""


def test_the_nonce_cannot_be_read(box):
    out = run_program(STEAL + "assert False\n", 3.0, box)
    assert (out.passed, out.status) == (False, "failed"), out


def test_canonical_behaviour_still_passes(box):
    ok = ["assert sum(range(4)) == 6",
          "import collections\nP = collections.namedtuple('P', 'x y')\nassert P(1, 2).y == 2",
          "import warnings\nwarnings.warn('x')\nassert True", "import sys\nprint('x' * 100000)\nassert True",
          "import os\nopen('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'",
          "import tempfile\nwith tempfile.TemporaryFile() as f: f.write(b'x')\nassert True"]
    outs = run_programs(ok, 5.0, 2, box, progress=False)
    assert all(o.passed for o in outs), outs


def test_crashes_hangs_floods_and_limits_are_contained(box):
    cases = {
        "segfault": ("import faulthandler\nfaulthandler._sigsegv()", "failed"),
        "memory": ("x = bytearray(8 << 30)", "failed"),
        "hang": ("import time\ntime.sleep(60)", "timeout"),
        "ignores SIGTERM": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
                            "timeout"),
        "stdout flood": ("while True: print('x' * 4096)", "timeout"),
        "stderr flood": ("import sys\nwhile True: sys.stderr.write('y' * 4096)", "timeout"),
        "big file": ("open('big', 'wb').write(b'x' * (64 << 20))", "failed"),
        "deletes its folder": ("import os, shutil\nshutil.rmtree(os.getcwd(), ignore_errors=True)\nos._exit(0)",
                               "failed"),
    }
    t0 = time.monotonic()
    outs = run_programs([c[0] for c in cases.values()], 2.0, 2, box, progress=False)
    assert [o.status for o in outs] == [c[1] for c in cases.values()], list(zip(cases, outs, strict=True))
    assert time.monotonic() - t0 < 20  # every timeout was enforced
    assert run_program("assert 1 + 1 == 2", 3.0, box).passed  # and the next program runs normally


def test_forks_and_escaped_processes_die_with_the_program(box):
    marker = f"{secrets.randbelow(10**6) + 10**6}.25"
    spawn = (f"import os\nos.posix_spawn('/usr/bin/setsid', ['setsid', 'sleep', '{marker}'], {{}})\n"
             f"if os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{marker}'])\n")
    bomb = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"
    outs = run_programs([spawn + "os._exit(0)", bomb], 2.0, 2, box, progress=False)
    assert [o.passed for o in outs] == [False, False], outs
    time.sleep(0.2)
    assert _processes_with(marker) == []
    assert _processes_with("program.py") == []  # no fork-bomb child survived either


def test_files_outside_are_neither_written_read_nor_deleted(box, tmp_path):
    in_home = Path.home() / f".zoo-sandbox-test-{secrets.token_hex(4)}"
    in_home.write_text("mine")
    try:
        _files_outside(box, tmp_path, in_home)
    finally:
        in_home.unlink()


def _files_outside(box, tmp_path: Path, in_home: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    outside = Path("/tmp") / f"zoo-sandbox-test-{secrets.token_hex(4)}"
    in_tree = REPO / f".zoo-sandbox-test-{secrets.token_hex(4)}"
    programs = {
        "read a planted file": f"assert open({str(secret)!r}).read() == 'hunter2'",
        "read the working tree": f"assert open({str(REPO / 'pyproject.toml')!r}).read()",
        "write /tmp": f"open({str(outside)!r}, 'w').write('x')\nimport os\nassert os.path.getsize({str(outside)!r})"
                      "\nassert False",
        "write the working tree": f"open({str(in_tree)!r}, 'w').write('x')",
        "delete": f"import os, shutil\nos.remove({str(victim)!r})\nshutil.rmtree({str(tmp_path)!r})",
        "read the home folder": f"assert open({str(in_home)!r}).read() == 'mine'",
        "list the home folder": f"import os\nassert {in_home.name!r} in os.listdir({str(in_home.parent)!r})",
    }
    outs = run_programs(list(programs.values()), 3.0, 2, box, progress=False)
    assert [o.status for o in outs] == ["failed"] * len(programs), list(zip(programs, outs, strict=True))
    assert not outside.exists() and not in_tree.exists()
    assert victim.read_text() == "keep" and secret.read_text() == "hunter2"


def test_the_network_is_unreachable(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        out = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                          "s.sendall(b'leak')", 3.0, box)
        assert out.status == "failed", out
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_signals_reach_nothing_outside(box):
    """Killing the parent, the session, every process it can: the evaluator (this test process) lives on."""
    programs = ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nassert False",
                "import os, signal\nos.kill(-1, signal.SIGKILL)\nassert False",
                "import os, signal\nos.killpg(0, signal.SIGKILL)\nassert False",
                "import subprocess\nsubprocess.run(['kill', '-9', '-1'])\nassert False",
                f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nassert False"]
    outs = run_programs(programs, 3.0, 2, box, progress=False)
    assert [o.passed for o in outs] == [False] * len(programs)
    assert run_program("assert True", 3.0, box).passed


def test_zoo_eval_survives_hostile_generations_and_resumes(tmp_path):
    """A real `zoo eval` process scores hostile HumanEval completions next to canonical ones: it exits 0, its
    memory stays flat under floods, summary.json names the sandbox, and a rerun resumes from executions.jsonl."""
    import gzip

    with gzip.open(REPO / "src/wizardcoder_plugin/data/eval/HumanEval.jsonl.gz", "rt") as f:
        he = [json.loads(x) for x in f][:6]
    hostile = ["    import ctypes, os, signal\n    ctypes.CDLL(None).kill(os.getppid(), signal.SIGKILL)\n",
               "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
               "    import sys\n    while True: sys.stderr.write('z' * 65536)\n",
               "    while True: print('z' * 65536)\n", "    import sys\n    sys.exit(0)\n"]
    rows = [{"task_id": r["task_id"], "completion": c} for r, c in zip(he, hostile, strict=False)]
    rows += [{"task_id": r["task_id"], "completion": r["canonical_solution"]} for r in he]
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    # VmHWM, the peak of this process's own memory (ru_maxrss would carry over pytest's peak through the exec)
    script = ("import sys\nfrom registry_spec.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
              "    peak = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]\n"
              "    print('maxrss', peak, file=sys.stderr)\n")
    args = ["eval", "wizardcoder-tiny", "--task", "humaneval", "--load-generations", str(gens), "--json",
            "--output-dir", str(out), "--timeout", "2"]
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                       env=os.environ | {"GLOG_v": "3"})
    assert r.returncode == 0, r.stderr
    assert int(r.stderr.rsplit("maxrss", 1)[1].split()[0]) < 400_000  # KiB: the floods were not kept
    assert "sandbox mode" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sandbox"] in MODES
    results = {x["task_id"]: x for x in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert [results[f"HumanEval/{i}"]["passed"] for i in range(6)] == [1, 1, 1, 1, 1, 1]  # canonical only
    assert [results[f"HumanEval/{i}"]["results"][0]["status"] for i in range(5)] == \
        ["failed", "failed", "timeout", "timeout", "failed"]
    log = (out / "executions.jsonl").read_text().splitlines()
    assert len(log) == len(rows)
    # a rerun takes the recorded outcomes (a planted one proves it), drops a torn last line (a killed run) and
    # runs only what is missing
    planted = json.loads(log[0]) | {"status": "passed", "detail": "planted"}
    (out / "executions.jsonl").write_text("\n".join([json.dumps(planted), *log[1:-1]]) + '\n{"key": "tor')
    r = zoo(*args)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] == 6
    assert "planted" in (out / "results.jsonl").read_text()
    again = [json.loads(x) for x in (out / "executions.jsonl").read_text().splitlines()]
    assert len(again) == len(rows) and again[-1] == json.loads(log[-1])


def test_unknown_or_missing_sandbox_is_refused(monkeypatch):
    with pytest.raises(InputError, match="unknown sandbox 'chroot'"):
        resolve("chroot")
    r = zoo("eval", "wizardcoder-tiny", "--task", "mbpp", "--sandbox", "jail", "--load-generations", "/dev/null")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    import wizardcoder_plugin.evaluation.execution as execution

    monkeypatch.setattr(execution, "_resolved", {})
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(InputError, match=r"sandbox .bwrap. is not available here \(bwrap: bwrap\b.* not found") as err:
        resolve("bwrap")
    assert "apt-get install bubblewrap" in err.value.hint


UNPRIVILEGED = """
import json, sys
from wizardcoder_plugin.evaluation.execution import resolve, run_program
box = resolve(sys.argv[1])
programs = json.loads(sys.argv[2])
print(json.dumps({"root": box.root, "outcomes": [run_program(p, 3.0, box).status for p in programs]}))
"""


@pytest.mark.parametrize("mode", ["bwrap", "unshare"])
def test_user_namespace_path_for_unprivileged_users(mode):
    """What users without root get: the sandbox in a user namespace (CI is root, so the evaluator is run here
    as `nobody`, with a system interpreter that user can read and the execution package copied beside it)."""
    python = SYSTEM_PYTHON
    if os.geteuid() != 0 or shutil.which("setpriv") is None or python is None:
        pytest.skip("needs root (to become nobody), setpriv and a system python3")
    import tempfile

    _box(mode)  # skips where this mode is not available at all
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # readable by nobody
        _run_unprivileged(mode, python, Path(tmp))


def _run_unprivileged(mode: str, python: str, pkg: Path) -> None:
    inner = "wizardcoder_plugin/evaluation/execution"
    shutil.copytree(REPO / "src" / inner, pkg / inner)
    (pkg / "wizardcoder_plugin/__init__.py").write_text("")
    (pkg / "wizardcoder_plugin/evaluation/__init__.py").write_text("")
    (pkg / "registry_spec").mkdir()
    (pkg / "registry_spec/__init__.py").write_text("")
    shutil.copy(REPO / "registry_spec/errors.py", pkg / "registry_spec/errors.py")
    bomb = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"
    programs = ["assert True", "import os\nos._exit(0)", STEAL + "assert False", bomb,
                "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
                f"assert open({str(REPO / 'pyproject.toml')!r}).read()", "assert False"]
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                        f"import sys; sys.path.insert(0, {str(pkg)!r})\n" + UNPRIVILEGED, mode, json.dumps(programs)],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == {"root": False, "outcomes": ["passed", "failed", "failed", "timeout", "failed", "failed",
                                               "failed"]}, got
