"""GPTBigCode/WizardCoder architecture config: presets, HF config.json and mindformers YAML loaders, param count.

Pure Python (pydantic only): the cards and the CLI read it without importing any ML framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from registry_spec.documents import YAML_SUFFIXES, read_mapping
from registry_spec.errors import InputError

Activation = Literal["gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"]
STARCODER_VOCAB = 49152  # StarCoder's BPE; WizardCoder appends [PAD] = 49152


class GPTBigCodeConfig(BaseModel):
    """Field names follow HF's GPTBigCodeConfig so a config.json maps 1:1."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: PositiveInt = STARCODER_VOCAB + 1
    n_positions: PositiveInt = 8192
    n_embd: PositiveInt = 6144
    n_layer: PositiveInt = 40
    n_head: PositiveInt = 48
    n_inner: PositiveInt | None = None
    activation_function: Activation = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    multi_query: bool = True
    initializer_range: float = 0.02
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = STARCODER_VOCAB
    seq_length: PositiveInt = Field(2048, description="the context the model runs with (<= n_positions)")

    @model_validator(mode="after")
    def _check(self) -> GPTBigCodeConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.seq_length > self.n_positions:
            raise ValueError(f"seq_length {self.seq_length} exceeds n_positions {self.n_positions}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint under its HF name (the LM head is tied to wte and not listed)."""
        h, kv = self.n_embd, 2 * self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "transformer.wte.weight": (self.vocab_size, h),
            "transformer.wpe.weight": (self.n_positions, h),
        }
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            shapes |= {
                p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
                p + "attn.c_attn.weight": (h + kv, h), p + "attn.c_attn.bias": (h + kv,),
                p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                p + "mlp.c_fc.weight": (self.inner_dim, h), p + "mlp.c_fc.bias": (self.inner_dim,),
                p + "mlp.c_proj.weight": (h, self.inner_dim), p + "mlp.c_proj.bias": (h,),
            }
        shapes |= {"transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def summary(self) -> dict[str, Any]:
        return {
            "type": "gpt_bigcode", "vocab_size": self.vocab_size, "hidden_size": self.n_embd,
            "num_layers": self.n_layer, "num_heads": self.n_head, "multi_query": self.multi_query,
            "ffn_size": self.inner_dim, "n_positions": self.n_positions, "seq_length": self.seq_length,
            "activation": self.activation_function, "tied_lm_head": True,
        }

    # ------------------------------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"seq_length"})
        d |= {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "scale_attn_weights": True,
              "attention_softmax_in_fp32": True, "scale_attention_softmax_in_fp32": True, "use_cache": True,
              "tie_word_embeddings": True}
        return d


PRESETS: dict[str, GPTBigCodeConfig] = {
    "wizardcoder-15b": GPTBigCodeConfig(),
    "wizardcoder-3b": GPTBigCodeConfig(n_embd=2816, n_layer=36, n_head=22),
    "wizardcoder-1b": GPTBigCodeConfig(n_embd=2048, n_layer=24, n_head=16),
    "wizardcoder-tiny": GPTBigCodeConfig(n_embd=256, n_layer=4, n_head=4, n_positions=512, seq_length=512),
}

_HF_IGNORED = {
    "model_type", "architectures", "scale_attn_weights", "attention_softmax_in_fp32", "use_cache",
    "scale_attention_softmax_in_fp32", "tie_word_embeddings", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "inference_runner", "max_batch_size", "max_sequence_length", "pad_key_length",
    "pre_allocate_kv_cache", "validate_runner_input", "n_ctx", "id2label", "label2id", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "_attn_implementation_autoset",
    "chunk_size_feed_forward",
}

# the reference's mindformers `model_config` keys -> ours (None = accepted and not needed here)
_MINDFORMERS_KEYS: dict[str, str | None] = {
    "seq_length": "seq_length", "n_position": "n_positions", "vocab_size": "vocab_size",
    "embedding_size": "n_embd", "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
    "hidden_act": "activation_function", "dropout_prob": "embd_pdrop", "hidden_dropout_prob": "resid_pdrop",
    "attention_probs_dropout_prob": "attn_pdrop", "initializer_range": "initializer_range",
    "eos_token": "eos_token_id", "eos_token_id": "eos_token_id", "pad_token": "pad_token_id",
    "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id", "expand_ratio": None,
    **{k: None for k in (
        "type", "param_init_type", "layernorm_dtype", "softmax_dtype", "compute_dtype", "use_past",
        "use_seq_parallel", "use_select_recompute", "checkpoint_name_or_path", "repetition_penalty",
        "max_decode_length", "top_k", "top_p", "do_sample", "use_flash_attention", "batch_size")},
}


def _validated(data: dict[str, Any], source: str) -> GPTBigCodeConfig:
    try:
        return GPTBigCodeConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid model config in {source}: {problems}",
                         "fix the named keys (HF GPTBigCode config.json or mindformers model_config)") from None


def from_hf_dict(d: dict[str, Any], source: str = "config.json", seq_length: int | None = None) -> GPTBigCodeConfig:
    model_type = d.get("model_type", "gpt_bigcode")
    if model_type != "gpt_bigcode":
        raise InputError(f"{source} describes model_type {model_type!r}, not 'gpt_bigcode'",
                         "pass a StarCoder/WizardCoder (GPTBigCode) config.json")
    data = {k: v for k, v in d.items() if k in GPTBigCodeConfig.model_fields and v is not None}
    unknown = sorted(set(d) - set(GPTBigCodeConfig.model_fields) - _HF_IGNORED)
    if unknown and "n_embd" not in d:
        raise InputError(f"{source} has none of the GPTBigCode keys (unrecognised: {', '.join(unknown[:8])})",
                         "pass an HF GPTBigCode config.json")
    data.setdefault("seq_length", min(seq_length or 2048, data.get("n_positions", 8192)))
    if d.get("pad_token_id") is None:
        data["pad_token_id"] = data.get("vocab_size", STARCODER_VOCAB + 1) - 1
    return _validated(data, source)


def from_mindformers_dict(model_config: dict[str, Any], source: str = "yaml") -> GPTBigCodeConfig:
    unknown = sorted(set(model_config) - set(_MINDFORMERS_KEYS))
    if unknown:
        raise InputError(f"{source}: unsupported model_config keys: {', '.join(unknown)}",
                         "remove them or use an HF config.json; supported: " + ", ".join(sorted(_MINDFORMERS_KEYS)))
    data: dict[str, Any] = {}
    for key, value in model_config.items():
        target = _MINDFORMERS_KEYS[key]
        if target:
            data[target] = value
    if "activation_function" in data and data["activation_function"] == "fast_gelu":
        data["activation_function"] = "gelu_fast"
    hidden = data.get("n_embd", 6144)
    if "expand_ratio" in model_config:
        data["n_inner"] = int(model_config["expand_ratio"]) * int(hidden)
    return _validated(data, source)


def load_config(path: str | Path) -> GPTBigCodeConfig:
    """Read an HF config.json (or a checkpoint directory holding one) or a mindformers YAML."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"config file {p} does not exist", "pass an HF config.json or a mindformers YAML")
    doc = read_mapping(p, "config file")
    if p.suffix.lower() in YAML_SUFFIXES:  # a run YAML holds the model's under model.model_config
        mc = (doc.get("model") or {}).get("model_config")
        return from_mindformers_dict(mc if mc is not None else doc, str(p))
    return from_hf_dict(doc, str(p))


def config_file(config_path: str | Path | None, weights: str | Path | None) -> Path | None:
    """`--config`, else the checkpoint folder's own config.json (what HF's `from_pretrained` reads), else None
    (the card's preset)."""
    if config_path is not None:
        return Path(config_path)
    own = None if weights is None else Path(weights) / "config.json"
    return own if own is not None and own.is_file() else None


def resolve_config(model: str, config_path: str | Path | None = None) -> GPTBigCodeConfig:
    """The card's preset, unless `--config` names another architecture."""
    if config_path is not None:
        return load_config(config_path)
    if model not in PRESETS:
        raise InputError(f"no built-in architecture for {model!r}", "pass --config with an HF config.json")
    return PRESETS[model].model_copy()
