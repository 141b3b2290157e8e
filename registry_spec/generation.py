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
    allowed the engine to pick the argmax itself (the fast path)."""

    context_length: int  # tokens a row may hold, prompt and generated
    max_batch: int  # rows per call
    fixed_batch: int | None  # graphs of one batch size only (exported): every call has exactly this many rows
    fixed_length: int | None  # graphs of one sequence length only: prompts padded to it, the cache this long

    def prefill(self, ids: np.ndarray, lengths: np.ndarray, max_len: int, greedy: bool,
                use_cache: bool) -> tuple[np.ndarray, Any]:
        """Rows `ids` [B, T] (int32) of `lengths` [B] tokens: the outputs at each row's last token, and a cache
        handle for `step` sized for `max_len` tokens a row."""

    def step(self, cache: Any, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Write `tokens` [B] at `positions` [B] (per row) and return the outputs there."""


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


def generate(engine: Engine, prompts: Sequence[list[int]], cfg: GenerationConfig, eos: int, pad: int,
             on_token: Callable[[int, int], None] | None = None,
             should_stop: Callable[[int, list[int]], bool] | None = None) -> list[GenerationOutput]:
    """Generate for every prompt (lists of ids); `on_token(row, id)` streams, `should_stop(row, ids)` ends a row."""
    prompts = [check_prompt(list(p), engine.context_length, cfg.truncate) for p in prompts]
    rng = np.random.default_rng(cfg.seed)
    per_call = min(engine.max_batch, engine.fixed_batch or engine.max_batch)
    outs: list[GenerationOutput] = []
    for start in range(0, len(prompts), per_call):
        stream = (lambda r, t, s=start: on_token(s + r, t)) if on_token else None
        stop = (lambda r, ids, s=start: should_stop(s + r, ids)) if should_stop else None
        outs.extend(_generate_chunk(engine, prompts[start: start + per_call], cfg, rng, eos, pad, stream, stop))
    return outs


def _generate_chunk(engine: Engine, prompts: list[list[int]], cfg: GenerationConfig, rng: np.random.Generator,
                    eos: int, pad: int, on_token: Callable | None,
                    should_stop: Callable | None) -> list[GenerationOutput]:
    n, ctx = len(prompts), engine.context_length
    batch = engine.fixed_batch or bucket(n, 1, max(engine.max_batch, n))
    longest = max(len(p) for p in prompts)
    prompt_len = engine.fixed_length or bucket(longest, 16, ctx)
    max_len = engine.fixed_length or max(bucket(longest + cfg.max_new_tokens, 64, ctx), prompt_len)
    lengths = np.array([len(p) for p in prompts] + [1] * (batch - n), dtype=np.int32)
    ids = np.full((batch, prompt_len), pad, dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    t0 = time.perf_counter()
    out, cache = engine.prefill(ids, lengths, max_len, in_graph_greedy(cfg), cfg.use_cache)
    prefill_ms = (time.perf_counter() - t0) * 1e3

    generated: list[list[int]] = [[] for _ in range(batch)]
    history = [list(p) for p in prompts] + [[pad]] * (batch - n)
    finish: list[str | None] = [None] * n + ["length"] * (batch - n)
    positions = lengths.copy()
    t1, steps, tokens_at_t1 = time.perf_counter(), 0, 0
    while True:
        tokens = out.astype(np.int32) if out.ndim == 1 else select_tokens(out, history, cfg, rng).astype(np.int32)
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
        out = engine.step(cache, tokens, positions)
        positions = np.minimum(positions + 1, max_len - 1)
        steps += 1
        if steps == 1:  # the first step may compile its graph: time the steady state only
            t1, tokens_at_t1 = time.perf_counter(), sum(len(g) for g in generated[:n])
    decode_s = time.perf_counter() - t1
    total_new = sum(len(g) for g in generated[:n])
    rate = (total_new - tokens_at_t1) / decode_s if steps > 1 and decode_s > 0 else 0.0
    return [GenerationOutput(generated[r], finish[r] or "length", prompt_tokens=int(lengths[r]),
                             prefill_ms=prefill_ms, decode_tokens_per_s=rate) for r in range(n)]
