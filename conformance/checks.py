"""The check registry: every check has an id, a tier and (optionally) the capability it needs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIERS = ("static", "smoke", "device")
# the component kind that provides each capability (what a plugin must contribute for its check to run)
CAPABILITY_KIND = {"predict": "model", "train": "model", "finetune": "model", "bench": "model", "convert": "converter",
                   "preprocess": "dataset", "export": "exporter", "eval": "task"}
HEAVY_MODULES = ("mindspore", "mindformers", "torch", "transformers", "tensorflow", "jax")


class CheckFailed(Exception):
    def __init__(self, expected: str, actual: str, hint: str = "") -> None:
        super().__init__(f"expected {expected}; got {actual}" + (f" (hint: {hint})" if hint else ""))


class CheckSkipped(Exception):
    pass


@dataclass
class Context:
    plugin: str
    registry: Any
    workdir: Path
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[Any]:
        """The plugin's models, and other plugins' models its components serve."""
        return [e for e in self.registry.models() if e.plugin == self.plugin
                or any(rc.plugin == self.plugin for rc in self.handle(e).resolved())]

    def mine(self, entry: Any, kind: str) -> list[Any]:
        """The components of `kind` this plugin contributes to the model."""
        return [rc for rc in self.handle(entry).candidates(kind) if rc.plugin == self.plugin]

    def capable(self, capability: str) -> list[Any]:
        """Models with `capability` to which the plugin contributes the component providing it."""
        kind = CAPABILITY_KIND[capability]
        return [e for e in self.models if capability in self.handle(e).capabilities and self.mine(e, kind)]

    def smallest(self, capability: str) -> Any:
        entries = self.capable(capability)
        if not entries:
            raise CheckSkipped(f"no model of plugin {self.plugin!r} has components providing {capability!r}")
        return min(entries, key=lambda e: e.card.params)

    def handle(self, entry: Any) -> Any:
        """The resolved model, kept for the run (its engines are reused across checks)."""
        key = f"handle:{entry.qualified_name}"
        if key not in self.cache:
            self.cache[key] = self.registry.handle(entry)
        return self.cache[key]

    def run(self, command: str, entry: Any, spec: Any) -> Any:
        from registry_spec import commands

        return commands.run(command, self.handle(entry), spec)

    def fixture(self, entry: Any) -> dict[str, Path]:
        """Tiny local assets from the model component's optional `fixture(model, workdir)`."""
        key = f"fixture:{entry.qualified_name}"
        if key not in self.cache:
            h = self.handle(entry)
            make = getattr(h.component("model"), "fixture", None) if h.candidates("model") else None
            if make is None:
                raise CheckSkipped("the model component has no fixture(model, workdir) to provide tiny local assets")
            self.cache[key] = make(h, self.workdir / entry.card.name)
        return self.cache[key]


@dataclass(frozen=True)
class Check:
    id: str
    tier: str
    func: Callable[[Context], None]
    capability: str | None = None
    doc: str = ""


REGISTRY: dict[str, Check] = {}


def check(id: str, tier: str, capability: str | None = None) -> Callable:  # noqa: A002
    def deco(func: Callable[[Context], None]) -> Callable[[Context], None]:
        REGISTRY[id] = Check(id, tier, func, capability, (func.__doc__ or "").strip())
        return func

    return deco


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Any socket connect/bind to a non-local address during the block fails the check."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise CheckFailed("no network access with local weights", f"a connection to {address!r}")
        return real_connect(self, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]


def run_zoo(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "registry_spec.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="zoo-conformance-")
