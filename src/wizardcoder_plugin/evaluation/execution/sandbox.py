"""The sandbox modes a generated program can run in, how each is found, and the command that starts one program.

- `bwrap`: bubblewrap. New PID, network, IPC, UTS and mount namespaces (plus a user namespace when the evaluator
  is not root); a fresh root holding only /usr, the interpreter's install folder (read-only), a new /proc, a
  minimal /dev, a private size-limited /tmp and the program's folder.
- `unshare`: the same view built by util-linux `unshare`, `mount` and `pivot_root`, for machines without bwrap.
- `process`: no namespaces: a separate session, resource limits and the harness's audit-hook guard.

When the evaluator runs as root, each program runs as a fresh unprivileged uid with every capability dropped
(`setpriv`), which also makes the process limit count that program's processes alone (the kernel does not apply
RLIMIT_NPROC to uid 0). Without root, the user namespace does the same.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

MODES = ("bwrap", "unshare", "process")
CHOICES = ("auto", *MODES)
TMP_BYTES = 64 << 20  # the private /tmp is memory: bound it
FIRST_UID = 1 << 30  # programs run as FIRST_UID + random when the evaluator is root
UIDS = 1 << 24
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `sudo apt-get install bubblewrap`; Fedora: `sudo dnf install "
                "bubblewrap`) or enable user namespaces for util-linux `unshare`")

# Builds the view inside a new mount namespace, then runs the command as its child (the shell stays PID 1 of
# the new PID namespace, so a signal the program sends to PID 1 is ignored and its exit ends the namespace).
_UNSHARE_SCRIPT = r"""
set -eu
R="$1"; W="$2"; T="$3"; n="$4"; shift 4
mount -t tmpfs -o mode=755,size=1m tmpfs "$R"
i=0
while [ "$i" -lt "$n" ]; do
  d="$1"; shift; i=$((i + 1))
  mkdir -p "$R$d"; mount --bind "$d" "$R$d"; mount -o remount,bind,ro,nosuid,nodev "$R$d"
done
for l in bin lib lib32 lib64 libx32 sbin; do [ -L "/$l" ] && ln -s "$(readlink "/$l")" "$R/$l"; done
mkdir "$R/proc" "$R/dev" "$R/tmp" "$R/sandbox"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t tmpfs -o mode=755,size=64k,nosuid tmpfs "$R/dev"
for d in null zero full random urandom; do touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"; done
mount -t tmpfs -o "mode=1777,size=$T,nosuid,nodev" tmpfs "$R/tmp"
mount --bind "$W" "$R/sandbox"
cd "$R"; mkdir .old; pivot_root . .old; umount -l /.old; rmdir /.old
mount -o remount,ro,bind /
cd /sandbox
"$@"
"""


def base_python() -> tuple[str, tuple[str, ...]]:
    """The interpreter programs run in and the folders it needs: the base installation behind a venv (the venv
    usually lives in the user's working tree, which the sandbox must not show)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    return exe, tuple(sorted(p for p in prefixes if p != "/usr" and not p.startswith("/usr/")))


def _reachable_by_others(path: str) -> bool:
    """Every folder above `path` searchable and the file readable by any user (so a dropped uid can run it)."""
    p = Path(path)
    if p.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in p.parents)


@dataclass(frozen=True)
class Sandbox:
    mode: str
    python: str
    prefixes: tuple[str, ...]
    root: bool  # the evaluator runs as uid 0: programs get a dropped uid of their own

    @classmethod
    def create(cls, mode: str) -> Sandbox:
        exe, prefixes = base_python()
        return cls(mode, exe, prefixes, os.geteuid() == 0)

    def program_uid(self) -> int | None:
        """A fresh uid for one program, or None when programs keep the evaluator's."""
        if not self.root or (self.mode == "process" and not _reachable_by_others(self.python)):
            return None
        return FIRST_UID + secrets.randbelow(UIDS)

    def missing(self) -> list[str]:
        """The commands this mode needs that are not on PATH."""
        need = {"bwrap": ["bwrap"], "unshare": ["unshare", "mount", "pivot_root", "setpriv"], "process": []}[self.mode]
        if self.root and self.mode == "bwrap":
            need.append("setpriv")
        return [c for c in need if shutil.which(c) is None]

    def program_dir(self, work: Path) -> str:
        """Where the program's folder `work` is seen from inside the sandbox."""
        return str(work) if self.mode == "process" else "/sandbox"

    def command(self, folder: Path, uid: int | None, harness_args: list[str]) -> list[str]:
        """argv that runs `python -I -B harness.py ...` for the program in `folder`/work."""
        inside = self.program_dir(folder / "work")
        python = [self.python, "-I", "-B", f"{inside}/harness.py", *harness_args]
        drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]
        if uid is not None:
            drop[1:1] = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        if self.mode == "process":
            return python
        if self.mode == "bwrap":
            return [*self._bwrap(folder / "work"), *(drop + ["--"] if self.root else []), *python]
        flags = [] if self.root else ["--user", "--map-root-user"]
        return ["unshare", *flags, "--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts",
                "--propagation", "private", "--", "/bin/sh", "-c", _UNSHARE_SCRIPT, "sh", str(folder / "root"),
                str(folder / "work"), str(TMP_BYTES), str(1 + len(self.prefixes)), "/usr", *self.prefixes, *drop,
                "--", *python]

    def _bwrap(self, work: Path) -> list[str]:
        args = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                *([] if self.root else ["--unshare-user"]), "--die-with-parent", "--new-session",
                "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib32", "lib64", "libx32", "sbin"):
            top = Path("/") / name
            if top.is_symlink():
                args += ["--symlink", os.readlink(top), str(top)]
            elif top.is_dir():
                args += ["--ro-bind", str(top), str(top)]
        for prefix in self.prefixes:
            args += ["--ro-bind", prefix, prefix]
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_BYTES), "--tmpfs", "/tmp",
                 "--bind", str(work), "/sandbox", "--chdir", "/sandbox", "--clearenv"]
        for name, value in self.env(work).items():
            args += ["--setenv", name, value]
        return args

    def env(self, work: Path) -> dict[str, str]:
        """The program's whole environment (nothing of the evaluator's is passed on)."""
        home = self.program_dir(work)
        return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home,
                "TMPDIR": home if self.mode == "process" else "/tmp", "LANG": "C.UTF-8",
                "OMP_NUM_THREADS": "1"}

    def describe(self) -> str:
        if self.mode == "process":
            return ("process (no namespaces: resource limits and an audit-hook guard only; a determined program "
                    f"can escape it — {INSTALL_HINT})")
        who = "a dropped uid, no capabilities" if self.root else "a user namespace, no capabilities"
        return (f"{self.mode} (PID, network, IPC, UTS and mount namespaces; read-only system, private /tmp, "
                f"{who})")
