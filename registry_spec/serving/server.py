"""`zoo serve MODEL`: the model's engine (or an exporter's runner), warmed up, behind the OpenAI-compatible app on
uvicorn. SIGTERM or Ctrl-C: stop accepting (new requests get 503), let in-flight requests finish for
`--shutdown-timeout` seconds, cancel the rest, exit 0."""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from ..errors import InputError
from ..specs import PredictSpec, ServeResult, ServeSpec
from .app import ServeState, create_app
from .metrics import ServeMetrics
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..handle import ModelHandle


class _Server(uvicorn.Server):
    """uvicorn, marking the app as draining on the first signal and exiting normally afterwards (uvicorn would
    re-raise the signal once shut down)."""

    def __init__(self, config: uvicorn.Config, state: ServeState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._captured_signals.clear()


def api_key(spec: ServeSpec) -> str | None:
    """`--api-key`, else `$ZOO_API_KEY` (as vLLM reads `VLLM_API_KEY`: a key on the command line shows in `ps`)."""
    return spec.api_key or os.environ.get("ZOO_API_KEY") or None


def serve(h: ModelHandle, spec: ServeSpec) -> ServeResult:
    engine, tok = h.generator(PredictSpec(
        model=spec.model, weights=spec.weights, config=spec.config, tokenizer=spec.tokenizer,
        precision=spec.precision, backend=spec.backend, artifacts=spec.artifacts, batch_size=spec.max_batch_size))
    if spec.seq_length and spec.seq_length > engine.context_length:
        raise InputError(f"--seq-length {spec.seq_length} is over the model's context ({engine.context_length})",
                         f"pass --seq-length {engine.context_length} or less")
    size = engine.fixed_batch or spec.max_batch_size
    max_len = engine.fixed_length or spec.seq_length or engine.context_length
    scheduler = Scheduler(engine, tok.eos_token_id, tok.pad_token_id, size, max_len, spec.max_queue)
    t0 = time.perf_counter()
    scheduler.start(warm_up=tok.encode("def") or [tok.eos_token_id])
    card = h.card
    state = ServeState(model=card.name, names={card.name, *card.aliases, f"{h.plugin}:{card.name}"}, owner=h.plugin,
                       tokenizer=tok, scheduler=scheduler, max_len=max_len, format_chat=h.format_chat,
                       format_infill=h.format_infill, api_key=api_key(spec), created=int(time.time()),
                       metrics=ServeMetrics(card.name, scheduler.load))
    mode = "continuous batching" if scheduler.continuous else "static batches (the engine cannot join rows)"
    print(f"zoo serve: {card.name} ({spec.backend}) ready in {time.perf_counter() - t0:.1f} s on "
          f"http://{spec.host}:{spec.port}/v1 ({size} slots of {max_len} tokens, {mode})", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(state), host=spec.host, port=spec.port, log_level=spec.log_level,
                            timeout_graceful_shutdown=max(1, round(spec.shutdown_timeout)), lifespan="off")
    server, started = _Server(config, state), time.perf_counter()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise InputError(f"could not listen on {spec.host}:{spec.port} (see the log above)",
                         "pick a free port with --port, or stop what holds it") from None
    finally:
        scheduler.stop(timeout=spec.shutdown_timeout)
    return ServeResult(requests=state.requests, completions=state.metrics.finished_counts()["completed"],
                       completion_tokens=state.metrics.generated_tokens(),
                       seconds=round(time.perf_counter() - started, 3))
