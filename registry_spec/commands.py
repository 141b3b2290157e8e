"""The generic commands, each a composition of the model's resolved components: predict = config → tokenizer →
the model's engine (or an exporter's runner) → the host's generation loop; export = the exporter registered for
the backend; convert = the converter registered for the formats; train = the model's trainer; preprocess and eval
= the dataset format and task registered under the name."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from .entries import RegisteredComponent
from .errors import BackendUnavailableError, CapabilityNotSupportedError, InputError
from .handle import ModelHandle
from .predict import read_prompts, run_predict
from .specs import (
    BenchSpec,
    ConvertSpec,
    EvalSpec,
    ExportSpec,
    PredictSpec,
    PreprocessSpec,
    ServeSpec,
    TrainSpec,
    required_capability,
)


def predict(h: ModelHandle, spec: PredictSpec) -> BaseModel:
    prompts = read_prompts(spec, h.format_prompt)  # a bad input file is refused before the weights load
    engine, tok = h.generator(spec)
    return run_predict(spec, engine, tok, prompts)


def export(h: ModelHandle, spec: ExportSpec) -> BaseModel:
    rc = h.resolve("exporter", spec.backend)
    return h.load(rc).export(h, spec.model_copy(update={"backend": rc.info.name}))


def converter_for(h: ModelHandle, spec: ConvertSpec) -> RegisteredComponent:
    """The converter writing `spec.to` (any, if unset) that accepts the input (those without `accepts` take any)."""
    def fits(rc: RegisteredComponent) -> bool:
        if spec.to is not None and rc.info.target != spec.to:
            return False
        accepts = getattr(h.load(rc), "accepts", None)
        return accepts is None or bool(accepts(spec.input))

    if not spec.input.exists():
        raise InputError(f"input {spec.input} does not exist", "pass the checkpoint file or folder to convert")
    if not any(fits(rc) for rc in h.candidates("converter")):
        known = ", ".join(f"{c.info.source} -> {c.info.target} ({c.qualified_name})" for c in h.candidates("converter"))
        target = f" into {spec.to!r}" if spec.to else ""
        raise InputError(f"no converter of {h.name} reads {spec.input}{target}",
                         f"its converters: {known or 'none'}; check the input path and --to")
    return h.resolve("converter", None, where=fits)


def convert(h: ModelHandle, spec: ConvertSpec) -> BaseModel:
    rc = converter_for(h, spec)
    return h.load(rc).convert(h, spec.model_copy(update={"to": rc.info.target}))


def train(h: ModelHandle, spec: TrainSpec) -> BaseModel:
    return h.component("model").trainer(h, spec).train()


def preprocess(h: ModelHandle, spec: PreprocessSpec) -> BaseModel:
    rc = h.resolve("dataset", spec.dataset)
    return h.load(rc).preprocess(h, spec.model_copy(update={"dataset": rc.info.name}), h.tokenizer(spec.tokenizer))


def evaluate(h: ModelHandle, spec: EvalSpec) -> BaseModel:
    rc = h.resolve("task", spec.task)
    return h.load(rc).evaluate(h, spec.model_copy(update={"task": rc.info.name}))


def bench(h: ModelHandle, spec: BenchSpec) -> BaseModel:
    return h.component("model").bench(h, spec)


def serve(h: ModelHandle, spec: ServeSpec) -> BaseModel:
    try:
        from .serving.server import serve as run_server
    except ImportError as exc:
        raise BackendUnavailableError("serve", f"the HTTP stack is not installed (no module {exc.name!r})",
                                      "pip install fastapi uvicorn sse-starlette prometheus-client (the project's "
                                      "`serve` extra)") from None
    return run_server(h, spec)


RUNNERS: dict[str, Callable[[ModelHandle, BaseModel], BaseModel]] = {
    "convert": convert, "preprocess": preprocess, "train": train, "predict": predict, "export": export,
    "eval": evaluate, "bench": bench, "serve": serve,  # type: ignore[dict-item]
}


def run(command: str, h: ModelHandle, spec: BaseModel) -> BaseModel:
    """Run `command` on the resolved model after checking its components provide the capability."""
    capability = required_capability(command, spec)
    if capability not in h.capabilities:
        raise CapabilityNotSupportedError(h.name, capability, h.capabilities)
    return RUNNERS[command](h, spec.model_copy(update={"model": h.name}))
