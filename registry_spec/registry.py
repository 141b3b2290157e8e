"""Plugin discovery (entry-point group `zoo.plugins`), isolated loading, model-name resolution, and the table of
registered components."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from . import __spec_version__, hookspecs
from .entries import RegisteredComponent, RegisteredModel
from .errors import AmbiguousModelError, ModelNotFoundError, NameCollisionError, PluginLoadError
from .handle import ModelHandle
from .specs import ComponentInfo, ModelCard, PluginManifest

ENTRY_POINT_GROUP = "zoo.plugins"


@dataclass
class PluginRecord:
    name: str
    value: str
    status: str = "loaded"  # loaded | failed | disabled
    version: str = ""
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    components: list[dict] = field(default_factory=list)
    requires_spec: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "value", "version", "status", "error", "hooks", "models",
                                               "components", "requires_spec")}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """Loads every plugin once; a plugin that fails is recorded (or fatal with strict=True)."""

    def __init__(self, eps: Iterable[EntryPoint] | None = None, *, strict: bool | None = None,
                 disabled: Iterable[str] | None = None) -> None:
        self.strict = _env_flag("ZOO_STRICT_PLUGINS") if strict is None else strict
        env_disabled = os.environ.get("ZOO_DISABLE_PLUGINS", "")
        self.disabled = set(disabled if disabled is not None else filter(None, map(str.strip, env_disabled.split(","))))
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self._by_name: dict[str, list[RegisteredModel]] = {}
        self._aliases: dict[str, list[RegisteredModel]] = {}
        self.components: list[RegisteredComponent] = []
        for ep in (entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps):
            self._load(ep)

    # ----------------------------------------------------------------------------------------------- loading
    def _fail(self, record: PluginRecord, error: str) -> None:
        record.status, record.error = "failed", error
        if self.pm.get_plugin(record.name) is not None:
            self.pm.unregister(name=record.name)
        self._forget(record.name)
        if self.strict:
            raise PluginLoadError(record.name, error)

    def _load(self, ep: EntryPoint) -> None:
        if ep.name in self.plugins:  # the same distribution seen twice on sys.path
            return
        record = PluginRecord(ep.name, ep.value)
        self.plugins[ep.name] = record
        if ep.name in self.disabled:
            record.status = "disabled"
            return
        try:
            module = ep.load()
            self.pm.register(module, name=ep.name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the host
            return self._fail(record, f"{type(exc).__name__}: {exc}")
        record.hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        try:
            self._collect(record, module)
        except NameCollisionError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(record, f"{type(exc).__name__}: {exc}")

    def _impl(self, hook: str, module: ModuleType):  # noqa: ANN202
        return next((i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin is module), None)

    def _collect(self, record: PluginRecord, module: ModuleType) -> None:
        manifest_impl = self._impl("zoo_plugin_manifest", module)
        if manifest_impl is not None:
            manifest = PluginManifest.model_validate(manifest_impl.function())
            record.version, record.requires_spec = manifest.version, manifest.requires_spec
            try:
                admitted = Version(__spec_version__) in SpecifierSet(manifest.requires_spec)
            except InvalidSpecifier as exc:
                raise ValueError(f"invalid requires_spec {manifest.requires_spec!r}: {exc}") from exc
            if not admitted:
                raise ValueError(f"requires registry_spec {manifest.requires_spec}, host is {__spec_version__}")
        cards: list[ModelCard] = []
        infos: list[ComponentInfo] = []
        if (impl := self._impl("zoo_register_models", module)) is not None:
            impl.function(register=lambda card: cards.append(ModelCard.model_validate(card)))
        if (impl := self._impl("zoo_register_components", module)) is not None:
            impl.function(register=lambda info: infos.append(ComponentInfo.model_validate(info)))
        for card in cards:
            self._add(RegisteredModel(record.name, card), record)
        for info in infos:
            self._add_component(RegisteredComponent(record.name, info), record)

    def _add_component(self, rc: RegisteredComponent, record: PluginRecord) -> None:
        mine = [c for c in self.components if c.plugin == rc.plugin and (c.info.kind, c.info.name, c.info.family,
                tuple(c.info.models)) == (rc.info.kind, rc.info.name, rc.info.family, tuple(rc.info.models))]
        if rc.repeats(mine):
            return
        self.components.append(rc)
        record.components.append(rc.as_dict())

    def _add(self, entry: RegisteredModel, record: PluginRecord) -> None:
        if entry.repeats([e for e in self._by_name.get(entry.card.name, []) if e.plugin == entry.plugin]):
            return
        others = self._by_name.get(entry.card.name, [])
        if others and self.strict:
            raise NameCollisionError(
                f"model {entry.card.name!r} is registered by {others[0].plugin!r} and {entry.plugin!r}",
                "disable one plugin with ZOO_DISABLE_PLUGINS or use qualified names without ZOO_STRICT_PLUGINS",
            )
        self._by_name.setdefault(entry.card.name, []).append(entry)
        for alias in entry.card.aliases:
            self._aliases.setdefault(alias, []).append(entry)
        record.models.append(entry.card.name)

    def _forget(self, plugin: str) -> None:
        for table in (self._by_name, self._aliases):
            for key in list(table):
                table[key] = [e for e in table[key] if e.plugin != plugin]
                if not table[key]:
                    del table[key]
        self.components = [c for c in self.components if c.plugin != plugin]
        if plugin in self.plugins:
            self.plugins[plugin].models, self.plugins[plugin].components = [], []

    # -------------------------------------------------------------------------------------------- resolution
    def models(self) -> list[RegisteredModel]:
        return [e for entries in self._by_name.values() for e in entries]

    def ambiguous(self, name: str) -> bool:
        return len(self._by_name.get(name, [])) > 1

    def resolve(self, name: str) -> RegisteredModel:
        if ":" in name:
            plugin, _, bare = name.partition(":")
            for e in self._by_name.get(bare, []) + self._aliases.get(bare, []):
                if e.plugin == plugin:
                    return e
        else:
            matches = self._by_name.get(name) or self._aliases.get(name) or []
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousModelError(name, [m.qualified_name for m in matches])
        known = list(self._by_name) + list(self._aliases) + [e.qualified_name for e in self.models()]
        raise ModelNotFoundError(name, known)

    def handle(self, entry: RegisteredModel | str) -> ModelHandle:
        """The resolved model (a name, alias or 'plugin:name') with the components that serve it."""
        entry = self.resolve(entry) if isinstance(entry, str) else entry
        return ModelHandle(entry.card, entry.plugin, self)

