"""The online engine (the host's `Engine` protocol on the MindSpore network): one prefill graph per (batch,
prompt-length) bucket and one decode graph per (batch, cache-length) bucket, sharing the bucket's KV cache. Token
selection, bucket sizes and the loop itself are the host's (`registry_spec.generation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from registry_spec.errors import InputError
from registry_spec.generation import GenerationConfig, GenerationOutput, generate

if TYPE_CHECKING:  # mindspore is imported where the engine runs, never to list or check it
    from mindspore import Parameter, Tensor

    from ..kernels import NativeKernels
    from ..model.inference import DecodeCell, KVCache, LastTokenCell, PrefillCell
    from ..model.modeling import GPTBigCodeForCausalLM

HEAD_LAYOUTS = ("auto", "tied", "transposed")
KERNELS = ("auto", "native", "mindspore")
_HEAD_COPY_LIMIT = 512 * 2**20  # bytes: above this the copy's memory outweighs what its speed could save


@dataclass
class _Running:
    """A running batch's cache handle: the bucket's KV cache, or with `ids` (the padded ids) the cache-free path."""

    bucket: tuple[int, int]  # (batch, max_len)
    greedy: bool  # what the prefill asked for: the default of each step
    ids: np.ndarray | None = None


@dataclass
class _Bucket:
    """A (batch, max_len) bucket: its KV cache, and the prefill and decode graphs that share it."""

    cache: KVCache
    prefill: dict[tuple[int, int, bool], PrefillCell] = field(default_factory=dict)  # (rows, prompt_len, screened)
    decode: dict[bool, DecodeCell] = field(default_factory=dict)  # greedy -> its graph


class Generator:
    """Compiled graphs are cached per shape bucket and reused across calls.

    `kernels` says what runs the graphs: "mindspore" (its own kernels), "native" (`kernels/native/`: each
    decode step of a block as one native call on multi-threaded small-row linear layers, the LM head on the same
    linear kernel, and the prefill's LayerNorm, bias, residual and GELU passes; CPU and fp32 only, compiled on
    first use), or "auto": on CPU in fp32, time the LM head both ways once per batch size and keep native unless
    its head is more than 1.2x slower (MindSpore's CPU MatMul runs a few-row product on one core, and each of its
    ~24 kernels per layer costs a launch; benchmarks/RESULTS.md has the decode ratios).
    `head_layout` says how MindSpore's MatMul reads the tied LM head: "tied" (the embedding [V,E] as stored),
    "transposed" (a copy [E,V]), or "auto": time both. Which wins depends on the kernel, the shape and the
    machine (either has won by a wide margin at some batch size and hidden size). The copy is a snapshot: after
    changing the model's weights in place, call `sync_weights()`.
    `head_choice` records, per batch size, what the graphs use: "native", "tied" or "transposed".
    `screened_head`: on native kernels, greedy steps pick their token from an int8 copy of the LM head with a
    bound that proves which rows cannot win, re-scoring the rest in fp32 (kernels/head.py): the same token as the
    fp32 argmax, reading about a quarter of the head's bytes. The copy (V x E bytes) is a snapshot, refreshed by
    `sync_weights()`."""

    def __init__(self, model: GPTBigCodeForCausalLM, eos_token_id: int, pad_token_id: int, max_batch: int = 8,
                 head_layout: str = "auto", kernels: str = "auto", screened_head: bool = True) -> None:
        if head_layout not in HEAD_LAYOUTS:
            raise InputError(f"unknown head layout {head_layout!r}", f"use one of {', '.join(HEAD_LAYOUTS)}")
        if kernels not in KERNELS:
            raise InputError(f"unknown kernels {kernels!r}", f"use one of {', '.join(KERNELS)}")
        self.model = model
        self.config = model.config
        self.eos, self.pad = eos_token_id, pad_token_id
        self.max_batch = max_batch
        self.head_layout, self.kernels = head_layout, kernels
        self._cells: dict[tuple[int, int], _Bucket] = {}  # (batch, max_len) -> its bucket
        self._sizes: set[tuple] = set()  # ((batch, max_len), prompt_len) checked against memory
        self._last_token: LastTokenCell | None = None
        self._head_t: Parameter | None = None  # the transposed copy, made when a bucket first uses it
        self._native: NativeKernels | None = None
        self._screen: tuple[Parameter, Parameter] | None = None  # the LM head's int8 screening copy (greedy, native)
        self.screened_head = screened_head
        self.native_unavailable = ""  # why the native kernels are not used, where "auto" fell back
        self.head_choice: dict[int, str] = {}  # batch size -> native | tied | transposed

    def _native_kernels(self) -> NativeKernels | None:
        """The native kernels if they may run here, else None (for "auto") or an InputError (for "native")."""
        import mindspore as ms

        from ..kernels import KernelUnavailable, native_kernels

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

    def _head_for(self, batch: int) -> Parameter | None:
        """The transposed head copy if `batch`-row graphs should read it, else None (the tied embedding or the
        native kernel: see `head_choice`)."""
        if batch not in self.head_choice:
            self.head_choice[batch] = self._pick_head_layout(batch)
            if "transposed" not in self.head_choice.values():
                self._head_t = None  # a probe's copy that no graph reads: free it
        return self._transposed_head() if self.head_choice[batch] == "transposed" else None

    def _transposed_head(self) -> Parameter:
        if self._head_t is None:
            self._head_t = self.model.transposed_head()
        return self._head_t

    def _pick_head_layout(self, batch: int) -> str:
        import mindspore as ms

        from ..kernels import choices

        native = self._native_kernels()
        if self.kernels == "native":
            return "native"
        wte = self.model.transformer.wte.weight
        candidates = {"native": None} if native is not None else {}
        if self.head_layout != "auto":
            candidates[self.head_layout] = None
        else:
            candidates["tied"] = None
            # beside the native kernels the copy is not a candidate: a MindSpore head must beat their head and
            # blocks by 1.2x, which the copy's small gain never made up, and making it costs seconds at 1B
            if native is None and wte.size * wte.itemsize <= _HEAD_COPY_LIMIT and \
                    ms.get_context("device_target") == "CPU":
                candidates["transposed"] = None
        if len(candidates) == 1:
            return next(iter(candidates))
        return choices.head_layout(self.model, batch, sorted(candidates), native, self._transposed_head)

    def decode_kernels(self, batch: int) -> dict[str, object]:
        """What `batch`-row decode graphs run on, for reports: {"kernels": "native", "kernel_threads": n} or
        {"kernels": "mindspore", "head_layout": "tied" | "transposed"}; {} before they are built."""
        choice = self.head_choice.get(batch)
        if choice is None:
            return {}
        if choice == "native" and self._native is not None:
            used: dict[str, object] = {"kernels": "native", "kernel_threads": self._native.threads}
            return {**used, "greedy_head": "screened"} if self._screen is not None else used
        return {"kernels": "mindspore", "head_layout": choice}

    def sync_weights(self) -> None:
        """Refresh the head's copies (transposed, screening) from the model's current embedding (after an in-place
        weight change)."""
        if self._head_t is not None:
            self._head_t.set_data(self.model.transposed_head())
        if self._screen is not None:
            tables = self._screen_tables()
            if tables is None:
                raise InputError("the LM head has non-finite weights: the screened greedy head cannot run on them",
                                 "check the weights, or build the Generator with screened_head=False")
            for param, table in zip(self._screen, tables, strict=True):
                param.set_data(table)

    def _screen_tables(self) -> tuple[Tensor, Tensor] | None:
        import mindspore as ms

        from ..kernels.head import greedy_tables

        tables = greedy_tables(self.model.transformer.wte.weight.asnumpy())
        return None if tables is None else (ms.Tensor(tables[0]), ms.Tensor(tables[1]))

    def _screen_for(self, native: NativeKernels | None, greedy: bool) -> tuple[Parameter, Parameter] | None:
        """The screening copy's parameters where a greedy native graph should read it (made on first use)."""
        if native is None or not greedy or not self.screened_head:
            return None
        if self._screen is None:
            import mindspore as ms

            tables = self._screen_tables()
            if tables is None:  # non-finite weights: the bound does not hold, score the full head
                return None
            self._screen = (ms.Parameter(tables[0], name="lm_head.screen_q", requires_grad=False),
                            ms.Parameter(tables[1], name="lm_head.screen_info", requires_grad=False))
        return self._screen

    def _bucket(self, batch: int, max_len: int, prompt_len: int) -> _Bucket:
        """The (batch, max_len) bucket: its KV cache and the graphs sharing it (checked against memory first)."""
        from ..model.inference import KVCache
        from ..model.memory import check_bucket

        key = (batch, max_len)
        self._head_for(batch)
        if key not in self._cells or (key, prompt_len) not in self._sizes:
            check_bucket(self.config, self.model.precision, batch, max_len, prompt_len)
            self._sizes.add((key, prompt_len))
        if key not in self._cells:
            dtype = self.model.transformer.wte.weight.dtype
            self._cells[key] = _Bucket(KVCache(self.config, batch, max_len, dtype, tag=f"b{batch}t{max_len}"))
        return self._cells[key]

    def _prefill_cell(self, batch: int, max_len: int, rows: int, prompt_len: int, greedy: bool) -> PrefillCell:
        """A prefill graph of `rows` rows into the cache of the (batch, max_len) bucket; greedy on the screened head
        returns token ids, the others logits. Every cell sees one input shape, so each runs in MindSpore's
        "increment" phase (re-entered without walking the cell tree, which matters on a small model's prefill)."""
        from ..kernels.cells import prefill_cell

        bucket = self._bucket(batch, max_len, prompt_len)
        native = self._native if self.head_choice[batch] == "native" else None
        screen = self._screen_for(native, greedy)
        key = (rows, prompt_len, screen is not None)
        if key not in bucket.prefill:
            bucket.prefill[key] = prefill_cell(self.model, bucket.cache, self._head_for(batch), native, screen)
            bucket.prefill[key].phase = "increment"
        return bucket.prefill[key]

    def _decode_cell(self, batch: int, max_len: int, greedy: bool) -> DecodeCell:
        """The bucket's decode graph; greedy ones return token ids, the others logits."""
        from ..kernels.cells import decode_cell

        bucket = self._cells[(batch, max_len)]
        if greedy not in bucket.decode:
            native = self._native if self.head_choice[batch] == "native" else None
            bucket.decode[greedy] = decode_cell(self.model, bucket.cache, greedy, self._head_for(batch), native,
                                                self._screen_for(native, greedy))
        return bucket.decode[greedy]

    def _compile(self, cell: PrefillCell | DecodeCell, args: tuple) -> None:
        from ..model.compile_cache import compile_cell

        native = cell.native  # the kernel library's path names its sources, compiler, flags and CPU
        compile_cell(cell, args, {"config": self.config.model_dump(), "precision": self.model.precision,
                                  "native": None if native is None else [str(native.library), native.threads]})

    # ------------------------------------------------------------------------------------- the Engine protocol
    fixed_batch: int | None = None
    fixed_length: int | None = None

    @property
    def context_length(self) -> int:
        return self.config.seq_length

    def prefill(self, ids: np.ndarray, lengths: np.ndarray, max_len: int, greedy: bool,
                use_cache: bool) -> tuple[np.ndarray, Any]:
        import mindspore as ms

        batch, prompt_len = ids.shape
        if not use_cache:  # the whole padded sequence through the network at every step
            full = np.full((batch, max_len), self.pad, dtype=np.int32)
            full[:, :prompt_len] = ids
            return self._full_logits(full, lengths), _Running((batch, max_len), greedy, full)
        cell = self._prefill_cell(batch, max_len, batch, prompt_len, greedy)
        args = (ms.Tensor.from_numpy(ids), ms.Tensor.from_numpy(lengths))
        self._compile(cell, args)
        return cell(*args).asnumpy(), _Running((batch, max_len), greedy)

    def join(self, cache: _Running, slots: np.ndarray, ids: np.ndarray, lengths: np.ndarray,
             greedy: bool) -> np.ndarray:
        """Prefill rows `ids` into the rows `slots` of a running cache (continuous batching)."""
        import mindspore as ms

        if cache.ids is not None:
            raise InputError("rows can only join a batch that uses the KV cache", "generate with use_cache=True")
        cell = self._prefill_cell(*cache.bucket, ids.shape[0], ids.shape[1], greedy)
        args = (ms.Tensor.from_numpy(ids), ms.Tensor.from_numpy(lengths.astype(np.int32)),
                ms.Tensor.from_numpy(slots.astype(np.int32)))
        self._compile(cell, args)
        return cell(*args).asnumpy()

    def step(self, cache: _Running, tokens: np.ndarray, positions: np.ndarray,
             greedy: bool | None = None) -> np.ndarray:
        import mindspore as ms

        if cache.ids is not None:  # the cache-free path
            cache.ids[np.arange(cache.ids.shape[0]), positions] = tokens
            return self._full_logits(cache.ids, positions + 1)
        cell = self._decode_cell(*cache.bucket, cache.greedy if greedy is None else greedy)
        # from_numpy shares the arrays (half the cost of a copy per step); the call has finished with them when
        # asnumpy returns, and the loop makes new ones for the next step
        args = (ms.Tensor.from_numpy(np.ascontiguousarray(tokens.reshape(-1, 1).astype(np.int32))),
                ms.Tensor.from_numpy(np.ascontiguousarray(positions.astype(np.int32))))
        self._compile(cell, args)
        return cell(*args).asnumpy()

    def generate(self, prompts: Sequence[list[int]], cfg: GenerationConfig,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int, list[int]], bool] | None = None) -> list[GenerationOutput]:
        """The host's loop on this engine with its EOS and PAD ids (for Python callers and tests)."""
        return generate(self, prompts, cfg, self.eos, self.pad, on_token, should_stop)

    def _full_logits(self, full: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The cache-free path: the whole padded sequence through the network, logits at each row's last token."""
        import mindspore as ms

        from ..model.inference import LastTokenCell

        if self._last_token is None:
            self._last_token = LastTokenCell(self.model)
        return self._last_token(ms.Tensor(full), ms.Tensor(lengths.astype(np.int32))).asnumpy()
