"""The routes: `/v1/models`, `/v1/completions` (with `suffix` for fill-in-the-middle), `/v1/chat/completions`,
`/tokenize` and `/detokenize` (vLLM's), `/health`, `/metrics`. Every error is answered in OpenAI's schema;
nothing a client sends reaches the engine unchecked."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..components import Tokenizer
from ..errors import ZooError, validator_message
from ..generation import GenerationConfig, Row
from ..predict import TextTracker
from .metrics import CONTENT_TYPE, RequestTimer, ServeMetrics
from .protocol import (
    APIError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    envelope,
    finish_reason,
    request_id,
    usage,
)
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown, async_deliverer


@dataclass
class ServeState:
    """What the routes need: the served model's names, its tokenizer and prompt formats, the scheduler, the
    metrics."""

    model: str
    names: set[str]
    owner: str
    tokenizer: Tokenizer
    scheduler: Scheduler
    max_len: int
    format_chat: Callable[[list[dict[str, str]]], str]
    format_infill: Callable[[str, str], str]
    metrics: ServeMetrics
    api_key: str | None = None
    draining: bool = False
    created: int = 0
    requests: int = 0


def create_app(state: ServeState) -> FastAPI:
    app = FastAPI(title=f"zoo serve {state.model}", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error')})"
                                         ).body(), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc:
            return JSONResponse(APIError(400, "the body must be a JSON object, sent as application/json").body(),
                                status_code=400)
        param = ".".join(loc)
        msg = validator_message(str(first.get("msg")))
        message = f"{param}: {msg}" if param else msg
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {exc}", "server_error").body(), status_code=500)

    if state.api_key is not None:
        app.add_middleware(_KeyCheck, key=state.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 503 if state.draining else 200
        return JSONResponse({"status": "draining" if state.draining else "ok", "model": state.model,
                             **state.scheduler.load(), **state.metrics.finished_counts()}, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model, "object": "model", "created": state.created,
                                            "owned_by": state.owner}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(state, body.model)
        if body.suffix is not None:
            if len(body.prompt) != 1 or not isinstance(body.prompt[0], str):
                raise APIError(400, "suffix takes a single text prompt", param="suffix")
            prompts: list[str | list[int]] = [_format(state.format_infill, body.prompt[0], body.suffix,
                                                      param="suffix")]
        else:
            prompts = list(body.prompt)
        rid = request_id("cmpl")
        sub = _submit(state, prompts, body, logprobs=body.logprobs is not None)
        if body.stream:
            return _stream(state, sub, rid, chat=False)
        results = await _collect(state, request, sub)
        choices = [{"index": i, "text": text, "finish_reason": finish_reason(finish),
                    "logprobs": _completion_logprobs(state, job) if body.logprobs is not None else None}
                   for i, (job, text, finish) in enumerate(results)]
        return envelope("text_completion", state.model, choices, rid, usage=_usage(sub.jobs))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        _check_model(state, body.model)
        text = _chat_prompt(state, body.messages)
        rid = request_id("chatcmpl")
        sub = _submit(state, [text], body, logprobs=body.logprobs)
        if body.stream:
            return _stream(state, sub, rid, chat=True)
        ((job, content, finish),) = await _collect(state, request, sub)
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": finish_reason(finish),
                  "logprobs": {"content": _chat_logprobs(state, job)} if body.logprobs else None}
        return envelope("chat.completion", state.model, [choice], rid, usage=_usage(sub.jobs))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        _check_model(state, body.model)
        text = body.prompt if body.messages is None else _chat_prompt(state, body.messages)
        ids = state.tokenizer.encode(text or "")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        _check_model(state, body.model)
        _check_ids(state, body.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


OPEN_ROUTES = ("/health", "/metrics")  # what a load balancer and a scraper read without the API key


class _KeyCheck:
    """401 for a request without the server's key (all but OPEN_ROUTES), before the body is read (a pure ASGI
    middleware: Starlette's BaseHTTPMiddleware would wrap every streamed response in a task group and a memory
    stream)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given[:7].lower() + given[7:], self.expected):
                exc = APIError(401, "invalid API key: send it as 'Authorization: Bearer KEY'",
                               "authentication_error", code="invalid_api_key")
                await JSONResponse(exc.body(), status_code=exc.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _check_model(state: ServeState, name: str) -> None:
    if name not in state.names:
        raise APIError(404, f"model {name!r} is not served here; this server serves {state.model!r}",
                       "not_found_error", param="model", code="model_not_found")


def _check_ids(state: ServeState, ids: list[int], param: str) -> None:
    vocab = state.tokenizer.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:  # the tokenizer would drop it silently, the model index past its embedding
        raise APIError(400, f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", param=param)


def _chat_prompt(state: ServeState, messages: list[ChatMessage]) -> str:
    """The messages in the model's chat template (what the chat route generates from)."""
    return _format(state.format_chat, [{"role": m.role, "content": m.text()} for m in messages], param="messages")


def _format(fn: Callable[..., str], *args: Any, param: str) -> str:
    try:
        return fn(*args)
    except ZooError as exc:
        raise APIError(400, exc.message + (f" ({exc.hint})" if exc.hint else ""), param=param) from None


@dataclass
class Submission:
    """A request's jobs (one per prompt) and the queue their events arrive on, as (job index, event)."""

    jobs: list[Job]
    queue: asyncio.Queue


def _submit(state: ServeState, prompts: list[str | list[int]], body: CompletionRequest | ChatRequest,
            logprobs: bool) -> Submission:
    """One job per prompt (a text, or its token ids), queued for the scheduler (all or none)."""
    arrival = time.perf_counter()
    param, max_tokens = body.completion_limit()
    if state.draining:
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
    encoded = [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for ids in encoded:
        _check_ids(state, ids, "prompt")
        if not ids:
            raise APIError(400, "empty prompt", param="prompt")
        if len(ids) >= state.max_len:
            raise APIError(413, f"the prompt has {len(ids)} tokens; this server's context is {state.max_len} "
                           "(prompt and completion)", param="prompt", code="context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > state.max_len:  # vLLM's and OpenAI's answer too
            raise APIError(400, f"this server's context is {state.max_len} tokens, but {len(ids) + max_tokens} "
                           f"were requested ({len(ids)} in the prompt, {max_tokens} in the completion); pass "
                           f"{param} {state.max_len - len(ids)} or less, or a shorter prompt", param=param,
                           code="context_length_exceeded")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    sub = Submission([], queue)
    for i, ids in enumerate(encoded):
        cfg = GenerationConfig(max_new_tokens=max_tokens or state.max_len, do_sample=body.temperature > 0,
                               temperature=body.temperature or 1.0, top_k=body.top_k, top_p=body.top_p,
                               repetition_penalty=body.repetition_penalty, seed=body.seed, stop=list(body.stop))
        tracker = TextTracker(state.tokenizer, cfg.stop)
        row = Row(ids, cfg, np.random.default_rng(body.seed), logprobs=[] if logprobs else None,
                  should_stop=tracker.stopped if cfg.stop else None)
        sub.jobs.append(Job(row, tracker, async_deliverer(loop, queue, i), index=i,
                            timer=RequestTimer(state.metrics, arrival)))
    submitted: list[Job] = []
    try:
        for job in sub.jobs:
            state.scheduler.submit(job)
            submitted.append(job)
    except (QueueFull, ShuttingDown) as exc:
        _cancel(state, submitted)
        if isinstance(exc, QueueFull):
            raise APIError(429, f"the server is busy: {exc}; retry later", "rate_limit_error",
                           code="queue_full") from None
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None
    state.requests += 1
    return sub


def _cancel(state: ServeState, jobs: list[Job]) -> None:
    for job in jobs:
        state.scheduler.cancel(job)


async def _events(state: ServeState, sub: Submission) -> AsyncIterator[tuple[int, tuple]]:
    """(job index, event) as they come, until every job has ended or the client has gone; whatever has not
    ended when this stops (a disconnect, or the stream's task cancelled by one) is cancelled."""
    ended: set[int] = set()
    try:
        while len(ended) < len(sub.jobs):
            index, event = await sub.queue.get()
            if event[0] == "disconnected":
                return
            if event[0] == "error":
                raise APIError(500, event[1], "server_error")
            yield index, event
            if event[0] == "end":
                ended.add(index)
    finally:
        _cancel(state, [j for j in sub.jobs if j.index not in ended])


async def _watch(request: Request, queue: asyncio.Queue) -> None:
    """Wake the waiting route when the client disconnects (the body has been read: the next message is it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait((-1, ("disconnected",)))


async def _collect(state: ServeState, request: Request, sub: Submission) -> list[tuple[Job, str, str]]:
    """Each job's (job, final text, finish) once all have ended."""
    parts: dict[int, list[str]] = {j.index: [] for j in sub.jobs}
    finish: dict[int, str] = {}
    watcher = asyncio.create_task(_watch(request, sub.queue))
    try:
        async for index, event in _events(state, sub):
            parts[index].append(event[1] if event[0] == "text" else event[2])
            if event[0] == "end":
                finish[index] = event[1]
    finally:
        watcher.cancel()
    if len(finish) < len(sub.jobs):
        raise APIError(499, "the client disconnected", "invalid_request_error")
    return [(j, "".join(parts[j.index]), finish[j.index]) for j in sub.jobs]


def _stream(state: ServeState, sub: Submission, rid: str, chat: bool) -> EventSourceResponse:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return json.dumps(envelope(kind, state.model, [choice], rid))

    # sse-starlette watches for the client's disconnect and cancels `events` (and so `_events`) when it goes
    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield chunk(0, None, None, first=True)
            async for index, event in _events(state, sub):
                if event[0] == "text" and event[1]:
                    yield chunk(index, event[1], None)
                elif event[0] == "end":
                    yield chunk(index, event[2], finish_reason(event[1]))
            yield json.dumps(envelope(kind, state.model, [], rid, usage=_usage(sub.jobs)))
            yield "[DONE]"
        except APIError as exc:
            yield json.dumps(exc.body())

    return EventSourceResponse(events(), ping=15)


def _usage(jobs: list[Job]) -> dict[str, int]:
    return usage(sum(len(j.row.prompt) for j in jobs), sum(len(j.row.generated) for j in jobs))


def _completion_logprobs(state: ServeState, job: Job) -> dict[str, Any]:
    tokens = [state.tokenizer.decode([t], skip_special_tokens=False) for t in job.row.generated]
    offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
    return {"tokens": tokens, "token_logprobs": job.row.logprobs, "top_logprobs": None, "text_offset": offsets}


def _chat_logprobs(state: ServeState, job: Job) -> list[dict[str, Any]]:
    out = []
    for tok, lp in zip(job.row.generated, job.row.logprobs or [], strict=False):
        text = state.tokenizer.decode([tok], skip_special_tokens=False)
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
    return out
