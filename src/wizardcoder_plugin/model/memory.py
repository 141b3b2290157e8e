"""The memory plan: what a run will hold (weights per dtype, the LM head's copies, the KV cache of a batch and
length, the largest transient activations, the training state) from the architecture alone, and the memory the
process may use (cgroup limit, MemAvailable, or $ZOO_MEMORY_LIMIT), so a run that cannot fit stops before it
allocates, with the figures and the options. Pure Python: `zoo show` reads it without MindSpore."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from registry_spec.errors import InputError

from .config import GPTBigCodeConfig

BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Python, MindSpore's libraries and runtime before the first tensor (benchmarks/startup.py measures it;
# tests/test_memory.py checks the plan's total against a run)
FRAMEWORK_BYTES = 640 * 2**20
GIB = 2**30


def weight_bytes(config: GPTBigCodeConfig, precision: str) -> int:
    """LayerNorms stay fp32 at every precision; every other tensor is in the compute dtype."""
    total = 0
    for name, shape in config.param_shapes().items():
        n = 1
        for d in shape:
            n *= d
        total += n * (4 if ".ln_" in name or "ln_f" in name else BYTES[precision])
    return total


def kv_bytes_per_token(config: GPTBigCodeConfig, precision: str) -> int:
    """Keys and values of every layer for one token of one row (multi-query: one head)."""
    return 2 * config.n_layer * config.kv_heads * config.head_dim * BYTES[precision]


def prefill_activation_bytes(config: GPTBigCodeConfig, batch: int, length: int) -> int:
    """The largest live tensors of one layer's prefill in fp32: the hidden states and their projections, the
    MLP's inner activations, the attention scores and probabilities (B x heads x S x S), and the logits."""
    e, kv = config.n_embd, 2 * config.kv_heads * config.head_dim
    per_token = (4 * e + kv + 2 * config.inner_dim) * 4
    scores = 2 * config.n_head * length * length * 4
    return batch * (length * per_token + scores + config.vocab_size * 4)


# MindSpore's autodiff holds more than the count of activations a backward pass needs (its fp32 LayerNorm and
# softmax intermediates, the backward's own temporaries, its memory pool's rounding): the factor that brings the
# count to a measured `zoo train` (benchmarks/train_memory.py at six batch sizes and lengths, 2026-12-07 14:29;
# tests/test_memory.py checks the whole plan against one)
_AUTODIFF_FACTOR = 1.9


def training_activation_bytes(config: GPTBigCodeConfig, batch: int, length: int, precision: str) -> int:
    """Activations kept for the backward pass without recomputation (Korthikanti et al. 2022: s b h (34 + 5 a s / h)
    bytes per layer at 2 bytes per value), plus the logits, their softmax and gradient in fp32; times
    `_AUTODIFF_FACTOR`."""
    h, a = config.n_embd, config.n_head
    per_layer = length * batch * h * (34 + 5 * a * length / h) * BYTES[precision] / 2
    return int(_AUTODIFF_FACTOR * (config.n_layer * per_layer + 3 * batch * length * config.vocab_size * 4))


def training_backward_bytes(config: GPTBigCodeConfig, precision: str) -> int:
    """What the forward + backward graph holds per parameter beside the state and the activations: the gradients
    in flight before they join the fp32 accumulators (each joins as soon as it exists) and the weight gradients'
    intermediates, which MindSpore's memory pool keeps from one step to the next; in fp32 about 3 bytes a parameter
    measured, counted as 4. fp16 / bf16 (not measurable on CPU) add an fp32 copy of each gradient. (The optimizer's
    update runs in place: it adds nothing measurable.)"""
    return config.num_parameters() * (4 if precision == "fp32" else BYTES[precision] + 4)


@dataclass
class MemoryPlan:
    """Bytes a run will hold, by part; `total` is what must fit."""

    what: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {b / GIB:.2f}" for name, b in self.parts.items() if b) + " GiB"


def inference_plan(config: GPTBigCodeConfig, precision: str, batch: int, length: int,
                   prompt_length: int = 0) -> MemoryPlan:
    """`zoo predict` / `eval` / `bench`: the weights, the LM head's extra copy (the larger of the int8 screening
    table of greedy native decoding and the transposed copy, only ever made for heads up to 512 MB), a KV cache
    for `batch` rows of `length` tokens and the activations of a `prompt_length` prefill."""
    head = config.vocab_size * config.n_embd
    head_copy = max(head + config.vocab_size * 12, head * BYTES[precision] if head * BYTES[precision] <= 2**29 else 0)
    return MemoryPlan("inference", {
        "weights": weight_bytes(config, precision), "head copy": head_copy,
        "KV cache": batch * length * kv_bytes_per_token(config, precision),
        "activations": prefill_activation_bytes(config, batch, prompt_length) if prompt_length else 0,
        "framework": FRAMEWORK_BYTES})


def check_inference(config: GPTBigCodeConfig, precision: str, batch: int, command: str,
                    extra: dict[str, int] | None = None) -> None:
    """Before the network is built: the weights, head copy, framework and a full-context KV cache for `batch`."""
    plan = inference_plan(config, precision, batch, config.seq_length)
    plan.parts |= extra or {}
    check(plan, command, [*(["--precision fp16 (half the weights)"] if precision == "fp32" else []),
                          "a smaller --batch-size", "a shorter context (seq_length in --config)",
                          "model parallel: not available yet"])


def check_bucket(config: GPTBigCodeConfig, precision: str, batch: int, max_len: int, prompt_len: int) -> None:
    """Before a generation bucket's KV cache and graphs exist: do they fit in what is left now?"""
    plan = MemoryPlan("bucket", {"KV cache": batch * max_len * kv_bytes_per_token(config, precision),
                                 "activations": prefill_activation_bytes(config, batch, prompt_len)})
    check(plan, f"generating {batch} rows of up to {max_len} tokens",
          ["a smaller --batch-size", "shorter prompts or fewer --max-new-tokens",
           "--precision fp16" if precision == "fp32" else "a smaller model"])


def training_state_bytes(config: GPTBigCodeConfig, precision: str) -> int:
    """fp32 gradient accumulators and AdamW's two fp32 moments for every parameter, and an fp32 master copy of
    every parameter held in fp16 / bf16 (all but the LayerNorms)."""
    n = config.num_parameters()
    low = 0 if precision == "fp32" else (weight_bytes(config, precision) - 4 * _layer_norm_params(config)) // 2
    return 12 * n + 4 * low


def _layer_norm_params(config: GPTBigCodeConfig) -> int:
    return (2 * config.n_layer + 1) * 2 * config.n_embd


def training_plan(config: GPTBigCodeConfig, precision: str, batch: int, length: int) -> MemoryPlan:
    """`zoo train`: the parameters, their training state, the backward's gradients, the activations of one
    micro-batch."""
    return MemoryPlan("training", {
        "weights": weight_bytes(config, precision),
        "gradients + AdamW state": training_state_bytes(config, precision),
        "backward gradients": training_backward_bytes(config, precision),
        "activations": training_activation_bytes(config, batch, length, precision), "framework": FRAMEWORK_BYTES})


def card_figures(config: GPTBigCodeConfig) -> dict[str, object]:
    """Per-parameter and per-token figures for `zoo show --json`."""
    return {
        "parameters": config.num_parameters(),
        "weights_bytes": {p: weight_bytes(config, p) for p in BYTES},
        "training_state_bytes": {p: training_state_bytes(config, p) for p in BYTES},
        "training_backward_bytes": {p: training_backward_bytes(config, p) for p in BYTES},
        "kv_cache_bytes_per_token": {p: kv_bytes_per_token(config, p) for p in BYTES},
        "prefill_activation_bytes_per_token": (4 * config.n_embd + 2 * config.kv_heads * config.head_dim
                                               + 2 * config.inner_dim) * 4,
        "attention_scores_bytes_per_token_squared": 2 * config.n_head * 4,
        "logits_bytes_per_row": config.vocab_size * 4,
        "framework_bytes": FRAMEWORK_BYTES,
    }


# ------------------------------------------------------------------------------------------- what is available
def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> tuple[int, str] | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1), if it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":
            base = Path("/sys/fs/cgroup") / rel
            if not (base / "memory.max").exists():
                base = Path("/sys/fs/cgroup/unified") / rel
            limit, usage = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel
            limit, usage = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
        else:
            continue
        if limit is not None and limit < 2**60:
            return max(limit - (usage or 0), 0), f"the cgroup limit of {limit / GIB:.2f} GiB"
    return None


def available() -> tuple[int, str]:
    """(bytes this process may still allocate, where the figure comes from)."""
    from ..weights import parse_size

    if os.environ.get("ZOO_MEMORY_LIMIT"):
        return parse_size(os.environ["ZOO_MEMORY_LIMIT"]), "$ZOO_MEMORY_LIMIT"
    found = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        meminfo = ""
    found += [(int(line.split()[1]) * 1024, "MemAvailable") for line in meminfo.splitlines()
              if line.startswith("MemAvailable:")]
    room = _cgroup_room()
    if room is not None:
        found.append(room)
    return min(found) if found else (2**62, "no limit found")


def check(plan: MemoryPlan, command: str, options: list[str]) -> None:
    """Refuse (exit 2) a plan that exceeds what is available, naming the figures and the options."""
    room, source = available()
    if plan.total <= room:
        return
    raise InputError(
        f"{command} needs about {plan.total / GIB:.2f} GiB ({plan.describe()}) but {room / GIB:.2f} GiB is "
        f"available ({source})", "options: " + "; ".join(options) + " (or run where more memory is free)")
