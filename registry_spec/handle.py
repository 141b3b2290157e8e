"""A resolved model: its card, the components that serve it (from any plugin), and what they make it capable of."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .components import Tokenizer, instantiate
from .entries import RegisteredComponent
from .errors import AmbiguousComponentError, ComponentNotFoundError, InputError
from .specs import CAPABILITIES, KINDS, ModelCard, PredictSpec

if TYPE_CHECKING:
    from .generation import Engine
    from .registry import Registry


@dataclass
class ModelHandle:
    """What a command works with: `component(kind, name)` resolves and loads one, `config` / `tokenizer` /
    `generator` are the compositions every command uses (cached for the handle's life)."""

    card: ModelCard
    plugin: str
    registry: Registry
    _loaded: dict[str, object] = field(default_factory=dict, repr=False)
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.card.name

    # ------------------------------------------------------------------------------------------- components
    def candidates(self, kind: str) -> list[RegisteredComponent]:
        """This model's components of `kind`, identical registrations once, the model's own plugin's first."""
        seen: list[RegisteredComponent] = []
        for rc in self.registry.components:
            if rc.info.kind == kind and rc.info.serves(self.card.name, self.card.family):
                if not any(s.info == rc.info for s in seen):
                    seen.append(rc)
        return sorted(seen, key=lambda rc: rc.plugin != self.plugin)

    def resolve(self, kind: str, name: str | None = None,
                where: Callable[[RegisteredComponent], bool] | None = None) -> RegisteredComponent:
        """The component of `kind` named `name` ('plugin:name' selects among same-named ones), or without a name
        the only one, the one marked default, or the model's own plugin's one."""
        pool = [c for c in self.candidates(kind) if where is None or where(c)]
        if name is not None:
            plugin, _, bare = name.rpartition(":")
            matches = [c for c in pool if c.info.name == bare and (not plugin or c.plugin == plugin)]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise AmbiguousComponentError(kind, bare, self.card.name, [m.qualified_name for m in matches])
            raise ComponentNotFoundError(kind, name, self.card.name, sorted({c.info.name for c in pool}))
        if len(pool) == 1:
            return pool[0]
        for narrowed in ([c for c in pool if c.info.default], [c for c in pool if c.plugin == self.plugin]):
            if len(narrowed) == 1:
                return narrowed[0]
        if not pool:
            raise ComponentNotFoundError(kind, None, self.card.name, [])
        raise AmbiguousComponentError(kind, None, self.card.name, [c.qualified_name for c in pool])

    def load(self, rc: RegisteredComponent) -> Any:
        key = rc.qualified_name + "@" + rc.info.kind
        if key not in self._loaded:
            self._loaded[key] = instantiate(rc.info.impl)
        return self._loaded[key]

    def component(self, kind: str, name: str | None = None) -> Any:
        return self.load(self.resolve(kind, name))

    def resolved(self) -> list[RegisteredComponent]:
        return [rc for kind in KINDS for rc in self.candidates(kind)]

    @property
    def capabilities(self) -> list[str]:
        """What the resolved components provide (importing the model component to see its optional methods)."""
        has = {kind: bool(self.candidates(kind)) for kind in KINDS}
        predict = has["config"] and has["tokenizer"] and has["model"]
        caps = {"convert": has["converter"], "preprocess": has["dataset"] and has["tokenizer"], "predict": predict,
                "export": has["exporter"] and has["config"], "eval": has["task"] and predict}
        if has["model"]:
            caps["train"] = caps["finetune"] = self._model_has("trainer")
            caps["bench"] = self._model_has("bench")
        return [c for c in CAPABILITIES if caps.get(c)]

    def _model_has(self, method: str) -> bool:
        """Whether the model component the commands would use (same resolution) has `method`."""
        try:
            return callable(getattr(self.component("model"), method, None))
        except (AmbiguousComponentError, ComponentNotFoundError):
            return False

    # ---------------------------------------------------------------------------------------- compositions
    def config(self, path: Path | None = None) -> Any:
        return self.component("config").resolve(self, path)

    def tokenizer(self, path: Path | None = None, weights: Path | None = None) -> Tokenizer:
        key = ("tokenizer", str(path), str(weights))
        if key not in self._cache:
            self._cache[key] = self.component("tokenizer").load(self, path, weights)
        return self._cache[key]

    def format_prompt(self, text: str, template: str, extra: str = "") -> str:
        return self.component("tokenizer").format_prompt(text, template, extra)

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Chat messages ({"role", "content"}) as one prompt, by the tokenizer component's `format_chat`."""
        return self._optional("format_chat", "a chat template")(messages)

    def format_infill(self, prefix: str, suffix: str) -> str:
        """A fill-in-the-middle prompt, by the tokenizer component's `format_infill`."""
        return self._optional("format_infill", "a fill-in-the-middle format")(prefix, suffix)

    def _optional(self, method: str, what: str) -> Callable[..., str]:
        fn = getattr(self.component("tokenizer"), method, None)
        if not callable(fn):
            raise InputError(f"{self.name} has no {what}", f"its tokenizer component does not define {method}()")
        return fn

    def generator(self, spec: PredictSpec) -> tuple[Engine, Tokenizer]:
        """(engine, tokenizer) for predict-like work: the model's own engine (`backend` 'online'), or the runner of
        the exporter named by `backend` over `artifacts`. Engines are kept for the handle's life."""
        if spec.backend == "online":
            key = ("engine", str(spec.weights), str(spec.config), spec.precision, str(spec.tokenizer))
            if key not in self._cache:
                tok = self.tokenizer(spec.tokenizer, spec.weights)
                self._cache[key] = (self.component("model").engine(self, spec, tok), tok)
            engine, tok = self._cache[key]
            engine.max_batch = spec.batch_size
            return engine, tok
        exporter = self.component("exporter", spec.backend)
        if spec.artifacts is None:
            raise InputError(f"--backend {spec.backend} needs --artifacts DIR", "pass the --output-dir of zoo export")
        if not (spec.artifacts / "manifest.json").is_file():
            raise InputError(f"{spec.artifacts} is not an exported folder (no manifest.json)",
                             f"create one with `zoo export {self.name} --backend {spec.backend} --output-dir DIR`")
        return exporter.runner(self, spec.artifacts), self.tokenizer(spec.tokenizer, spec.artifacts)
