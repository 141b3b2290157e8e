"""Training math as MindSpore graphs: the causal-LM loss, gradient accumulation, AdamW, the LR schedule and
dynamic loss scaling.

The optimizer step is split in two graph calls so the host can decide between them: `GradStats` (all-reduce the
accumulated gradients across data-parallel ranks, return their squared norm) and, when that norm is finite,
`AdamW` (unscale, clip, update, clear). An overflowing fp16 step only clears the accumulators (`ClearGrads`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

IGNORE_INDEX = -100


class TokenNLL(nn.Cell):
    """Per-token negative log-likelihoods: fp32 logits [R,V], labels [R] -> [R], 0 at ignored labels (-100);
    LogSoftmax + GatherD (kernels.cells.NativeTokenNLL substitutes one native pass)."""

    def construct(self, logits: Tensor, labels: Tensor) -> Tensor:
        flat = labels.reshape(-1, 1)
        keep = flat != IGNORE_INDEX
        logp = ops.log_softmax(logits, axis=-1)
        nll = -ops.gather_elements(logp, 1, ops.select(keep, flat, ops.zeros_like(flat))) * keep.astype(ms.float32)
        return nll.reshape(-1)


def causal_lm_loss(logits: Tensor, labels: Tensor, nll: nn.Cell) -> Tensor:
    """Mean next-token cross-entropy over labels != -100 (logits [B,S,V] predict labels [B,S], already shifted),
    from the per-token losses `nll` (a TokenNLL) computes. Equal to HF's loss; 0 (not NaN) when a batch has no
    labelled token."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).astype(ms.float32)
    flat = labels.reshape(-1)
    keep_f = (flat != IGNORE_INDEX).astype(ms.float32)
    return nll(flat_logits, flat).sum() / ops.maximum(keep_f.sum(), 1.0)


class CausalLMLoss(nn.Cell):
    """rows [B, S+1] -> loss of predicting tokens 1..S from 0..S-1 (the reference's input/label shift); `nll`: the
    per-token losses (default TokenNLL)."""

    def __init__(self, model: nn.Cell, pad_token_id: int, nll: nn.Cell | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.model = model
        self.pad = pad_token_id
        self.nll = nll if nll is not None else TokenNLL()

    def construct(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        tokens, targets = input_ids[:, :-1], labels[:, 1:]
        b, s = tokens.shape
        positions = ops.arange(0, s, dtype=ms.int32).reshape(1, s).broadcast_to((b, s))
        logits = self.model(tokens, positions, (tokens != self.pad).astype(ms.int32))
        return causal_lm_loss(logits, targets, self.nll)


class AccumulateGrads(nn.Cell):
    """Forward + backward of one micro-batch; gradients of (loss * scale) are added to the accumulators, or, with
    `overwrite` (one micro-batch per step), written over them (a copy instead of a read-add-write pass)."""

    def __init__(self, loss_net: CausalLMLoss, params: ParameterTuple, accum: ParameterTuple,
                 overwrite: bool = False) -> None:
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = params
        self.accum = accum
        self.update = ops.Assign() if overwrite else ops.AssignAdd()
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)

    def construct(self, input_ids: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
        loss = self.loss_net(input_ids, labels)
        grads = self.grad(self.loss_net, self.params)(input_ids, labels, scale)
        out = loss
        # last parameter first, the order the backward produces them in: each gradient then joins its accumulator
        # (and is freed) as soon as it exists, instead of every one living until the first parameter's is done
        # (−0.46 GiB of 4.47 at tiny_starcoder 1 × 128, the same numbers; RESULTS.md)
        for i in range(len(grads) - 1, -1, -1):  # index loops: graph mode does not take zip(strict=...)
            out = ops.depend(out, self.update(self.accum[i], grads[i].astype(ms.float32)))
        return out


class SquaredNorm(nn.Cell):
    """The squared L2 norm of a tuple of tensors (kernels.cells.NativeSquaredNorm substitutes one native pass per
    tensor with float64 partials)."""

    def construct(self, grads: tuple) -> Tensor:
        total = ops.zeros((), ms.float32)
        for g in grads:  # last axis first: MindSpore's CPU all-axes ReduceSum is far slower on large tensors
            total = total + (g * g).sum(-1).sum()
        return total


class GradStats(nn.Cell):
    """All-reduces the accumulators over data-parallel ranks (mean) and returns their squared L2 norm (`norm`,
    default SquaredNorm)."""

    def __init__(self, accum: ParameterTuple, reducer: nn.Cell | None, norm: nn.Cell | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.accum = accum
        self.reducer = reducer
        self.norm = norm if norm is not None else SquaredNorm()

    def construct(self) -> Tensor:
        grads = tuple(self.accum)
        written = ops.zeros((), ms.float32)
        if self.reducer is not None:
            reduced = self.reducer(grads)
            for i in range(len(reduced)):
                written = ops.depend(written, ops.assign(self.accum[i], reduced[i]))
            grads = reduced
        return ops.depend(self.norm(grads), written)


class ClearGrads(nn.Cell):
    def __init__(self, accum: ParameterTuple) -> None:
        super().__init__(auto_prefix=False)
        self.accum = accum

    def construct(self) -> Tensor:
        out = ops.zeros((), ms.float32)
        for acc in self.accum:
            out = ops.depend(out, ops.assign(acc, ops.zeros_like(acc)))
        return out


class AdamW(nn.Cell):
    """torch.optim.AdamW's update with fp32 state (and fp32 master weights for fp16/bf16 parameters):
        p <- p * (1 - lr * wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
        p <- p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    with g = accumulated gradient * grad_coef (unscaling, accumulation mean and clipping folded into one factor).
    bc1/bc2 come from the host: 1 - beta^t for torch's AdamW, 1 for the reference's FP32StateAdamWeightDecay.

    The update is MindSpore's fused Adam kernel (ApplyAdam: one pass over p, m, v, g, much faster on CPU than an
    elementwise composition or the AdamWeightDecay kernel) after the decoupled decay. Given beta^t = 1 - bc, it
    computes p - lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps'), which is torch's update with eps' = eps sqrt(bc2).
    (kernels.cells.NativeAdamW: the whole update of each fp32 parameter as one native pass.)"""

    def __init__(self, params: ParameterTuple, accum: ParameterTuple, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
        super().__init__(auto_prefix=False)
        self.params = params
        self.accum = accum
        self.m = fp32_zeros(params, "adam_m")
        self.v = fp32_zeros(params, "adam_v")
        self.master = ParameterTuple(
            Parameter(Tensor(p.asnumpy(), ms.float32), name="master." + p.name, requires_grad=False)
            for p in params if p.dtype != ms.float32)
        slots, n = [], 0
        for p in params:  # index into self.master, -1 for fp32 parameters (updated in place)
            slots.append(n if p.dtype != ms.float32 else -1)
            n += p.dtype != ms.float32
        self.master_slot = tuple(slots)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = eps
        self.decay = tuple(weight_decay if _decays(p.name) else 0.0 for p in params)
        self.adam = ops.Adam()

    def construct(self, lr: Tensor, grad_coef: Tensor, bc1: Tensor, bc2: Tensor) -> Tensor:
        beta1_power, beta2_power = 1.0 - bc1, 1.0 - bc2
        eps = self.eps * ops.sqrt(bc2)
        out = ops.zeros((), ms.float32)
        for i in range(len(self.params)):
            p = self.params[i]
            slot = self.master_slot[i]
            w = self.master[slot] if slot >= 0 else p
            if self.decay[i]:
                out = ops.depend(out, ops.assign(w, w * (1.0 - lr * self.decay[i])))
            g = self.accum[i] * grad_coef
            step = self.adam(w, self.m[i], self.v[i], beta1_power, beta2_power, lr, self.beta1, self.beta2, eps, g)
            out = ops.depend(out, step)
            if slot >= 0:
                out = ops.depend(out, ops.assign(p, ops.depend(w, step).astype(p.dtype)))
            out = ops.depend(out, ops.assign(self.accum[i], ops.zeros_like(self.accum[i])))
        return out


def fp32_zeros(params: ParameterTuple, prefix: str) -> ParameterTuple:
    return ParameterTuple(Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"{prefix}.{p.name}",
                                    requires_grad=False) for p in params)


def _decays(name: str) -> bool:
    """Weight decay on matrices only, as HF and the reference do: no decay on biases or LayerNorm parameters."""
    return not (name.endswith(".bias") or ".ln_" in name or name.startswith("transformer.ln_f"))


# ---------------------------------------------------------------------------------------------- host-side state
def cosine_with_warmup(step: int, lr: float, lr_end: float, warmup_steps: int, total_steps: int) -> float:
    """The reference's CosineWithWarmUpLR (mindformers): linear warmup from 0, then half a cosine to lr_end.
    `step` counts optimizer steps from 0."""
    if step >= total_steps:
        return lr_end
    if warmup_steps and step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_end + (lr - lr_end) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class LossScaler:
    """Dynamic loss scaling (the reference's DynamicLossScaleUpdateCell): halve and skip the step on overflow,
    double after `window` good steps in a row. Static 1.0 when disabled (fp32, bf16)."""

    scale: float = 1.0
    factor: float = 2.0
    window: int = 1000
    dynamic: bool = False
    good_steps: int = 0

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale / self.factor, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= self.factor
            self.good_steps = 0
