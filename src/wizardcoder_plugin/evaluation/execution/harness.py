"""The program that runs inside the sandbox (standard library only; the evaluator copies this file next to the
program and never imports it).

Protocol with the evaluator: the per-run nonce arrives on stdin, which is then pointed at /dev/null; an inherited
pipe (its number in the settings) is the result channel. The harness writes `R` there once it is set up, runs
program.py as `__main__`, and writes the nonce only after the program's last statement (the test code)
returned. Exiting early — `sys.exit(0)`, `os._exit(0)`, a signal — never writes it, so it never counts as a pass.

The nonce stays out of the program's reach: the stdin pipe is drained and closed, the process is made
non-dumpable (no other process of the same user can read its memory), and an audit hook refuses the ways
Python code reaches another frame's locals or raw memory (frame introspection, tracing, the garbage collector's
object lists, ctypes, /proc/*/mem). The hook cannot be removed once installed. In `process` mode, which has no
namespaces, the hook also refuses process creation, signals, sockets and file changes outside the program's
folder: a best-effort guard, not isolation.
"""

import json
import os
import sys


def _main() -> None:
    import resource
    import types

    settings = json.loads(sys.argv[1])
    nonce = b""
    while len(nonce) < 64:
        chunk = os.read(0, 64)
        if not chunk:
            break
        nonce += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name, value in settings["limits"].items():
        limit = getattr(resource, "RLIMIT_" + name)
        resource.setrlimit(limit, (value, value + 1 if name == "CPU" else value))
    _seal()
    fd = settings["result_fd"]
    os.write(fd, b"R")
    with open(settings["program"], encoding="utf-8") as f:
        code = compile(f.read(), settings["program"], "exec")
    main = types.ModuleType("__main__")
    main.__file__ = settings["program"]
    sys.modules["__main__"] = main
    sys.addaudithook(_hook(settings["guard"], settings["writable"], settings["readable"]))
    write, stdout, stderr, exit_ = os.write, sys.stdout, sys.stderr, os._exit
    try:
        exec(code, main.__dict__)  # noqa: S102 - running the program is the point
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: leaving early is not passing
        _report(exc, stderr)
        exit_(1)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 - the program may have closed or replaced them
            pass
    try:
        write(fd, nonce)
    finally:
        exit_(0)


def _seal() -> None:
    """Non-dumpable and no new privileges (prctl), then forget ctypes so the program cannot reach it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS 1
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


_FRAME_ATTRS = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}
_INTROSPECTION = {"sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
                  "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
_PROCESS = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
            "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect", "socket.bind", "socket.sendto",
            "socket.sendmsg", "os.setuid", "os.setgid", "os.chroot"}
_FILE_CHANGES = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
                 "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def _hook(guard: bool, writable: list, readable: list):  # noqa: ANN202
    """`guard`: process mode, where `writable` (the program's folder) and `readable` (it, the interpreter and
    the system folders: what the namespace modes show) bound what the program may touch."""
    blocked_imports = {"ctypes", "_ctypes"} | ({"_posixsubprocess"} if guard else set())

    def inside(path: object, roots: list) -> bool:
        if isinstance(path, int):
            return True  # an fd the program already holds
        real = os.path.realpath(os.fsdecode(path))
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)

    def refuse(what: str) -> None:
        raise PermissionError(f"{what} is not allowed in the evaluation sandbox")

    def hook(event: str, args: tuple) -> None:
        if event == "sys._getframe":
            raise ValueError("frame introspection is not allowed in the evaluation sandbox")
        if event in _INTROSPECTION or event.startswith("ctypes."):
            refuse(event)
        if event == "object.__getattr__" and args[1] in _FRAME_ATTRS:
            refuse(f"reading .{args[1]}")
        if event == "import" and args[0].split(".")[0] in blocked_imports:
            refuse(f"import {args[0]}")
        if event == "open" and isinstance(args[0], (str, bytes)):
            parts = os.fsdecode(args[0]).split("/")
            if len(parts) > 2 and parts[1] == "proc" and ("mem" in parts or "map_files" in parts):
                refuse(f"opening {os.fsdecode(args[0])}")
        if not guard:
            return
        if event in _PROCESS:
            refuse(event)
        if event in _FILE_CHANGES and not all(inside(a, writable) for a in args[:2] if isinstance(a, (str, bytes))):
            refuse(f"{event} outside the program's folder")
        if event in ("os.listdir", "os.scandir") and args[0] is not None and not inside(args[0], readable):
            refuse("reading outside the sandbox's view")
        if event == "open" and args[0] is not None:
            writing = isinstance(args[1], str) and any(c in args[1] for c in "wax+")
            writing = writing or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and not inside(args[0], writable):
                refuse("writing outside the program's folder")
            if not inside(args[0], readable):
                refuse("reading outside the sandbox's view")

    return hook


def _report(exc: BaseException, stderr: object) -> None:
    """The exception's last line (format_exception_only reads no frames, which the hook would refuse)."""
    import traceback

    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    try:
        print(f"zoo-eval: {text[-1] if text else type(exc).__name__}", file=stderr, flush=True)
    except BaseException:  # noqa: BLE001, S110 - a closed or replaced stderr
        pass


if __name__ == "__main__":
    _main()
