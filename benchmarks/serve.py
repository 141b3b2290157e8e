"""`zoo serve` under load: aggregate throughput and p50/p95 latency at 1, 8 and 32 concurrent streaming clients
(the official openai client against a real server process), and the warm server's time to first token against a
bare prefill of the same prompt on the same engine, in-process, split into what the scheduler adds (in-process,
no HTTP), what HTTP adds (a bare httpx client) and what the openai client adds, with the HTTP floor both clients
meet on the same stack without a model, and the TTFT the server itself measures (its /metrics: from the parsed
request to its first token chosen). Results are appended to RESULTS.md.

    python benchmarks/serve.py [--shapes tiny,tiny_starcoder] [--clients 1,8,32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import append_results, machine

HERE = Path(__file__).parent
SHAPES = {"tiny": [], "tiny_starcoder": ["--config", str(HERE / "tiny_starcoder.json")]}
SEQ_LENGTH = 512  # the server's --seq-length, and the in-process scheduler's rows
DECODE_STEPS = 32  # --max-tokens' default: the decode steps between one request's prefill and the next
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, iteratively.\"\"\"\n    a, b = 0, 1\n"


def in_process_ms(extra: list[str], slots: int) -> tuple[float, float, float]:
    """Medians over warm runs, in this process, on the online engine: a bare batch-1 prefill of PROMPT (what a
    request's first token costs the engine), back to back and after DECODE_STEPS decode steps of a full batch (the
    order a server runs them in: the caches hold the decode's code and data); and the first token of PROMPT
    submitted to the server's scheduler (a running batch of `slots` slots: its join, the thread hand-offs, no
    HTTP)."""
    import numpy as np

    from registry_spec.generation import Batch, GenerationConfig, Row
    from registry_spec.predict import TextTracker
    from registry_spec.registry import Registry
    from registry_spec.serving.scheduler import Job, Scheduler
    from registry_spec.specs import PredictSpec

    config = Path(extra[1]) if extra else None
    engine, tok = Registry().handle("wizardcoder-tiny").generator(
        PredictSpec(model="wizardcoder-tiny", config=config, batch_size=slots))
    ids = tok.encode(PROMPT)
    running = Batch(engine, tok.eos_token_id, tok.pad_token_id, slots, SEQ_LENGTH)
    width = running.prompt_width([Row(list(ids), GenerationConfig(), np.random.default_rng(0))])  # the join's
    row = np.full((1, width), tok.pad_token_id, np.int32)
    row[0, : len(ids)] = ids
    lengths = np.array([len(ids)], np.int32)
    bare, after = [], []
    for _ in range(11):
        t0 = time.perf_counter()
        engine.prefill(row, lengths, engine.context_length, True, True)
        bare.append((time.perf_counter() - t0) * 1e3)
    running.open()
    for _ in range(11):  # the server's order: another request's decode steps, then this prefill
        for _ in range(DECODE_STEPS):
            engine.step(running.cache, np.zeros(slots, np.int32), np.full(slots, width, np.int32), True)
        t0 = time.perf_counter()
        engine.prefill(row, lengths, engine.context_length, True, True)
        after.append((time.perf_counter() - t0) * 1e3)
    scheduler = Scheduler(engine, tok.eos_token_id, tok.pad_token_id, slots, SEQ_LENGTH, 8)
    scheduler.start(warm_up=ids)
    first = []
    for _ in range(11):
        ended, marks = threading.Event(), []

        def deliver(event: tuple, marks: list = marks, ended: threading.Event = ended) -> None:
            marks.append(time.perf_counter())
            if event[0] != "text":
                ended.set()

        job = Job(Row(list(ids), GenerationConfig(max_new_tokens=1), np.random.default_rng(0)), TextTracker(tok, []),
                  deliver)
        t0 = time.perf_counter()
        scheduler.submit(job)
        ended.wait(60)
        first.append((marks[0] - t0) * 1e3)
    scheduler.stop(10)
    return statistics.median(bare[1:]), statistics.median(after[1:]), statistics.median(first[1:])


# The HTTP floor: the same stack (FastAPI, sse-starlette, uvicorn) answering a streamed completion with its first
# chunk at once, no model behind it. What a client measures against it is what no engine can take away.
FLOOR_APP = """
import json, sys, time, uvicorn
from fastapi import FastAPI
from sse_starlette.sse import EventSourceResponse
app = FastAPI()
@app.get("/health")
def health():
    return {"status": "ok"}
@app.post("/v1/completions")
async def completions(body: dict):
    def chunk(text, usage=None):
        return {"id": "cmpl-0", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}], "usage": usage}
    async def events():
        yield json.dumps(chunk("x"))
        yield json.dumps(chunk("", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}))
        yield "[DONE]"
    return EventSourceResponse(events(), ping=15)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], slots: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return wait_healthy(subprocess.Popen(
        [sys.executable, "-m", "registry_spec.cli", "serve", "wizardcoder-tiny", *extra, "--port", str(port),
         "--max-batch-size", str(slots), "--seq-length", str(SEQ_LENGTH), "--log-level", "warning"],
        stderr=subprocess.DEVNULL), port)


def floor_ms(max_tokens: int) -> tuple[float, float]:
    """Median TTFT of the openai client and of bare httpx against FLOOR_APP."""
    port = free_port()
    proc, url = wait_healthy(subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)]), port)
    try:
        load(url, 1, 8, max_tokens)  # untimed: connections and imports warm
        return load(url, 1, 20, max_tokens)["ttft_ms"], raw_ttft_ms(url, max_tokens)
    finally:
        proc.terminate()
        proc.wait(60)


def wait_healthy(proc: subprocess.Popen, port: int) -> tuple[subprocess.Popen, str]:
    import httpx2

    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx2.HTTPError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    latencies, ttfts, tokens = [], [], []
    lock = threading.Lock()
    todo = list(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            t0 = time.perf_counter()
            first = None
            for chunk in client.completions.create(model="wizardcoder-tiny", prompt=PROMPT, max_tokens=max_tokens,
                                                   temperature=0, stream=True):
                first = first or time.perf_counter()
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            with lock:
                latencies.append(time.perf_counter() - t0)
                ttfts.append((first or time.perf_counter()) - t0)
                tokens.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"tokens_per_s": sum(tokens) / wall, "p50_s": statistics.median(latencies), "p95_s": q[18],
            "ttft_ms": statistics.median(ttfts) * 1e3}


def raw_ttft_ms(url: str, max_tokens: int, requests: int = 20) -> float:
    """Median time to the first SSE event of a streamed completion over a bare HTTP client (httpx, one
    connection): the server's part of the TTFT without the openai client's own cost."""
    import httpx2

    body = {"model": "wizardcoder-tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    times = []
    with httpx2.Client(timeout=600) as client:
        for _ in range(requests):
            t0, first = time.perf_counter(), None
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter()
            times.append(((first or time.perf_counter()) - t0) * 1e3)
    return statistics.median(times)


def server_times(url: str) -> dict[str, float]:
    """The server's own histograms so far (its /metrics): time to first token and queue time (arrival to the
    row's admission, before its prefill), as {name_sum: seconds, name_count: n}."""
    import httpx2
    from prometheus_client.parser import text_string_to_metric_families

    names = {f"zoo_{m}_seconds_{k}" for m in ("time_to_first_token", "request_queue_time") for k in ("sum", "count")}
    return {s.name: s.value for family in text_string_to_metric_families(httpx2.get(url + "/metrics").text)
            for s in family.samples if s.name in names}


def mean_ms(before: dict[str, float], after: dict[str, float], metric: str) -> float:
    name = f"zoo_{metric}_seconds"
    return (after[name + "_sum"] - before[name + "_sum"]) / (after[name + "_count"] - before[name + "_count"]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny,tiny_starcoder")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8)
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    lines = ["| shape | clients | requests | tokens/s | × 1 client | p50 latency s | p95 latency s | TTFT ms |",
             "|---|---|---|---|---|---|---|---|"]
    floor_openai, floor_httpx = floor_ms(args.max_tokens)
    notes = [f"- HTTP floor (the same FastAPI/sse-starlette/uvicorn stack streaming a first chunk at once, no "
             f"model): TTFT {floor_openai:.1f} ms (openai client), {floor_httpx:.1f} ms (bare httpx)"]
    for shape in args.shapes.split(","):
        extra = SHAPES[shape]
        prefill, after_decode, scheduled = in_process_ms(extra, args.slots)
        proc, url = start_server(extra, args.slots)
        try:
            load(url, 1, 2, args.max_tokens)  # untimed: the prompt's prefill bucket compiles on its first request
            base = None
            for c in levels:
                requests = max(8, 2 * c)
                r = load(url, c, requests, args.max_tokens)
                base = base or r["tokens_per_s"]
                lines.append(f"| {shape} | {c} | {requests} | {r['tokens_per_s']:.1f} | "
                             f"{r['tokens_per_s'] / base:.2f}× | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                             f"{r['ttft_ms']:.1f} |")
                if c == 1:
                    t0, raw = server_times(url), raw_ttft_ms(url, args.max_tokens)
                    t1 = server_times(url)
                    inside, queued = mean_ms(t0, t1, "time_to_first_token"), mean_ms(t0, t1, "request_queue_time")
                    notes.append(f"- {shape}: warm TTFT at 1 client {r['ttft_ms']:.1f} ms (openai client), "
                                 f"{raw:.1f} ms (bare httpx) against a bare batch-1 prefill of {prefill:.1f} ms "
                                 f"in-process ({r['ttft_ms'] / prefill:.2f}×, {raw / prefill:.2f}×), "
                                 f"{after_decode:.1f} ms after {DECODE_STEPS} decode steps as in a server "
                                 f"({r['ttft_ms'] / after_decode:.2f}×, {raw / after_decode:.2f}×); the "
                                 f"scheduler's first token in-process, without HTTP: {scheduled:.1f} ms "
                                 f"({scheduled / prefill:.2f}×); above the HTTP floor: "
                                 f"{r['ttft_ms'] - floor_openai:.1f} ms / {raw - floor_httpx:.1f} ms "
                                 f"({(r['ttft_ms'] - floor_openai) / prefill:.2f}×, "
                                 f"{(raw - floor_httpx) / prefill:.2f}× the prefill); measured inside the server "
                                 f"(its /metrics, mean over the httpx requests): {inside:.1f} ms "
                                 f"({inside / prefill:.2f}×), {queued:.2f} ms of it before the row's prefill")
                print(lines[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    table = "\n".join(lines) + "\n\n" + "\n".join(notes)
    append_results("zoo serve: continuous batching under load", "python benchmarks/serve.py " +
                   " ".join(sys.argv[1:]), machine() + f"; {args.slots} slots, {args.max_tokens} tokens a request, "
                   "greedy, streaming", table, [])


if __name__ == "__main__":
    main()
