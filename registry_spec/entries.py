"""A registration: what a plugin registered (a model card or a component's description) with the plugin it came
from; `plugin:name` is its qualified name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from .specs import ComponentInfo, ModelCard


@dataclass(frozen=True)
class Registered(ABC):
    plugin: str

    @property
    @abstractmethod
    def kind(self) -> str: ...

    @property
    @abstractmethod
    def details(self) -> ModelCard | ComponentInfo: ...

    @property
    def name(self) -> str:
        return self.details.name

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    def repeats(self, earlier: list[Registered]) -> bool:
        """Whether this repeats `earlier` (the same plugin's registrations under this one's identity): identical,
        a no-op; different details under one identity are the plugin's error."""
        if not earlier:
            return False
        if earlier[0].details == self.details:
            return True
        raise ValueError(f"{self.kind} {self.name!r} registered twice by {self.plugin!r} with different details")


@dataclass(frozen=True)
class RegisteredModel(Registered):
    card: ModelCard

    @property
    def kind(self) -> str:
        return "model"

    @property
    def details(self) -> ModelCard:
        return self.card


@dataclass(frozen=True)
class RegisteredComponent(Registered):
    info: ComponentInfo

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def details(self) -> ComponentInfo:
        return self.info

    def as_dict(self) -> dict[str, Any]:
        extra = {k: v for k, v in (("source", self.info.source), ("target", self.info.target)) if v}
        return {"kind": self.info.kind, "name": self.info.name, "plugin": self.plugin, "impl": self.info.impl,
                **extra}
