"""The adapter protocol: one method per capability, each taking its spec and returning its result."""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from .errors import CapabilityNotSupportedError, PluginLoadError
from .specs import (
    BenchResult,
    BenchSpec,
    ConvertResult,
    ConvertSpec,
    EvalResult,
    EvalSpec,
    ExportResult,
    ExportSpec,
    ModelCard,
    PredictResult,
    PredictSpec,
    PreprocessResult,
    PreprocessSpec,
    TrainResult,
    TrainSpec,
)

# capability -> adapter method that serves it
CAPABILITY_METHODS: dict[str, str] = {
    "convert": "convert",
    "preprocess": "preprocess",
    "train": "train",
    "finetune": "train",
    "predict": "predict",
    "export": "export",
    "eval": "evaluate",
    "bench": "bench",
}


@runtime_checkable
class ModelAdapter(Protocol):
    card: ModelCard

    def convert(self, spec: ConvertSpec) -> ConvertResult: ...
    def preprocess(self, spec: PreprocessSpec) -> PreprocessResult: ...
    def train(self, spec: TrainSpec) -> TrainResult: ...
    def predict(self, spec: PredictSpec) -> PredictResult: ...
    def export(self, spec: ExportSpec) -> ExportResult: ...
    def evaluate(self, spec: EvalSpec) -> EvalResult: ...
    def bench(self, spec: BenchSpec) -> BenchResult: ...


class BaseAdapter:
    """Inherit and override the capabilities you implement; the rest refuse with CapabilityNotSupportedError."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    def _unsupported(self, capability: str):  # noqa: ANN202
        raise CapabilityNotSupportedError(self.card.name, capability, self.card.capabilities)

    def convert(self, spec: ConvertSpec) -> ConvertResult:
        self._unsupported("convert")

    def preprocess(self, spec: PreprocessSpec) -> PreprocessResult:
        self._unsupported("preprocess")

    def train(self, spec: TrainSpec) -> TrainResult:
        self._unsupported(spec.mode.replace("pretrain", "train"))

    def predict(self, spec: PredictSpec) -> PredictResult:
        self._unsupported("predict")

    def export(self, spec: ExportSpec) -> ExportResult:
        self._unsupported("export")

    def evaluate(self, spec: EvalSpec) -> EvalResult:
        self._unsupported("eval")

    def bench(self, spec: BenchSpec) -> BenchResult:
        self._unsupported("bench")


def import_string(target: str) -> object:
    """Import 'package.module:Attr' (the form cards use for adapters and runners)."""
    module_name, _, attr = target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PluginLoadError(module_name.split(".")[0], f"cannot import {target!r}: {exc}") from exc
    return obj


def implements(adapter_cls: type, capability: str) -> bool:
    """True when the adapter class overrides the method serving `capability` (not BaseAdapter's refusal)."""
    method = CAPABILITY_METHODS[capability]
    impl = getattr(adapter_cls, method, None)
    return callable(impl) and impl is not getattr(BaseAdapter, method, None)


def load_adapter(card: ModelCard) -> BaseAdapter:
    cls = import_string(card.adapter)
    return cls(card)  # type: ignore[operator]
