"""Which kernels a model's inference graphs run on, per batch size: the native ones or MindSpore's, and how
MindSpore's MatMul reads the tied LM head (as stored, or a transposed copy). The online engine asks this seam for
its prefill and decode cells and never names a kernel itself; the timing behind each choice is `choices`'."""

from __future__ import annotations

from typing import TYPE_CHECKING

from registry_spec.errors import InputError

if TYPE_CHECKING:
    from mindspore import Parameter, Tensor

    from ..model.inference import DecodeCell, KVCache, PrefillCell
    from ..model.modeling import GPTBigCodeForCausalLM
    from . import NativeKernels
    from .cells import Screen

HEAD_LAYOUTS = ("auto", "tied", "transposed")
KERNELS = ("auto", "native", "mindspore")
_HEAD_COPY_LIMIT = 512 * 2**20  # bytes: above this the copy's memory outweighs what its speed could save


class KernelSelection:
    """`kernels`: "mindspore" (its own kernels), "native" (`native/`: each decode step of a block as one native
    call on multi-threaded small-row linear layers, the LM head on the same linear kernel, and the prefill's
    LayerNorm, bias, residual and GELU passes; CPU and fp32 only, compiled on first use), or "auto": on CPU in
    fp32, time the LM head both ways once per batch size and keep native unless its head is more than 1.2x slower
    (MindSpore's CPU MatMul runs a few-row product on one core, and each of its ~24 kernels per layer costs a
    launch; benchmarks/RESULTS.md has the decode ratios).
    `head_layout`: how MindSpore's MatMul reads the tied LM head: "tied" (the embedding [V,E] as stored),
    "transposed" (a copy [E,V]), or "auto": time both. Which wins depends on the kernel, the shape and the
    machine (either has won by a wide margin at some batch size and hidden size).
    `screened_head`: on native kernels, greedy steps pick their token from an int8 copy of the LM head with a
    bound that proves which rows cannot win, re-scoring the rest in fp32 (`head`): the same token as the fp32
    argmax, reading about a quarter of the head's bytes.
    The copies (transposed, screening) are snapshots: after changing the model's weights in place, call
    `sync_weights()`. `head_choice` records, per batch size, what the graphs use: "native", "tied" or
    "transposed"."""

    def __init__(self, model: GPTBigCodeForCausalLM, kernels: str = "auto", head_layout: str = "auto",
                 screened_head: bool = True) -> None:
        if head_layout not in HEAD_LAYOUTS:
            raise InputError(f"unknown head layout {head_layout!r}", f"use one of {', '.join(HEAD_LAYOUTS)}")
        if kernels not in KERNELS:
            raise InputError(f"unknown kernels {kernels!r}", f"use one of {', '.join(KERNELS)}")
        self.model = model
        self.kernels, self.head_layout, self.screened_head = kernels, head_layout, screened_head
        self.head_choice: dict[int, str] = {}  # batch size -> native | tied | transposed
        self.native_unavailable = ""  # why the native kernels are not used, where "auto" fell back
        self.head_t: Parameter | None = None  # the transposed copy, made when a batch size first uses it
        self._native: NativeKernels | None = None
        self._screen: Screen | None = None  # the LM head's int8 screening copy (greedy, native)

    # ------------------------------------------------------------------------------------------- the cells
    def prefill_cell(self, batch: int, cache: KVCache, greedy: bool) -> PrefillCell:
        """A prefill graph into `cache` for `batch`-row decoding; greedy on the screened head returns token ids
        (`screens(batch, greedy)`), the others logits."""
        from .cells import prefill_cell

        native, head_t, screen = self._for(batch, greedy)
        return prefill_cell(self.model, cache, head_t, native, screen)

    def decode_cell(self, batch: int, cache: KVCache, greedy: bool) -> DecodeCell:
        """The decode step over `cache`; greedy ones return token ids, the others logits."""
        from .cells import decode_cell

        native, head_t, screen = self._for(batch, greedy)
        return decode_cell(self.model, cache, greedy, head_t, native, screen)

    def screens(self, batch: int, greedy: bool) -> bool:
        """Whether `batch`-row greedy graphs pick on the screened head (their prefill then returns ids)."""
        return self._for(batch, greedy)[2] is not None

    def compile_key(self, cell: object) -> list[object] | None:
        """What of the kernels a compiled graph depends on: the library's path names its sources, compiler, flags
        and CPU."""
        native = getattr(cell, "native", None)
        return None if native is None else [str(native.library), native.threads]

    def report(self, batch: int) -> dict[str, object]:
        """What `batch`-row decode graphs run on: {"kernels": "native", "kernel_threads": n} or
        {"kernels": "mindspore", "head_layout": "tied" | "transposed"}; {} before they are built."""
        choice = self.head_choice.get(batch)
        if choice is None:
            return {}
        if choice == "native" and self._native is not None:
            used: dict[str, object] = {"kernels": "native", "kernel_threads": self._native.threads}
            return {**used, "greedy_head": "screened"} if self._screen is not None else used
        return {"kernels": "mindspore", "head_layout": choice}

    def sync_weights(self) -> None:
        """Refresh the head's copies (transposed, screening) from the model's current embedding."""
        if self.head_t is not None:
            self.head_t.set_data(self.model.transposed_head())
        if self._screen is not None:
            tables = self._screen_tables()
            if tables is None:
                raise InputError("the LM head has non-finite weights: the screened greedy head cannot run on them",
                                 "check the weights, or build the Generator with screened_head=False")
            for param, table in zip(self._screen, tables, strict=True):
                param.set_data(table)

    # ------------------------------------------------------------------------------------------- the choices
    def _for(self, batch: int, greedy: bool) -> tuple[NativeKernels | None, Parameter | None, Screen | None]:
        """What `batch`-row graphs read, chosen once per batch size: the native kernels or None, the transposed
        head or None, and for greedy native graphs the screening copy (None where it cannot be used)."""
        if batch not in self.head_choice:
            self.head_choice[batch] = self._pick(batch)
            if "transposed" not in self.head_choice.values():
                self.head_t = None  # a probe's copy that no graph reads: free it
        choice = self.head_choice[batch]
        native = self._native if choice == "native" else None
        return (native, self._transposed_head() if choice == "transposed" else None,
                self._screen_for() if native is not None and greedy else None)

    def _native_kernels(self) -> NativeKernels | None:
        """The native kernels if they may run here, else None (for "auto") or an InputError (for "native")."""
        import mindspore as ms

        from . import KernelUnavailable, native_kernels

        if self.kernels == "mindspore":
            return None
        if self._native is None and not self.native_unavailable:
            dtype = self.model.transformer.wte.weight.dtype
            if ms.get_context("device_target") != "CPU" or dtype != ms.float32:
                self.native_unavailable = f"native kernels are for fp32 on CPU, not {dtype} on " \
                                          f"{ms.get_context('device_target')}"
            else:
                try:
                    self._native = native_kernels()
                except KernelUnavailable as exc:
                    self.native_unavailable = str(exc)
        if self._native is None and self.kernels == "native":
            raise InputError(self.native_unavailable, "use kernels='auto' or 'mindspore' (MindSpore's MatMul)")
        return self._native

    def _pick(self, batch: int) -> str:
        import mindspore as ms

        from . import choices

        native = self._native_kernels()
        if self.kernels == "native":
            return "native"
        wte = self.model.transformer.wte.weight
        candidates = ["native"] if native is not None else []
        if self.head_layout != "auto":
            candidates.append(self.head_layout)
        else:
            candidates.append("tied")
            # beside the native kernels the copy is not a candidate: a MindSpore head must beat their head and
            # blocks by 1.2x, which the copy's small gain never made up, and making it costs seconds at 1B
            if native is None and wte.size * wte.itemsize <= _HEAD_COPY_LIMIT and \
                    ms.get_context("device_target") == "CPU":
                candidates.append("transposed")
        if len(candidates) == 1:
            return candidates[0]
        return choices.head_layout(self.model, batch, sorted(candidates), native, self._transposed_head)

    def _transposed_head(self) -> Parameter:
        if self.head_t is None:
            self.head_t = self.model.transposed_head()
        return self.head_t

    def _screen_tables(self) -> tuple[Tensor, Tensor] | None:
        import mindspore as ms

        from .head import greedy_tables

        tables = greedy_tables(self.model.transformer.wte.weight.asnumpy(), self._native)
        return None if tables is None else (ms.Tensor(tables[0]), ms.Tensor(tables[1]))

    def _screen_for(self) -> Screen | None:
        """The screening copy's parameters for greedy native graphs (made on first use), None if they go
        without."""
        if not self.screened_head:
            return None
        if self._screen is None:
            import mindspore as ms

            tables = self._screen_tables()
            if tables is None:  # non-finite weights: the bound does not hold, score the full head
                return None
            self._screen = (ms.Parameter(tables[0], name="lm_head.screen_q", requires_grad=False),
                            ms.Parameter(tables[1], name="lm_head.screen_info", requires_grad=False))
        return self._screen
