"""The online engine (the host's `Engine` protocol on the MindSpore network): one prefill graph per (batch,
prompt-length) bucket and one decode graph per (batch, cache-length) bucket, sharing the bucket's KV cache. Token
selection, bucket sizes and the loop itself are the host's (`registry_spec.generation`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from registry_spec.errors import InputError
from registry_spec.generation import GenerationConfig, GenerationOutput, generate

if TYPE_CHECKING:  # mindspore is imported where the engine runs, never to list or check it
    from ..model.inference import DecodeCell, KVCache, LastTokenCell, PrefillCell
    from ..model.modeling import GPTBigCodeForCausalLM


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
    """Compiled graphs are cached per shape bucket and reused across calls. `kernels`, `head_layout` and
    `screened_head` say what the graphs run on (`kernels.selection.KernelSelection`, which builds the cells);
    after changing the model's weights in place, call `sync_weights()`."""

    def __init__(self, model: GPTBigCodeForCausalLM, eos_token_id: int, pad_token_id: int, max_batch: int = 8,
                 head_layout: str = "auto", kernels: str = "auto", screened_head: bool = True) -> None:
        from ..kernels.selection import KernelSelection

        self.model = model
        self.config = model.config
        self.eos, self.pad = eos_token_id, pad_token_id
        self.max_batch = max_batch
        self.selection = KernelSelection(model, kernels, head_layout, screened_head)
        self._cells: dict[tuple[int, int], _Bucket] = {}  # (batch, max_len) -> its bucket
        self._sizes: set[tuple] = set()  # ((batch, max_len), prompt_len) checked against memory
        self._last_token: LastTokenCell | None = None

    @property
    def head_choice(self) -> dict[int, str]:
        """Per batch size, what the graphs use: "native", "tied" or "transposed"."""
        return self.selection.head_choice

    @property
    def native_unavailable(self) -> str:
        """Why the native kernels are not used, where "auto" fell back ("" otherwise)."""
        return self.selection.native_unavailable

    def decode_kernels(self, batch: int) -> dict[str, object]:
        """What `batch`-row decode graphs run on, for reports (`KernelSelection.report`)."""
        return self.selection.report(batch)

    def sync_weights(self) -> None:
        """Refresh the LM head's copies (transposed, screening) after an in-place weight change."""
        self.selection.sync_weights()

    def _bucket(self, batch: int, max_len: int, prompt_len: int) -> _Bucket:
        """The (batch, max_len) bucket: its KV cache and the graphs sharing it (checked against memory first)."""
        from ..model.inference import KVCache
        from ..model.memory import check_bucket

        key = (batch, max_len)
        if key not in self._cells or (key, prompt_len) not in self._sizes:
            check_bucket(self.config, self.model.precision, batch, max_len, prompt_len)
            self._sizes.add((key, prompt_len))
        if key not in self._cells:
            dtype = self.model.transformer.wte.weight.dtype
            self._cells[key] = _Bucket(KVCache(self.config, batch, max_len, dtype, tag=f"b{batch}t{max_len}"))
        return self._cells[key]

    def _prefill_cell(self, batch: int, max_len: int, rows: int, prompt_len: int, greedy: bool) -> PrefillCell:
        """A prefill graph of `rows` rows into the cache of the (batch, max_len) bucket; greedy on the screened head
        returns token ids, the others logits. Its kernels are the ones chosen for `rows`-row graphs: a row joining
        a running batch is a one-row prefill whatever the bucket's size. Every cell sees one input shape, so each
        runs in MindSpore's "increment" phase (re-entered without walking the cell tree, which matters on a small
        model's prefill)."""
        bucket = self._bucket(batch, max_len, prompt_len)
        key = (rows, prompt_len, self.selection.screens(rows, greedy))
        if key not in bucket.prefill:
            bucket.prefill[key] = self.selection.prefill_cell(rows, bucket.cache, greedy)
            bucket.prefill[key].phase = "increment"
        return bucket.prefill[key]

    def _decode_cell(self, batch: int, max_len: int, greedy: bool) -> DecodeCell:
        """The bucket's decode graph; greedy ones return token ids, the others logits."""
        bucket = self._cells[(batch, max_len)]
        if greedy not in bucket.decode:
            bucket.decode[greedy] = self.selection.decode_cell(batch, bucket.cache, greedy)
        return bucket.decode[greedy]

    def _compile(self, cell: PrefillCell | DecodeCell, args: tuple) -> None:
        from ..model.compile_cache import compile_cell

        t0 = time.perf_counter()
        compile_cell(cell, args, {"config": self.config.model_dump(), "precision": self.model.precision,
                                  "native": self.selection.compile_key(cell)})
        self.compile_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------- the Engine protocol
    fixed_batch: int | None = None
    fixed_length: int | None = None
    compile_seconds: float = 0.0  # the prefill and step graphs' compiling or loading (not in a row's prefill_ms)

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
