"""Text generation: one prefill graph per (batch, prompt-length) bucket, one decode graph per (batch, cache-length)
bucket, token selection on the host (greedy, temperature / top-k / top-p sampling, repetition penalty).

Rows are right-padded and keep their own positions, so a row's output equals its unbatched output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from registry_spec.errors import InputError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    use_cache: bool = True
    truncate: bool = False
    max_length: int | None = None  # per-row cap on prompt + generated tokens (HF's max_length)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    finish_reason: str  # eos | stop | length
    text: str = ""
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0


def _bucket(n: int, minimum: int, cap: int) -> int:
    b = minimum
    while b < n:
        b *= 2
    return min(b, cap)


def in_graph_greedy(cfg: GenerationConfig) -> bool:
    """Whether the next token is the plain argmax of the logits, so the decode graph can pick it itself."""
    return (not cfg.do_sample or cfg.top_k == 1) and cfg.repetition_penalty == 1.0


def select_tokens(logits: np.ndarray, history: Sequence[Sequence[int]], cfg: GenerationConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """Next token per row from fp32 logits [B, V] (HF semantics for every option)."""
    scores = logits.astype(np.float32, copy=True)
    if cfg.repetition_penalty != 1.0:
        for row, seen in enumerate(history):
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            s = scores[row, idx]
            scores[row, idx] = np.where(s < 0, s * cfg.repetition_penalty, s / cfg.repetition_penalty)
    if not cfg.do_sample or cfg.top_k == 1:
        return scores.argmax(axis=-1)
    scores /= cfg.temperature
    vocab = scores.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = np.partition(scores, vocab - cfg.top_k, axis=-1)[:, vocab - cfg.top_k: vocab - cfg.top_k + 1]
        scores = np.where(scores < kth, -np.inf, scores)
    if cfg.top_p < 1.0:
        order = np.argsort(-scores, axis=-1)
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(sorted_scores - sorted_scores[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        remove = np.cumsum(probs, axis=-1) - probs >= cfg.top_p  # keep the smallest set reaching top_p
        sorted_scores[remove] = -np.inf
        scores = np.full_like(scores, -np.inf)
        np.put_along_axis(scores, order, sorted_scores, axis=-1)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(vocab, p=p) for p in probs])


HEAD_LAYOUTS = ("auto", "tied", "transposed")
KERNELS = ("auto", "native", "mindspore")
_HEAD_COPY_LIMIT = 512 * 2**20  # bytes: above this the copy's memory outweighs what its speed could save


class Generator:
    """Compiled graphs are cached per shape bucket and reused across calls.

    `kernels` says what runs the graphs: "mindspore" (its own kernels), "native" (`kernels/cpu.cc`: each
    decode step of a block as one native call on multi-threaded small-row linear layers, the LM head on the same
    linear kernel, and the prefill's LayerNorm, bias, residual and GELU passes; CPU and fp32 only, compiled on
    first use), or "auto": on CPU in fp32, time the LM head both ways once per batch size and keep native unless
    its head is more than 1.2x slower (MindSpore's CPU MatMul runs a few-row product on one core, and each of its
    ~24 kernels per layer costs a launch; measured on one Xeon the native decode step was 1.6-2.3x faster).
    `head_layout` says how MindSpore's MatMul reads the tied LM head: "tied" (the embedding [V,E] as stored),
    "transposed" (a copy [E,V]), or "auto": time both. Which wins depends on the kernel and the shape (measured on
    one Xeon: the copy 1.3x faster for one row at hidden 256, the stored layout 1.5x faster for 8 rows at hidden
    768). The copy is a snapshot: after changing the model's weights in place, call `sync_weights()`.
    `head_choice` records, per batch size, what the graphs use: "native", "tied" or "transposed".
    `screened_head`: on native kernels, greedy steps pick their token from an int8 copy of the LM head with a
    bound that proves which rows cannot win, re-scoring the rest in fp32 (kernels/head.py): the same token as the
    fp32 argmax, reading about a quarter of the head's bytes (measured on one Xeon: 0.43 against 1.06 ms for the
    tiny model's head at batch 1). The copy (V x E bytes) is a snapshot, refreshed by `sync_weights()`."""

    def __init__(self, model: object, eos_token_id: int, pad_token_id: int, max_batch: int = 8,
                 head_layout: str = "auto", kernels: str = "auto", screened_head: bool = True) -> None:
        if head_layout not in HEAD_LAYOUTS:
            raise InputError(f"unknown head layout {head_layout!r}", f"use one of {', '.join(HEAD_LAYOUTS)}")
        if kernels not in KERNELS:
            raise InputError(f"unknown kernels {kernels!r}", f"use one of {', '.join(KERNELS)}")
        self.model = model
        self.config = model.config  # type: ignore[attr-defined]
        self.eos, self.pad = eos_token_id, pad_token_id
        self.max_batch = max_batch
        self.head_layout, self.kernels = head_layout, kernels
        self._cells: dict[tuple[int, int], dict[object, object]] = {}  # (batch, max_len) -> cache and graphs
        self._last_token: object | None = None
        self._head_t: object | None = None  # the transposed copy, made when a bucket first uses it
        self._native: object | None = None
        self._screen: tuple[object, object] | None = None  # the LM head's int8 screening copy (greedy, native)
        self.screened_head = screened_head
        self.native_unavailable = ""  # why the native kernels are not used, where "auto" fell back
        self.head_choice: dict[int, str] = {}  # batch size -> native | tied | transposed

    def _native_kernels(self) -> object | None:
        """The native kernels if they may run here, else None (for "auto") or an InputError (for "native")."""
        import mindspore as ms

        from .kernels import KernelUnavailable, native_kernels

        if self.kernels == "mindspore":
            return None
        if self._native is None and not self.native_unavailable:
            dtype = self.model.transformer.wte.weight.dtype  # type: ignore[attr-defined]
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

    def _head_for(self, batch: int) -> object | None:
        """The transposed head copy if `batch`-row graphs should read it, else None (the tied embedding or the
        native kernel: see `head_choice`)."""
        if batch not in self.head_choice:
            self.head_choice[batch] = self._pick_head_layout(batch)
            if "transposed" not in self.head_choice.values():
                self._head_t = None  # a probe's copy that no graph reads: free it
        return self._transposed_head() if self.head_choice[batch] == "transposed" else None

    def _transposed_head(self) -> object:
        if self._head_t is None:
            self._head_t = self.model.transposed_head()  # type: ignore[attr-defined]
        return self._head_t

    def _pick_head_layout(self, batch: int) -> str:
        import mindspore as ms

        from .kernels import choices

        native = self._native_kernels()
        if self.kernels == "native":
            return "native"
        wte = self.model.transformer.wte.weight  # type: ignore[attr-defined]
        candidates = {"native": None} if native is not None else {}
        if self.head_layout != "auto":
            candidates[self.head_layout] = None
        else:
            candidates["tied"] = None
            # beside the native kernels the copy is not a candidate: a MindSpore head must beat their head and
            # blocks by 1.2x, which the copy's ~10% never made up where measured, and it costs seconds at 1B
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
        if choice == "native":
            used = {"kernels": "native", "kernel_threads": self._native.threads}  # type: ignore[attr-defined]
            return {**used, "greedy_head": "screened"} if self._screen is not None else used
        return {"kernels": "mindspore", "head_layout": choice}

    def sync_weights(self) -> None:
        """Refresh the head's copies (transposed, screening) from the model's current embedding (after an in-place
        weight change)."""
        if self._head_t is not None:
            self._head_t.set_data(self.model.transposed_head())  # type: ignore[attr-defined]
        if self._screen is not None:
            tables = self._screen_tables()
            if tables is None:
                raise InputError("the LM head has non-finite weights: the screened greedy head cannot run on them",
                                 "check the weights, or build the Generator with screened_head=False")
            for param, table in zip(self._screen, tables, strict=True):
                param.set_data(table)  # type: ignore[attr-defined]

    def _screen_tables(self) -> tuple[object, object] | None:
        import mindspore as ms

        from .kernels.head import greedy_tables

        tables = greedy_tables(self.model.transformer.wte.weight.asnumpy())  # type: ignore[attr-defined]
        return None if tables is None else (ms.Tensor(tables[0]), ms.Tensor(tables[1]))

    def _screen_for(self, native: object | None, greedy: bool) -> tuple[object, object] | None:
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

    def _cells_for(self, batch: int, max_len: int, prompt_len: int, greedy: bool) -> tuple[object, object]:
        """(prefill, decode) for a bucket; greedy decode graphs return token ids (and so does a greedy prefill on
        the screened head), the others logits. The bucket's graphs share its caches. Every cell sees one input
        shape, so each runs in MindSpore's "increment" phase (re-entered without walking the cell tree: ~1 ms a
        call saved on the tiny model's prefill)."""
        from .memory import check_bucket
        from .modeling import DecodeCell, KVCache, PrefillCell

        key = (batch, max_len)
        head_t = self._head_for(batch)
        native = self._native if self.head_choice[batch] == "native" else None
        if key not in self._cells or not any(k[0] == prompt_len for k in self._cells[key] if isinstance(k, tuple)):
            check_bucket(self.config, self.model.precision, batch, max_len, prompt_len)  # type: ignore[attr-defined]
        if key not in self._cells:
            dtype = self.model.transformer.wte.weight.dtype  # type: ignore[attr-defined]
            self._cells[key] = {"cache": KVCache(self.config, batch, max_len, dtype, tag=f"b{batch}t{max_len}")}
        cells = self._cells[key]
        screen = self._screen_for(native, greedy)
        kind = "greedy" if greedy else "logits"
        prefill = (prompt_len, screen is not None)  # a screened prefill returns token ids, the other logits
        if prefill not in cells:
            cells[prefill] = PrefillCell(self.model, cells["cache"], head_t, native, screen)
            cells[prefill].phase = "increment"
        if kind not in cells:
            cells[kind] = DecodeCell(self.model, cells["cache"], greedy=greedy, head_t=head_t, native=native,
                                     screen=screen)
        return cells[prefill], cells[kind]

    def _compile(self, cell: object, args: tuple) -> None:
        from .runtime import compile_cell

        compile_cell(cell, args, {"config": self.config.model_dump(), "precision": self.model.precision})  # type: ignore

    def check_prompt(self, ids: list[int], cfg: GenerationConfig) -> list[int]:
        limit = self.config.seq_length - 1
        if len(ids) > limit:
            if not cfg.truncate:
                raise InputError(f"prompt has {len(ids)} tokens; the context is {self.config.seq_length} "
                                 "(at least one token must be left to generate)",
                                 "shorten the prompt, or pass --truncate to keep its last tokens")
            ids = ids[-limit:]
        if not ids:
            raise InputError("empty prompt", "give at least one token of prompt text")
        return ids

    def generate(self, prompts: Sequence[list[int]], cfg: GenerationConfig,
                 on_token: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[int, list[int]], bool] | None = None) -> list[GenerationOutput]:
        """Generate for every prompt (lists of ids); `on_token(row, id)` streams, `should_stop(row, ids)` ends a row."""
        prompts = [self.check_prompt(list(p), cfg) for p in prompts]
        rng = np.random.default_rng(cfg.seed)
        outs: list[GenerationOutput] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = prompts[start: start + self.max_batch]
            stream = (lambda r, t, s=start: on_token(s + r, t)) if on_token else None
            stop = (lambda r, ids, s=start: should_stop(s + r, ids)) if should_stop else None
            outs.extend(self._generate_chunk(chunk, cfg, rng, stream, stop))
        return outs

    def _generate_chunk(self, prompts: list[list[int]], cfg: GenerationConfig, rng: np.random.Generator,
                        on_token: Callable | None, should_stop: Callable | None) -> list[GenerationOutput]:
        import mindspore as ms

        n = len(prompts)
        batch = _bucket(n, 1, max(self.max_batch, n))
        lengths = np.array([len(p) for p in prompts] + [1] * (batch - n), dtype=np.int32)
        ctx = self.config.seq_length
        prompt_len = _bucket(int(lengths.max()), 16, ctx)
        max_len = _bucket(int(lengths.max()) + cfg.max_new_tokens, 64, ctx)
        max_len = max(max_len, prompt_len)
        ids = np.full((batch, prompt_len), self.pad, dtype=np.int32)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        ids[n:, 0] = self.pad

        t0 = time.perf_counter()
        if cfg.use_cache:
            prefill, decode = self._cells_for(batch, max_len, prompt_len, in_graph_greedy(cfg))
            args = (ms.Tensor.from_numpy(ids), ms.Tensor.from_numpy(lengths))
            self._compile(prefill, args)
            logits = prefill(*args).asnumpy()

            def step(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
                # from_numpy shares the arrays (half the cost of a copy per step); the call has finished with
                # them when asnumpy returns, and the loop makes new ones for the next step
                args = (ms.Tensor.from_numpy(np.ascontiguousarray(tokens.reshape(batch, 1))),
                        ms.Tensor.from_numpy(np.ascontiguousarray(positions)))
                self._compile(decode, args)
                return decode(*args).asnumpy()
        else:
            full = np.full((batch, max_len), self.pad, dtype=np.int32)
            full[:, :prompt_len] = ids
            logits = self._full_logits(full, lengths)

            def step(tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
                full[np.arange(batch), positions] = tokens
                return self._full_logits(full, positions + 1)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        return decode_loop(prompts, lengths, batch, max_len, logits, step, prefill_ms, cfg, rng, self.eos, self.pad,
                           on_token, should_stop)

    def _full_logits(self, full: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The cache-free path: the whole padded sequence through the network, logits at each row's last token."""
        import mindspore as ms

        from .modeling import LastTokenCell

        if self._last_token is None:
            self._last_token = LastTokenCell(self.model)
        return self._last_token(ms.Tensor(full), ms.Tensor(lengths.astype(np.int32))).asnumpy()


def decode_loop(prompts: list[list[int]], lengths: np.ndarray, batch: int, max_len: int, logits: np.ndarray,
                step: Callable[[np.ndarray, np.ndarray], np.ndarray], prefill_ms: float, cfg: GenerationConfig,
                rng: np.random.Generator, eos: int, pad: int, on_token: Callable | None = None,
                should_stop: Callable | None = None) -> list[GenerationOutput]:
    """The token loop shared by every engine (online graphs, exported MindIR / ONNX / Lite graphs): select a token
    per row from `logits`, finish rows (EOS, stop string, length), then `step(tokens [B], positions [B])` writes
    each token at its row's position and returns the next logits [B,V], or the next token ids [B] where the
    engine picked them itself (greedy in the graph)."""
    n = len(prompts)
    generated: list[list[int]] = [[] for _ in range(batch)]
    history = [list(p) for p in prompts] + [[pad]] * (batch - n)
    finish: list[str | None] = [None] * n + ["length"] * (batch - n)
    positions = lengths.copy()
    t1 = time.perf_counter()
    steps, tokens_at_t1 = 0, 0
    while True:
        if logits.ndim == 1:
            tokens = logits.astype(np.int32)
        else:
            tokens = select_tokens(logits, history, cfg, rng).astype(np.int32)
        for r in range(n):
            if finish[r] is not None:
                tokens[r] = pad
                continue
            tok = int(tokens[r])
            generated[r].append(tok)
            history[r].append(tok)
            if on_token:
                on_token(r, tok)
            if tok == eos:
                finish[r] = "eos"
            elif should_stop and should_stop(r, generated[r]):
                finish[r] = "stop"
            elif (len(generated[r]) >= cfg.max_new_tokens or positions[r] + 1 >= max_len
                  or (cfg.max_length and lengths[r] + len(generated[r]) >= cfg.max_length)):
                finish[r] = "length"
        if all(f is not None for f in finish):
            break
        tokens[n:] = pad
        logits = step(tokens, positions)
        positions = np.minimum(positions + 1, max_len - 1)
        steps += 1
        if steps == 1:  # the first decode call may compile its graph: time the steady state only
            t1, tokens_at_t1 = time.perf_counter(), sum(len(g) for g in generated[:n])
    decode_s = time.perf_counter() - t1
    total_new = sum(len(g) for g in generated[:n])
    rate = (total_new - tokens_at_t1) / decode_s if steps > 1 and decode_s > 0 else 0.0
    return [GenerationOutput(generated[r], finish[r] or "length", prompt_tokens=int(lengths[r]),
                             prefill_ms=prefill_ms, decode_tokens_per_s=rate) for r in range(n)]
