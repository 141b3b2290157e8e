"""registry_spec: the generic host of the model zoo (hookspecs, typed specs, errors, discovery, the `zoo` CLI).

It knows no model family and imports no ML framework: plugins register model cards and components (config,
tokenizer, model, converter, exporter, task, dataset), and the generic commands compose them.
"""

__spec_version__ = "2.0.1"

from .errors import (  # noqa: E402
    AmbiguousComponentError,
    AmbiguousModelError,
    BackendUnavailableError,
    CapabilityNotSupportedError,
    ComponentNotFoundError,
    InputError,
    ModelNotFoundError,
    NameCollisionError,
    PluginLoadError,
    SpecValidationError,
    WeightsUnavailableError,
    ZooError,
)
from .hookspecs import hookimpl  # noqa: E402

__all__ = [
    "__spec_version__",
    "hookimpl",
    "AmbiguousComponentError",
    "AmbiguousModelError",
    "BackendUnavailableError",
    "CapabilityNotSupportedError",
    "ComponentNotFoundError",
    "InputError",
    "ModelNotFoundError",
    "NameCollisionError",
    "PluginLoadError",
    "SpecValidationError",
    "WeightsUnavailableError",
    "ZooError",
]
