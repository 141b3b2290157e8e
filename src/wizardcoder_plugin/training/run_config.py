"""Training settings: `zoo train` flags merged with the reference's mindformers run YAML (`run_wizardcoder.yaml`).

Precedence: flags given on the command line > the YAML > the spec's defaults. Every YAML key is either mapped,
or reported as ignored (with why), never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt

from registry_spec.documents import YAML_SUFFIXES, read_mapping
from registry_spec.errors import InputError
from registry_spec.specs import ParallelSpec, TrainSpec

from ..model.config import GPTBigCodeConfig, config_file, from_mindformers_dict, load_config, resolve_config


class TrainSettings(TrainSpec):
    """Everything a training run needs, resolved: the spec's fields (required where the run needs a value) plus
    the optimizer and loss-scale settings only the run YAML sets. Stored in every checkpoint's state.json."""

    model: str = "custom"
    data: Path
    epochs: PositiveInt = 1
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    bias_correction: bool = Field(True, description="torch AdamW; False = mindspore AdamWeightDecay")
    loss_scale: float = Field(2048.0, gt=0, description="initial dynamic loss scale (fp16 only)")
    loss_scale_factor: float = Field(2.0, gt=1)
    loss_scale_window: PositiveInt = 1000


_OPTIMIZERS = {"adamw": True, "fp32stateadamweightdecay": False, "adamweightdecay": False}
_IGNORED_SECTIONS = {
    "context": "device settings come from the environment", "aicc": "cloud platform", "remote_save_url": "cloud",
    "moe_config": "WizardCoder is not MoE", "auto_tune": "Ascend autotune", "filepath_prefix": "autotune",
    "autotune_per_step": "autotune", "profile": "profiling", "profile_start_step": "profiling",
    "profile_stop_step": "profiling", "init_start_profile": "profiling", "profile_communication": "profiling",
    "profile_memory": "profiling", "trainer": "one trainer", "do_eval": "use `zoo eval`",
    "eval_dataset": "use `zoo eval`", "eval_dataset_task": "use `zoo eval`", "eval_callbacks": "use `zoo eval`",
    "metric": "use `zoo eval`", "processor": "pass --tokenizer", "src_strategy_path_or_dir": "no strategy files",
    "auto_trans_ckpt": "no strategy files", "only_save_strategy": "no strategy files",
    "micro_batch_interleave_num": "Ascend pipeline detail", "layer_scale": "unused by the reference",
    "layer_decay": "unused by the reference", "lr_scale": "unused by the reference",
    "lr_scale_factor": "unused by the reference", "use_parallel": "set by the launcher (msrun)",
    "train_dataset_task": "one dataset type",
}


def _get(doc: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def run_yaml(path: Path | None) -> dict | None:
    """The parsed document when `path` is a mindformers run YAML (not a bare model config), else None."""
    if path is None or path.suffix.lower() not in YAML_SUFFIXES or not path.is_file():
        return None
    doc = read_mapping(path, "config file")
    is_run = any(k in doc for k in ("runner_config", "optimizer", "lr_schedule", "trainer"))
    return doc if is_run else None


def from_run_yaml(doc: dict, path: Path) -> tuple[dict[str, Any], list[str]]:
    """(settings taken from the reference's run YAML, notes on keys not applied)."""
    out: dict[str, Any] = {}
    notes: list[str] = []

    def put(key: str, value: Any) -> None:
        if value is not None:
            out[key] = value

    put("seed", doc.get("seed"))
    run_mode = doc.get("run_mode")
    if run_mode in ("train", "finetune"):
        out["mode"] = "pretrain" if run_mode == "train" else "finetune"
    if doc.get("load_checkpoint"):
        out["weights"] = Path(doc["load_checkpoint"])
    put("resume", doc.get("resume_training") or None)
    put("batch_size", _get(doc, "runner_config", "batch_size"))
    put("epochs", _get(doc, "runner_config", "epochs"))
    if _get(doc, "runner_config", "sink_mode"):
        notes.append("runner_config.sink_mode: ignored (dataset sink mode does not finish on CPU; steps run one "
                     "by one)")
    scale = _get(doc, "runner_wrapper", "scale_sense") or {}
    put("loss_scale", scale.get("loss_scale_value"))
    put("loss_scale_factor", scale.get("scale_factor"))
    put("loss_scale_window", scale.get("scale_window"))
    if _get(doc, "runner_wrapper", "use_clip_grad") is False:
        out["grad_clip"] = 0.0
    opt = doc.get("optimizer") or {}
    if opt:
        kind = str(opt.get("type", "AdamW")).lower()
        if kind not in _OPTIMIZERS:
            raise InputError(f"{path}: optimizer type {opt.get('type')!r} is not supported",
                             "use AdamW or FP32StateAdamWeightDecay")
        out["bias_correction"] = _OPTIMIZERS[kind]
        for key in ("beta1", "beta2", "eps", "weight_decay"):
            put(key, opt.get(key))
        if "learning_rate" in opt and not doc.get("lr_schedule"):
            out["learning_rate"] = opt["learning_rate"]
    lr = doc.get("lr_schedule") or {}
    if lr:
        if str(lr.get("type", "CosineWithWarmUpLR")) != "CosineWithWarmUpLR":
            raise InputError(f"{path}: lr_schedule type {lr.get('type')!r} is not supported",
                             "use CosineWithWarmUpLR (learning_rate, lr_end, warmup_steps)")
        put("learning_rate", lr.get("learning_rate"))
        put("lr_end", lr.get("lr_end"))
        put("warmup_steps", lr.get("warmup_steps"))
        if lr.get("total_steps") not in (None, -1):
            out["max_steps"] = lr["total_steps"]
    pc = doc.get("parallel_config") or {}
    parallel = {k: pc[k] for k in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num",
                                   "optimizer_shard") if k in pc}
    if _get(doc, "recompute_config", "recompute") is not None:
        parallel["recompute"] = bool(_get(doc, "recompute_config", "recompute"))
    if parallel:
        out["parallel"] = ParallelSpec(**parallel)
    for key in ("vocab_emb_dp", "gradient_aggregation_group"):
        if key in pc:
            notes.append(f"parallel_config.{key}: ignored (Ascend sharding detail)")
    put("data", _get(doc, "train_dataset", "data_loader", "dataset_dir") or None)
    for cb in doc.get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("type") == "CheckpointMonitor":
            put("save_steps", cb.get("save_checkpoint_steps"))
            put("keep_checkpoints", cb.get("keep_checkpoint_max"))
    if doc.get("output_dir"):
        out["output_dir"] = Path(doc["output_dir"])
    handled = {"seed", "run_mode", "load_checkpoint", "resume_training", "runner_config", "runner_wrapper",
               "optimizer", "lr_schedule", "parallel_config", "recompute_config", "train_dataset", "callbacks",
               "output_dir", "model", "parallel"}
    for key in doc:
        if key in _IGNORED_SECTIONS:
            notes.append(f"{key}: ignored ({_IGNORED_SECTIONS[key]})")
        elif key not in handled:
            notes.append(f"{key}: unsupported key, ignored")
    return out, notes


def resolve_train(spec: TrainSpec, model: str) -> tuple[TrainSettings, GPTBigCodeConfig, list[str]]:
    """Settings, model architecture and notes for a `zoo train` call."""
    yaml_values: dict[str, Any] = {}
    notes: list[str] = []
    config = resolve_config(model, None)
    doc = run_yaml(spec.config)
    if doc is not None:
        yaml_values, notes = from_run_yaml(doc, spec.config)  # type: ignore[arg-type]
        mc = _get(doc, "model", "model_config")
        if mc is not None:
            config = from_mindformers_dict(mc, str(spec.config))
    elif (path := config_file(spec.config, spec.weights)) is not None:
        config = load_config(path)
    # flags given on the command line > the YAML > the spec's defaults
    merged = spec.model_dump(exclude_none=True) | yaml_values | spec.model_dump(include=spec.model_fields_set)
    if merged.get("data") is None:
        raise InputError("no training data given", "pass --data OUT.mindrecord (from `zoo preprocess`)")
    try:
        settings = TrainSettings.model_validate(merged)
    except Exception as exc:  # pydantic ValidationError: name the fields
        raise InputError(f"invalid training settings: {exc}", "fix the named fields") from None
    return settings, config, notes
