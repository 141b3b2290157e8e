"""pluggy hook specifications of the `zoo` project. Hooks announce light metadata only; everything heavy is named
by import strings and loaded when a command uses it."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from .specs import ComponentInfo, ModelCard, PluginManifest

PROJECT = "zoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def zoo_plugin_manifest() -> PluginManifest:  # type: ignore[empty-body]
    """Return the plugin's name, version and the `requires_spec` range it was written against."""


@hookspec
def zoo_register_models(register: Callable[[ModelCard], None]) -> None:
    """Call `register(card)` once per model."""


@hookspec
def zoo_register_components(register: Callable[[ComponentInfo], None]) -> None:
    """Call `register(info)` once per component (config, tokenizer, model, converter, exporter, task, dataset), for
    a model family or named models: a plugin may serve another plugin's models. Import nothing heavy."""
