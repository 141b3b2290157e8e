"""`zoo predict` on any engine: prompts in (flags or JSONL) through the tokenizer component's template, the one
generation loop, incremental detokenization with stop strings and streaming, text / JSONL out."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from .atomic import write_jsonl
from .components import Tokenizer
from .errors import InputError
from .generation import Engine, GenerationConfig, GenerationOutput, generate
from .specs import Completion, PredictResult, PredictSpec


def read_prompts(spec: PredictSpec, format_prompt: Callable[[str, str, str], str]) -> list[str]:
    prompts = [format_prompt(p, spec.template, "") for p in spec.prompt]
    if spec.input is not None:
        if not spec.input.is_file():
            raise InputError(f"input file {spec.input} does not exist", "pass a JSONL file with --input")
        for n, line in enumerate(spec.input.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{spec.input}:{n}: invalid JSON ({exc.msg})", "one JSON object per line") from None
            text = row.get("instruction", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{spec.input}:{n}: no string 'instruction' or 'prompt' field",
                                 'rows look like {"instruction": "..."} or {"prompt": "..."}')
            prompts.append(format_prompt(text, spec.template, row.get("input", "") or ""))
    if not prompts:
        raise InputError("no prompt given", "pass --prompt TEXT (repeatable) or --input FILE.jsonl")
    return prompts


def generation_config(spec: PredictSpec) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample, temperature=spec.temperature,
        top_k=spec.top_k, top_p=spec.top_p, repetition_penalty=spec.repetition_penalty, seed=spec.seed,
        stop=list(spec.stop), use_cache=spec.use_cache, truncate=spec.truncate,
    )


class TextTracker:
    """Incremental detokenization of one row: after each token the new text that is final — holding back an
    incomplete UTF-8 sequence and any tail that may begin a stop string, so what was streamed always equals the
    start of the final text — whether a stop string appeared, and the final text (cut before the stop string)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, stop
        self.emitted = ""
        self._decoded: tuple[int, str] = (0, "")  # (ids decoded, text): the row's ids only grow

    def text(self, ids: list[int]) -> str:
        if self._decoded[0] != len(ids):  # once per token, though streaming and stop checks both ask
            self._decoded = (len(ids), self.tok.decode(ids, skip_special_tokens=True))
        return self._decoded[1]

    def _first_stop(self, text: str) -> int | None:
        return min((text.find(s) for s in self.stop if s in text), default=None)

    def _cut(self, text: str) -> int:
        """Where the final text ends if generation stopped now."""
        found = self._first_stop(text)
        if found is not None:
            return found
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held

    def delta(self, ids: list[int]) -> str:
        """The text to stream after `ids` (may be empty)."""
        text = self.text(ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        safe = text[: self._cut(text)]
        if not safe.startswith(self.emitted):
            return ""
        new, self.emitted = safe[len(self.emitted):], safe
        return new

    def stopped(self, ids: list[int]) -> bool:
        return self._first_stop(self.text(ids)) is not None

    def final(self, ids: list[int], finish: str) -> str:
        text = self.text(ids)
        found = self._first_stop(text) if finish == "stop" else None
        return text if found is None else text[:found]

    def rest(self, ids: list[int], finish: str) -> str:
        """What is left to stream once the row has ended."""
        return self.final(ids, finish)[len(self.emitted):]


def run_predict(spec: PredictSpec, engine: Engine, tokenizer: Tokenizer, prompts: list[str]) -> PredictResult:
    """`prompts`: `read_prompts(spec, ...)`, read before the engine was built."""
    cfg = generation_config(spec)
    encoded = [tokenizer.encode(p) for p in prompts]
    trackers = [TextTracker(tokenizer, cfg.stop) for _ in prompts]
    ids_so_far: dict[int, list[int]] = {}

    def on_token(row: int, tok: int) -> None:
        ids_so_far.setdefault(row, []).append(tok)
        sys.stdout.write(trackers[row].delta(ids_so_far[row]))
        sys.stdout.flush()

    outs: list[GenerationOutput] = []
    # streamed prompts go one after another, readable; otherwise in batches of the engine's size
    groups = [[i] for i in range(len(encoded))] if spec.stream and len(prompts) > 1 else [list(range(len(encoded)))]
    for group in groups:
        outs += generate(engine, [encoded[i] for i in group], cfg, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         on_token=(lambda r, t, g=group: on_token(g[r], t)) if spec.stream else None,
                         should_stop=(lambda r, ids, g=group: trackers[g[r]].stopped(ids)) if cfg.stop else None)
    completions = []
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        text = trackers[i].final(out.token_ids, out.finish_reason)
        if spec.stream:
            sys.stdout.write(trackers[i].rest(out.token_ids, out.finish_reason) + "\n")
        completions.append(Completion(prompt=prompt, text=text, token_ids=out.token_ids,
                                      finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
                                      prefill_ms=round(out.prefill_ms, 3),
                                      decode_tokens_per_s=round(out.decode_tokens_per_s, 2)))
    result = PredictResult(completions=completions)
    if spec.output is not None:
        write_jsonl(spec.output, [c.model_dump(mode="json") for c in completions])
    return result
