"""pluggy hook specifications of the `zoo` project. Hooks announce light metadata only."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from .specs import ExporterInfo, ModelCard, PluginManifest

PROJECT = "zoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def zoo_plugin_manifest() -> PluginManifest:  # type: ignore[empty-body]
    """Return the plugin's name, version and the `requires_spec` range it was written against."""


@hookspec
def zoo_register_models(register: Callable[[ModelCard], None]) -> None:
    """Call `register(card)` once per model. Cards name their adapter by import string; import nothing heavy."""


@hookspec
def zoo_register_exporters(register: Callable[[ExporterInfo], None]) -> None:
    """Call `register(info)` once per export backend the plugin offers."""
