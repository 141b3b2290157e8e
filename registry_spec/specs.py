"""Typed specs: the model card, one spec per command and one result per spec (pydantic v2, extra fields forbidden).

The CLI builds its flags from these fields (`max_new_tokens` -> `--max-new-tokens`), so they are the single source
of truth for every command's options. Fields marked `free_text` take repeated flags verbatim (never comma-split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, model_validator

Capability = Literal["convert", "preprocess", "train", "finetune", "predict", "export", "eval", "bench"]
CAPABILITIES: tuple[str, ...] = ("convert", "preprocess", "train", "finetune", "predict", "export", "eval", "bench")
Precision = Literal["fp32", "fp16", "bf16"]
FREE_TEXT = {"free_text": True}


def _not_a_folder(path: Path) -> Path:
    if path.is_dir():
        raise ValueError(f"{path} is a folder: name a file (for example {path / 'out.jsonl'})")
    return path


def _not_a_file(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file: name a folder")
    return path


# where a command writes: refused at once when the path is the wrong kind, not after the work
OutputFile = Annotated[Path, AfterValidator(_not_a_folder)]
OutputDir = Annotated[Path, AfterValidator(_not_a_file)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Kind = Literal["config", "tokenizer", "model", "converter", "exporter", "task", "dataset"]
KINDS: tuple[str, ...] = ("config", "tokenizer", "model", "converter", "exporter", "task", "dataset")


class ComponentInfo(_Strict):
    """One registered component. `family` or `models` say whose models it serves (neither: every model)."""

    kind: Kind
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="the name commands select it by "
                      "(an exporter's backend, a task, a dataset format, a converter)")
    impl: str = Field(pattern=r"^[\w.]+:[\w.]+$", description="import string 'package.module:object'")
    family: str = Field("", description="model family served, e.g. 'gpt_bigcode'")
    models: list[str] = Field(default_factory=list, description="model names served (instead of a family)")
    source: str = Field("", description="converter: the format it reads")
    target: str = Field("", description="converter: the format it writes")
    default: bool = Field(False, description="chosen when a command names no component of this kind")
    description: str = ""
    requires: str = Field("", description="how to install what it needs, shown when that is missing")

    @model_validator(mode="after")
    def _converter_formats(self) -> ComponentInfo:
        if self.kind == "converter" and not (self.source and self.target):
            raise ValueError("a converter names its source and target formats")
        return self

    def serves(self, name: str, family: str) -> bool:
        if self.models:
            return name in self.models
        return not self.family or self.family == family


class ModelCard(_Strict):
    """A model's name and facts. What it can do comes from the components registered for it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    aliases: list[str] = Field(default_factory=list)
    family: str
    description: str = ""
    architecture: dict[str, Any] = Field(default_factory=dict, description="summary: layers, hidden size, heads ...")
    params: int = Field(ge=0, description="parameter count, computed from the architecture")
    memory: dict[str, Any] = Field(default_factory=dict, description="bytes per dtype, per parameter and per token "
                                   "(weights, KV cache, activations), for sizing a run before it starts")
    context_length: PositiveInt
    license: str = ""


class PluginManifest(_Strict):
    name: str
    version: str
    requires_spec: str = Field(">=2.0,<3", description="PEP 440 range of registry_spec versions")
    description: str = ""


# ----------------------------------------------------------------------------------------------------- commands
class _ModelSpec(_Strict):
    model: str = Field(description="model name, alias, or qualified 'plugin:name'")


class _WeightsSpec(_ModelSpec):
    weights: Path | None = Field(None, description="a checkpoint file or folder the model component reads")
    config: Path | None = Field(None, description="a config file the config component reads, overriding the card")


class ConvertSpec(_ModelSpec):
    input: Path
    output: Path
    to: str | None = Field(None, description="target format, as the model's converters name it (`zoo show "
                           "MODEL`); default: the default converter that reads the input")
    dtype: Literal["keep", "fp32", "fp16", "bf16"] = "keep"
    config: Path | None = None
    max_shard_size: str = Field("5GB", description="split a checkpoint folder's safetensors past this size "
                                "(HF's spelling: 5GB, 500MB)")


class ConvertResult(_Strict):
    output: Path
    direction: str
    tensors: int
    parameters: int
    dtype: str
    seconds: float


class PreprocessSpec(_ModelSpec):
    input: Path
    output: OutputFile
    tokenizer: Path | None = None
    seq_length: PositiveInt = 2048
    limit: PositiveInt | None = None
    strict: bool = False
    format: Literal["auto", "instruction", "text"] = "auto"
    dataset: str | None = Field(None, description="output format, a dataset component of the model; default: "
                                "the model's default")


class PreprocessResult(_Strict):
    output: Path
    rows_read: int
    rows_written: int
    rows_skipped: int
    tokens: int
    problems: list[str] = Field(default_factory=list, description="first reported bad rows")


class ParallelSpec(_Strict):
    data_parallel: PositiveInt = 1
    model_parallel: PositiveInt = 1
    pipeline_stage: PositiveInt = 1
    micro_batch_num: PositiveInt = 1
    optimizer_shard: bool = False
    recompute: bool = False


class TrainSpec(_WeightsSpec):
    data: Path | None = Field(None, description="the output of `zoo preprocess` (or the config file's dataset)")
    mode: Literal["pretrain", "finetune"] = "finetune"
    output_dir: OutputDir
    max_steps: PositiveInt | None = Field(None, description="optimizer steps; wins over epochs, as in HF's Trainer")
    epochs: PositiveInt | None = Field(None, description="passes over the data (default 1) when max_steps is unset")
    batch_size: PositiveInt = 8
    seq_length: PositiveInt | None = None
    learning_rate: float = Field(2e-5, gt=0)
    lr_end: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    grad_accum: PositiveInt = 1
    precision: Precision = "fp32"
    save_steps: PositiveInt | None = None
    keep_checkpoints: PositiveInt = 3
    resume: bool = False
    seed: int = 0
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)


class TrainResult(_Strict):
    output_dir: Path
    steps: int
    final_loss: float
    checkpoint: Path
    metrics_file: Path
    tokens_per_s: float


class PredictSpec(_WeightsSpec):
    tokenizer: Path | None = None
    prompt: list[str] = Field(default_factory=list, json_schema_extra=FREE_TEXT)
    input: Path | None = Field(None, description="JSONL with an 'instruction' or 'prompt' per row")
    output: OutputFile | None = Field(None, description="write one JSON object per prompt to this JSONL file")
    template: str = Field("default", description="prompt template; 'none' sends the raw prompt")
    max_new_tokens: PositiveInt = 128
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, json_schema_extra=FREE_TEXT)
    stream: bool = False
    truncate: bool = Field(False, description="left-truncate prompts longer than the context instead of failing")
    batch_size: PositiveInt = 8
    use_cache: bool = True
    precision: Precision = "fp32"
    backend: str = "online"
    artifacts: Path | None = None


class Completion(_Strict):
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "eos"]
    prompt_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float


class PredictResult(_Strict):
    completions: list[Completion]


class ExportSpec(_WeightsSpec):
    backend: str | None = Field(None, description="an exporter of the model (`zoo show MODEL`); default: the "
                                "model's default")
    output_dir: OutputDir
    tokenizer: Path | None = None
    batch_size: PositiveInt = 1
    seq_length: PositiveInt | None = None
    mode: Literal["incremental", "autoregressive"] = "incremental"
    precision: Precision = "fp32"


class ExportResult(_Strict):
    output_dir: Path
    backend: str
    mode: str
    manifest: Path
    files: list[str]


class EvalSpec(_ModelSpec):
    task: str | None = Field(None, description="an evaluation task of the model (`zoo show MODEL`); default: "
                             "the model's default")
    weights: Path | None = None
    config: Path | None = None
    tokenizer: Path | None = None
    data: Path | None = None
    limit: PositiveInt | None = None
    n_samples: PositiveInt = 1
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_length: PositiveInt = 2048
    batch_size: PositiveInt = 8
    output_dir: OutputDir | None = None
    workers: PositiveInt = 2
    timeout: float = Field(3.0, gt=0)
    sandbox: Literal["auto", "bwrap", "unshare", "process"] = Field(
        "auto", description="where generated programs run; auto = the strongest mode available")
    shard: str | None = Field(None, pattern=r"^\d+/\d+$", description="I/N: every N-th problem from I")
    load_generations: Path | None = None
    merge: list[Path] = Field(default_factory=list)


class EvalResult(_Strict):
    task: str
    n_problems: int
    passed: int
    pass_at_1: float = Field(alias="pass@1")
    pass_at_k: dict[str, float] = Field(default_factory=dict)
    output_dir: Path | None = None


class BenchSpec(_WeightsSpec):
    backends: list[str] = Field(default_factory=lambda: ["online"])
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1])
    lengths: list[PositiveInt] = Field(default_factory=lambda: [160])
    prompt_length: PositiveInt = 32
    repeats: PositiveInt = 3
    compare: list[str] = Field(default_factory=list)
    output_dir: OutputDir | None = None


class BenchRow(_Strict):
    backend: str
    batch_size: int
    total_length: int
    decode_tokens_per_s: float
    prefill_ms: float
    extra: dict[str, Any] = Field(default_factory=dict)


class BenchResult(_Strict):
    rows: list[BenchRow]


class ServeSpec(_WeightsSpec):
    tokenizer: Path | None = None
    precision: Precision = "fp32"
    backend: str = Field("online", description="'online' (the model's engine) or an exporter's backend, over "
                         "--artifacts")
    artifacts: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: PositiveInt = Field(8, description="rows decoded together (the running batch's slots)")
    max_queue: PositiveInt = Field(64, description="requests waiting for a slot; more are answered 429")
    seq_length: PositiveInt | None = Field(None, description="tokens a request may hold, prompt and completion "
                                           "(default: the model's context)")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on every route but /health "
                                "and /metrics (default: $ZOO_API_KEY)")
    shutdown_timeout: float = Field(10.0, gt=0, description="seconds in-flight requests get to finish on SIGTERM")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


class ServeResult(_Strict):
    requests: int
    completions: int
    completion_tokens: int
    seconds: float


# command name -> (spec, result)
COMMANDS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "convert": (ConvertSpec, ConvertResult),
    "preprocess": (PreprocessSpec, PreprocessResult),
    "train": (TrainSpec, TrainResult),
    "predict": (PredictSpec, PredictResult),
    "export": (ExportSpec, ExportResult),
    "eval": (EvalSpec, EvalResult),
    "bench": (BenchSpec, BenchResult),
    "serve": (ServeSpec, ServeResult),
}


def required_capability(command: str, spec: BaseModel) -> str:
    """The card capability a command needs (`train --mode finetune` needs `finetune`)."""
    if command == "train":
        return str(getattr(spec, "mode", "train")).replace("pretrain", "train")
    if command == "serve":  # serving is predicting over HTTP
        return "predict"
    return command


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "ModelCard": ModelCard,
    "PluginManifest": PluginManifest,
    "ComponentInfo": ComponentInfo,
    **{cls.__name__: cls for spec, res in COMMANDS.values() for cls in (spec, res)},
}
