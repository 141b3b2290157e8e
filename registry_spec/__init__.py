"""registry_spec: the generic host of the model zoo (hookspecs, typed specs, errors, discovery, the `zoo` CLI).

It knows no model family and imports no ML framework.
"""

__spec_version__ = "1.2.0"

from .errors import (  # noqa: E402
    AmbiguousModelError,
    BackendUnavailableError,
    CapabilityNotSupportedError,
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
    "AmbiguousModelError",
    "BackendUnavailableError",
    "CapabilityNotSupportedError",
    "InputError",
    "ModelNotFoundError",
    "NameCollisionError",
    "PluginLoadError",
    "SpecValidationError",
    "WeightsUnavailableError",
    "ZooError",
]
