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
        return [e for e in self.registry.models() if e.plugin == self.plugin]

    def smallest(self, capability: str) -> Any:
        entries = [e for e in self.models if capability in e.card.capabilities]
        if not entries:
            raise CheckSkipped(f"no card of plugin {self.plugin!r} claims {capability!r}")
        return min(entries, key=lambda e: e.card.params)

    def adapter(self, entry: Any) -> Any:
        from registry_spec.adapter import load_adapter

        key = f"adapter:{entry.qualified_name}"
        if key not in self.cache:
            self.cache[key] = load_adapter(entry.card)
        return self.cache[key]

    def fixture(self, entry: Any) -> dict[str, Path]:
        """Tiny local assets from the adapter's optional `conformance_fixture(workdir)`."""
        key = f"fixture:{entry.qualified_name}"
        if key not in self.cache:
            make = getattr(self.adapter(entry), "conformance_fixture", None)
            if make is None:
                raise CheckSkipped("the adapter has no conformance_fixture(workdir) to provide tiny local assets")
            self.cache[key] = make(self.workdir / entry.card.name)
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
