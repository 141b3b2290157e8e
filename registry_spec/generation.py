"""The one generation loop, over any `Engine`: chunking and shape buckets, token selection with HF semantics
(greedy, temperature / top-k / top-p sampling, repetition penalty), finishing rows (EOS, stop, length) and
streaming. Online engines and every exported backend's runner implement `Engine`; nothing else loops.

Rows are right-padded and keep their own positions, so a row's output equals its unbatched output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import InputError


@runtime_checkable
class Engine(Protocol):
    """Runs a network over right-padded rows. Outputs are fp32 logits [B, V], or token ids [B] where `greedy`
    allowed the engine to pick the argmax itself (the fast path).

    An engine may also have `join(cache, slots, ids, lengths, greedy) -> outputs`: prefill rows `ids` [k, T] into
    the rows `slots` [k] of a running cache, leaving the other rows as they are. With it a running batch takes new
    rows between steps (continuous batching, `zoo serve`); without it new rows wait until the batch is empty.
    And `compile_seconds`, the time it has spent compiling or loading graphs so far: a row's `prefill_ms` leaves
    it out (the first call of each shape compiles)."""

    # read-only properties, so that an engine may compute them or keep them as plain attributes
    @property
    def context_length(self) -> int:
        """Tokens a row may hold, prompt and generated."""

    @property
    def max_batch(self) -> int:
        """Rows per call."""

    @property
    def fixed_batch(self) -> int | None:
        """Graphs of one batch size only (exported): every call has exactly this many rows."""

    @property
    def fixed_length(self) -> int | None:
        """Graphs of one sequence length only: prompts padded to it, the cache this long."""

    def prefill(self, ids: np.ndarray, lengths: np.ndarray, max_len: int, greedy: bool,
                use_cache: bool) -> tuple[np.ndarray, Any]:
        """Rows `ids` [B, T] (int32) of `lengths` [B] tokens: the outputs at each row's last token, and a cache
        handle for `step` sized for `max_len` tokens a row."""

    def step(self, cache: Any, tokens: np.ndarray, positions: np.ndarray, greedy: bool | None = None) -> np.ndarray:
        """Write `tokens` [B] at `positions` [B] (per row) and return the outputs there (`greedy`: whether ids
        will do, for this step; None: as the prefill said)."""


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


def bucket(n: int, minimum: int, cap: int) -> int:
    """The smallest power-of-two multiple of `minimum` holding `n`, at most `cap` (one compiled graph each)."""
    b = minimum
    while b < n:
        b *= 2
    return min(b, cap)


def in_graph_greedy(cfg: GenerationConfig) -> bool:
    """Whether the next token is the plain argmax of the logits, so the engine may pick it itself."""
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


def check_prompt(ids: list[int], context: int, truncate: bool) -> list[int]:
    limit = context - 1
    if len(ids) > limit:
        if not truncate:
            raise InputError(f"prompt has {len(ids)} tokens; the context is {context} "
                             "(at least one token must be left to generate)",
                             "shorten the prompt, or pass --truncate to keep its last tokens")
        ids = ids[-limit:]
    if not ids:
        raise InputError("empty prompt", "give at least one token of prompt text")
    return ids


@dataclass
class Row:
    """One sequence in a running batch: its prompt, its own selection settings and random stream, its callbacks,
    and what it generated. Rows sharing one `cfg` and `rng` are selected together (as `generate`'s batch is)."""

    prompt: list[int]
    cfg: GenerationConfig
    rng: np.random.Generator
    on_token: Callable[[int], None] | None = None  # each accepted id, as it is accepted
    should_stop: Callable[[list[int]], bool] | None = None  # whether the ids so far end the row
    logprobs: list[float] | None = None  # a list to collect each chosen token's log-probability into
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # eos | stop | length | cancelled
    position: int = 0  # where the next token is written
    pending: Any = None  # the output at the last written position: logits [V] or a token id
    prefill_ms: float = 0.0
    cancelled: bool = False  # set from any thread: the row leaves at the next step boundary

    def needs_logits(self) -> bool:
        return self.logprobs is not None or not in_graph_greedy(self.cfg)


def _log_softmax_at(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return logits[np.arange(len(tokens)), tokens] - norm


class Batch:
    """Rows in the slots of one engine cache of `size` rows and `max_len` tokens a row. `admit` prefills rows:
    into an empty batch all at once (`prefill`), into a running one through the engine's `join`: one row a call,
    so that a row's prefill never depends on the others (a graph of k rows may run other kernels than one of one
    row), except on a fixed-batch engine, whose every join runs its one full-batch graph anyway: there the rows
    admitted together join in one call. `step` selects every row's next token, finishes rows, and writes the
    remaining rows' tokens in one engine step. Only one thread may call these."""

    def __init__(self, engine: Engine, eos: int, pad: int, size: int, max_len: int) -> None:
        self.engine, self.eos, self.pad = engine, eos, pad
        self.size, self.max_len = size, max_len
        self.slots: list[Row | None] = [None] * size
        self.cache: Any = None
        self.can_join = callable(getattr(engine, "join", None))

    @property
    def rows(self) -> list[Row]:
        return [r for r in self.slots if r is not None]

    def free(self) -> int:
        """How many rows `admit` takes now."""
        if not self.rows:
            return self.size
        return self.slots.count(None) if self.can_join else 0  # rows imply a cache

    def open(self, use_cache: bool = True) -> None:
        """Make the cache with no rows (so every later row joins): a prefill of padding, which also compiles."""
        self._prefill([], greedy=True, use_cache=use_cache)

    def admit(self, rows: Sequence[Row], greedy: bool | None = None, use_cache: bool = True) -> None:
        if len(rows) > self.free():
            raise ValueError(f"{len(rows)} rows, {self.free()} free slots")
        if self.rows or (self.cache is not None and self.can_join):
            for group in ([list(rows)] if self.engine.fixed_batch and rows else [[r] for r in rows]):
                self._join(group)
            return
        self._prefill(list(rows), greedy=not any(r.needs_logits() for r in rows) if greedy is None else greedy,
                      use_cache=use_cache)

    def prompt_width(self, rows: Sequence[Row]) -> int:
        """The padded width a prefill (or join) of `rows` runs at: one compiled graph per width."""
        longest = max((len(r.prompt) for r in rows), default=1)
        return self.engine.fixed_length or bucket(longest, 16, self.max_len)

    def _prefill(self, rows: list[Row], greedy: bool, use_cache: bool) -> None:
        ids = np.full((self.size, self.prompt_width(rows)), self.pad, dtype=np.int32)
        lengths = np.ones(self.size, dtype=np.int32)
        for slot, row in enumerate(rows):
            ids[slot, : len(row.prompt)] = row.prompt
            lengths[slot] = len(row.prompt)
        ms, (out, self.cache) = self._timed(self.engine.prefill, ids, lengths, self.max_len, greedy, use_cache)
        self.slots = [None] * self.size
        for slot, row in enumerate(rows):
            self._place(slot, row, out[slot], ms)

    def _join(self, rows: list[Row]) -> None:
        slots = [s for s, r in enumerate(self.slots) if r is None][: len(rows)]
        ids = np.full((len(rows), self.prompt_width(rows)), self.pad, dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row.prompt)] = row.prompt
        ms, out = self._timed(self.engine.join, self.cache, np.array(slots, dtype=np.int32),  # type: ignore
                              ids, np.array([len(r.prompt) for r in rows], dtype=np.int32),
                              not any(r.needs_logits() for r in rows))
        for i, (slot, row) in enumerate(zip(slots, rows, strict=True)):
            self._place(slot, row, out[i], ms)

    def _timed(self, call: Callable[..., Any], *args: Any) -> tuple[float, Any]:
        """(milliseconds, result) of `call`, without the graph compiling or loading the engine says it did."""
        compiled = getattr(self.engine, "compile_seconds", 0.0)
        t0 = time.perf_counter()
        result = call(*args)
        return (time.perf_counter() - t0 - (getattr(self.engine, "compile_seconds", 0.0) - compiled)) * 1e3, result

    def _place(self, slot: int, row: Row, out: Any, ms: float) -> None:
        row.pending, row.position, row.prefill_ms = out, len(row.prompt), ms
        self.slots[slot] = row

    def step(self) -> list[Row]:
        """One step: every row's next token (rows that end, or were cancelled, leave); the rows that ended."""
        live = [(s, r) for s, r in enumerate(self.slots) if r is not None]
        done: list[Row] = []
        for _, row in live:
            if row.cancelled:
                row.finish = "cancelled"
        chosen = self._select([r for _, r in live if r.finish is None])
        tokens = np.full(self.size, self.pad, dtype=np.int32)
        positions = np.zeros(self.size, dtype=np.int32)
        for s, row in live:
            if row.finish is None:
                self._accept(row, chosen[id(row)])
            if row.finish is not None:
                self.slots[s] = None
                done.append(row)
            else:
                tokens[s], positions[s] = row.generated[-1], row.position
        remaining = [(s, r) for s, r in live if r.finish is None]
        if remaining:
            greedy = not any(r.needs_logits() for _, r in remaining)
            out = self.engine.step(self.cache, tokens, positions, greedy)
            for s, row in remaining:
                row.pending, row.position = out[s], min(row.position + 1, self.max_len - 1)
        return done

    def _select(self, rows: list[Row]) -> dict[int, int]:
        """Each row's next token from its pending output; rows sharing settings and a random stream together."""
        groups: dict[tuple[int, int], list[Row]] = {}
        for row in rows:
            groups.setdefault((id(row.cfg), id(row.rng)), []).append(row)
        chosen: dict[int, int] = {}
        for group in groups.values():
            if np.ndim(group[0].pending) == 0:  # the engine picked greedy ids itself
                picked = np.array([int(r.pending) for r in group])
            else:
                logits = np.stack([np.asarray(r.pending, dtype=np.float32) for r in group])
                picked = select_tokens(logits, [r.prompt + r.generated for r in group], group[0].cfg, group[0].rng)
                wants = [i for i, r in enumerate(group) if r.logprobs is not None]
                if wants:
                    lp = _log_softmax_at(logits[wants], picked[wants])
                    for i, v in zip(wants, lp, strict=True):
                        group[i].logprobs.append(float(v))  # type: ignore[union-attr]
            chosen.update((id(r), int(t)) for r, t in zip(group, picked, strict=True))
        return chosen

    def _accept(self, row: Row, tok: int) -> None:
        row.generated.append(tok)
        if row.on_token:
            row.on_token(tok)
        cfg = row.cfg
        if tok == self.eos:
            row.finish = "eos"
        elif row.should_stop and row.should_stop(row.generated):
            row.finish = "stop"
        elif (len(row.generated) >= cfg.max_new_tokens or row.position + 1 >= self.max_len
              or (cfg.max_length and len(row.prompt) + len(row.generated) >= cfg.max_length)):
            row.finish = "length"


def generate(engine: Engine, prompts: Sequence[list[int]], cfg: GenerationConfig, eos: int, pad: int,
             on_token: Callable[[int, int], None] | None = None,
             should_stop: Callable[[int, list[int]], bool] | None = None) -> list[GenerationOutput]:
    """Generate for every prompt (lists of ids); `on_token(row, id)` streams, `should_stop(row, ids)` ends a row."""
    prompts = [check_prompt(list(p), engine.context_length, cfg.truncate) for p in prompts]
    rng = np.random.default_rng(cfg.seed)
    per_call = min(engine.max_batch, engine.fixed_batch or engine.max_batch)
    outs: list[GenerationOutput] = []
    for start in range(0, len(prompts), per_call):
        rows = [Row(p, cfg, rng, on_token=(lambda t, i=i: on_token(i, t)) if on_token else None,
                    should_stop=(lambda ids, i=i: should_stop(i, ids)) if should_stop else None)
                for i, p in enumerate(prompts[start: start + per_call], start)]
        outs.extend(_run(engine, rows, eos, pad))
    return outs


def _run(engine: Engine, rows: list[Row], eos: int, pad: int) -> list[GenerationOutput]:
    """One batch of rows from prefill to their ends (the shapes bucketed to the rows)."""
    ctx, cfg, n = engine.context_length, rows[0].cfg, len(rows)
    longest = max(len(r.prompt) for r in rows)
    size = engine.fixed_batch or bucket(n, 1, max(engine.max_batch, n))
    max_len = engine.fixed_length or max(bucket(longest + cfg.max_new_tokens, 64, ctx), bucket(longest, 16, ctx))
    batch = Batch(engine, eos, pad, size, max_len)
    batch.admit(rows, greedy=in_graph_greedy(cfg), use_cache=cfg.use_cache)
    steps, t1, tokens_at_t1 = 0, time.perf_counter(), 0
    while batch.rows:
        batch.step()
        steps += 1
        if steps == 1:  # the first step may compile its graph: time the steady state only
            t1, tokens_at_t1 = time.perf_counter(), sum(len(r.generated) for r in rows)
    decode_s = time.perf_counter() - t1
    total = sum(len(r.generated) for r in rows)
    rate = (total - tokens_at_t1) / decode_s if steps > 2 and decode_s > 0 else 0.0
    return [GenerationOutput(r.generated, r.finish or "length", prompt_tokens=len(r.prompt),
                             prefill_ms=r.prefill_ms, decode_tokens_per_s=rate) for r in rows]
