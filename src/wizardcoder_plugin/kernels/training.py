"""The trainer's seam to the native kernels: what a run's math runs on, the record of it that every checkpoint
carries (`numerics`), and what a resumed run could not take over from the run it continues (`changes`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mindspore import ParameterTuple, nn

    from ..model.modeling import GPTBigCodeForCausalLM
    from ..training.optim import AdamW
    from . import NativeKernels


class TrainingKernels:
    """On CPU, every LayerNorm and MLP activation, the per-token loss, the gradient norm and the AdamW update run
    on the native kernels where they load (MindSpore's CPU LayerNormGrad is slow on training shapes; its composed
    GELU is ~15 elementwise passes forward and back), and each linear shape's backward is `choices.
    choose_backwards`' pick for `rows` rows. `recorded` (a resumed run's `numerics`) is honoured where it can be:
    the thread count, the backward choices. `agree` (data parallel) makes every rank take rank 0's picks."""

    def __init__(self, model: GPTBigCodeForCausalLM, rows: int, recorded: dict | None = None,
                 agree: Callable[[dict], dict] | None = None) -> None:
        from .cells import NativeSquaredNorm, NativeTokenNLL
        from .choices import choose_backwards

        recorded = recorded or {}
        if recorded.get("kernel_threads") and "ZOO_KERNEL_THREADS" not in os.environ:
            os.environ["ZOO_KERNEL_THREADS"] = str(recorded["kernel_threads"])  # read when the kernels load
        self.native = native = _use_native(model)
        backwards = choose_backwards(model, rows, native, recorded.get("linear_backward"), agree=agree)
        # the per-token loss for CausalLMLoss(nll=) and the squared gradient norm for GradStats(norm=): native, or
        # None (MindSpore's)
        self.nll: nn.Cell | None = None if native is None else NativeTokenNLL(native.cross_entropy)
        self.norm: nn.Cell | None = None if native is None else NativeSquaredNorm(native.sum_squares)
        # everything that can change a run's numbers besides its settings: saved with every checkpoint
        self.numerics = {"native_kernels": native is not None,
                         "kernel_library": native.library.name if native is not None else None,
                         "kernel_threads": native.threads if native is not None else None,
                         "linear_backward": backwards}

    def adamw(self, params: ParameterTuple, accum: ParameterTuple, beta1: float, beta2: float, eps: float,
              weight_decay: float) -> AdamW:
        """The optimizer update: native where the kernels loaded and every parameter is fp32 (no master copies)."""
        from .cells import adamw

        return adamw(params, accum, beta1, beta2, eps, weight_decay, self.native)

    def changes(self, recorded: dict) -> list[str]:
        """What this run could not take over from the `recorded` numerics of the run it resumes."""
        now, changes = self.numerics, []
        if recorded.get("native_kernels") and not now["native_kernels"]:
            changes.append("the native CPU kernels the run used are unavailable now")
        elif recorded.get("kernel_library") not in (None, now["kernel_library"]):
            changes.append(f"the native kernels were built as {recorded['kernel_library']}, now as "
                           f"{now['kernel_library']} (another CPU, compiler or source)")
        if recorded.get("kernel_threads") not in (None, now["kernel_threads"]) and now["native_kernels"]:
            changes.append(f"the native kernels ran on {recorded['kernel_threads']} threads, now on "
                           f"{now['kernel_threads']} (ZOO_KERNEL_THREADS)")
        for shape, choice in (recorded.get("linear_backward") or {}).items():
            if now["linear_backward"].get(shape, "mindspore") != choice:
                changes.append(f"the {shape} layers' backward was {choice}, now "
                               f"{now['linear_backward'].get(shape, 'mindspore')}")
        return changes


def _use_native(model: GPTBigCodeForCausalLM) -> NativeKernels | None:
    """On CPU, put the model's LayerNorms and activations on the native kernels; the kernels where that was done,
    else None (no compiler, off CPU, or ZOO_NATIVE_KERNELS=0)."""
    import mindspore as ms

    from . import KernelUnavailable, native_kernels
    from .cells import use_native_training_kernels

    if ms.get_context("device_target") != "CPU":
        return None
    try:
        native = native_kernels()
    except KernelUnavailable:
        return None
    use_native_training_kernels(model, native)
    return native
