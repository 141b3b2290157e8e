"""Atomic file output: everything is written beside its target under a temporary name, then renamed into place,
so an interrupted run (exception, Ctrl-C, SIGKILL) never leaves a half-written file under the final name. Outputs
get the modes an ordinary write would give them (the process's umask), not the temporary's private 0600/0700."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


def umask() -> int:
    """The process's umask, from /proc where Linux reports it (setting it to read it races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary file path beside `path`; on success it replaces `path`, on failure it is removed. A
    device or pipe (`--output /dev/stdout`) is yielded itself: it is written in place, never replaced."""
    if path.exists() and not path.is_file() and not path.is_dir():
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if os.stat(tmp).st_mode & 0o777 == 0o600:  # mkstemp's mode, not one the writer chose
            os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_replaceable(path: Path, earlier: Callable[[Path], bool] = lambda folder: False) -> None:
    """Refuses an output folder `atomic_dir` would not replace: a file, or a folder that is neither empty nor an
    earlier output of the same kind (`earlier`). Commands call it before their slow work too."""
    if path.is_symlink() or path.exists():
        if not path.is_dir():
            raise InputError(f"{path} exists and is not a folder", "choose another output folder, or move it away")
        if any(path.iterdir()) and not earlier(path):
            raise InputError(f"{path} is not empty, and not an earlier output of this command (it would be replaced)",
                             "choose a new or empty output folder")


@contextmanager
def atomic_dir(path: Path, earlier: Callable[[Path], bool] = lambda folder: False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; on success it is renamed to `path`. An existing `path` is
    replaced only when it is an empty folder or `earlier(path)` says it holds an earlier output of the same kind:
    never a file, or a folder of someone else's files (`check_replaceable`, before any work)."""
    check_replaceable(path, earlier)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 (and a writer may have narrowed it)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_files(folder: Path, last: str | None = None) -> Iterator[Path]:
    """Yields an empty hidden staging folder inside `folder`. On success each file written there is renamed into
    `folder` (`last` after the others: the file whose presence marks the output complete), on failure none is;
    for outputs that share their folder with other files (a model folder, a data file and its index)."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".staged-", suffix=".tmp"))  # same filesystem: renames
    done = False
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == last):
            os.replace(f, folder / f.name)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done and created and not any(folder.iterdir()):
            folder.rmdir()  # a failed run leaves no trace, not even an empty folder


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
