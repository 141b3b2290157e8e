"""Components: what plugins register for model families or models, and the protocols each kind implements.

A registration is light metadata (`ComponentInfo`) with a lazy `"pkg.module:obj"` import string; the object is
imported only when a command uses it. An object that is a class is instantiated once, without arguments.
Every method receives the resolved model (`ModelHandle`), through which it can reach the model's other
components — so an exporter from one plugin can read the weights another plugin's model component provides.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .errors import PluginLoadError
from .specs import (
    KINDS,
    BenchResult,
    BenchSpec,
    ComponentInfo,
    ConvertResult,
    ConvertSpec,
    EvalResult,
    EvalSpec,
    ExportResult,
    ExportSpec,
    PredictSpec,
    PreprocessResult,
    PreprocessSpec,
    TrainResult,
    TrainSpec,
)

if TYPE_CHECKING:
    from .generation import Engine
    from .handle import ModelHandle

__all__ = ["ComponentInfo", "KINDS", "PROTOCOLS", "import_string", "instantiate", "missing_methods"]


def import_string(target: str) -> object:
    """Import 'package.module:attr.sub' (the form component registrations use)."""
    module_name, _, attr = target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginLoadError(module_name.split(".")[0], f"cannot import {target!r}: {exc}") from exc
    return obj


def instantiate(target: str) -> object:
    obj = import_string(target)
    return obj() if isinstance(obj, type) else obj


# ----------------------------------------------------------------------------------------------- protocols
@runtime_checkable
class Tokenizer(Protocol):
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@runtime_checkable
class ConfigComponent(Protocol):
    def resolve(self, model: ModelHandle, path: Path | None) -> Any:
        """The typed architecture: the card's preset, or `path` (a config file of a format it reads)."""

    def reference(self, architecture: Any) -> dict[str, Any]:
        """The architecture in the family's reference format (for GPTBigCode: HF config.json's keys, plus
        `seq_length`): what other plugins' components read."""


@runtime_checkable
class TokenizerComponent(Protocol):
    def load(self, model: ModelHandle, path: Path | None, weights: Path | None) -> Tokenizer:
        """`path` if given, else tokenizer files beside `weights`, else whatever the model bundles."""

    def format_prompt(self, text: str, template: str, extra: str = "") -> str:
        """`text` in the prompt template `template` ('none': unchanged); `extra` fills an input slot."""


class TokenizerExtras(Protocol):
    """Optional methods of a tokenizer component (`zoo serve` answers 400 where one is missing)."""

    def format_chat(self, messages: list[dict[str, str]]) -> str:
        """Messages {"role": system | user | assistant, "content"} (the last from the user) as one prompt."""

    def format_infill(self, prefix: str, suffix: str) -> str:
        """A fill-in-the-middle prompt: the model generates what goes between `prefix` and `suffix`."""


@runtime_checkable
class Trainer(Protocol):
    def train(self, callbacks: list[Callable[[dict], None]] | None = None) -> TrainResult: ...


@runtime_checkable
class ModelComponent(Protocol):
    """Builds engines; the optional methods below add capabilities (a model without `trainer` cannot train)."""

    def engine(self, model: ModelHandle, spec: PredictSpec, tokenizer: Tokenizer) -> Engine:
        """An inference engine for the spec's weights, config, precision and batch size."""


class ModelExtras(Protocol):
    """The optional methods of a model component and the capability each adds."""

    def trainer(self, model: ModelHandle, spec: TrainSpec) -> Trainer:
        """train / finetune."""

    def bench(self, model: ModelHandle, spec: BenchSpec) -> BenchResult:
        """bench."""

    def state_dict(self, model: ModelHandle, weights: Path | None, config: Path | None) -> Mapping[str, Any]:
        """The weights as numpy arrays under the family's reference names, for other plugins' exporters."""

    def fixture(self, model: ModelHandle, workdir: Path) -> dict[str, Path]:
        """Tiny local assets (weights, config, tokenizer, instruction_data) for the conformance smoke tier."""


@runtime_checkable
class ConverterComponent(Protocol):
    def convert(self, model: ModelHandle, spec: ConvertSpec) -> ConvertResult: ...


@runtime_checkable
class ExporterComponent(Protocol):
    def export(self, model: ModelHandle, spec: ExportSpec) -> ExportResult:
        """Write a self-contained folder with a `manifest.json`."""

    def runner(self, model: ModelHandle, folder: Path) -> Engine:
        """An engine over an exported folder (`zoo predict --backend NAME --artifacts FOLDER`)."""


@runtime_checkable
class TaskComponent(Protocol):
    def evaluate(self, model: ModelHandle, spec: EvalSpec) -> EvalResult: ...


@runtime_checkable
class DatasetComponent(Protocol):
    def preprocess(self, model: ModelHandle, spec: PreprocessSpec, tokenizer: Tokenizer) -> PreprocessResult: ...


PROTOCOLS: dict[str, type] = {
    "config": ConfigComponent, "tokenizer": TokenizerComponent, "model": ModelComponent,
    "converter": ConverterComponent, "exporter": ExporterComponent, "task": TaskComponent,
    "dataset": DatasetComponent,
}


def protocol_methods(proto: type) -> list[str]:
    return [n for n, v in vars(proto).items() if not n.startswith("_") and callable(v)]


def missing_methods(kind: str, obj: object) -> list[str]:
    """The protocol methods `obj` lacks for `kind` (presence, as runtime_checkable checks; not signatures)."""
    return [n for n in protocol_methods(PROTOCOLS[kind]) if not callable(getattr(obj, n, None))]
