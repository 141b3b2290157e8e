"""`GET /metrics`: the server's own measurements in Prometheus' text format, as vLLM's and TGI's servers expose
them. Latencies are timed inside the server, per request, from the parsed request's arrival at its route: to its
first token (TTFT), between its tokens, waiting for a slot, and to its end; with token counters, finished
requests by reason, and the running and waiting rows. A client's own time and the HTTP stack's are not in them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets, with finer ones below 10 ms where a small model on a CPU decodes
_TTFT = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
              1.0, 2.5, 5.0, 10.0)
_REQUEST = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0,
            480.0, 960.0, 1920.0)
FINISH_REASONS = ("eos", "stop", "length", "cancelled", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """One server's metrics, in a registry of their own (labelled `model_name`, as vLLM's are). Histograms and
    counters are thread-safe: the scheduler thread records into them while the event loop renders them."""

    def __init__(self, model: str, load: Callable[[], dict[str, Any]]) -> None:
        self.registry, self.model = CollectorRegistry(), model

        def metric(kind: type, name: str, doc: str, *labels: str, **kw: Any) -> Any:
            return kind(f"zoo_{name}", doc, ["model_name", *labels], registry=self.registry, **kw)

        self.ttft = metric(Histogram, "time_to_first_token_seconds", "From the request's arrival to its first "
                           "token chosen", buckets=_TTFT).labels(model)
        self.per_token = metric(Histogram, "time_per_output_token_seconds", "Between a request's consecutive "
                                "tokens", buckets=_PER_TOKEN).labels(model)
        self.queued = metric(Histogram, "request_queue_time_seconds", "From the request's arrival to its row's "
                             "admission into the batch", buckets=_REQUEST).labels(model)
        self.latency = metric(Histogram, "e2e_request_latency_seconds", "From the request's arrival to its end",
                              buckets=_REQUEST).labels(model)
        self.prompt_tokens = metric(Counter, "prompt_tokens", "Prompt tokens prefilled").labels(model)
        self.generation_tokens = metric(Counter, "generation_tokens", "Tokens generated").labels(model)
        finished = metric(Counter, "request_finished", "Requests (one per prompt) ended, by reason", "finished_reason")
        self.finished = {reason: finished.labels(model, reason) for reason in FINISH_REASONS}
        for name, key, doc in (("num_requests_running", "running", "Rows in the running batch"),
                               ("num_requests_waiting", "waiting", "Requests waiting for a slot")):
            metric(Gauge, name, doc).labels(model).set_function(lambda key=key: load()[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def finished_counts(self) -> dict[str, int]:
        """Requests ended so far: completed (at EOS, a stop or the length cap) and cancelled (/health's counts)."""
        def count(reason: str) -> int:
            return int(self._sample("request_finished_total", finished_reason=reason))

        return {"completed": sum(count(r) for r in ("eos", "stop", "length")), "cancelled": count("cancelled")}

    def generated_tokens(self) -> int:
        return int(self._sample("generation_tokens_total"))

    def _sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(f"zoo_{name}", {"model_name": self.model, **labels}) or 0.0


class RequestTimer:
    """One row's timestamps, recorded into `metrics` as its admission, tokens and end happen."""

    def __init__(self, metrics: ServeMetrics, arrival: float) -> None:
        self.metrics, self.arrival, self.last, self.done = metrics, arrival, 0.0, False

    def admitted(self, prompt_tokens: int) -> None:
        self.metrics.queued.observe(time.perf_counter() - self.arrival)
        self.metrics.prompt_tokens.inc(prompt_tokens)

    def token(self, now: float) -> None:
        if self.last:
            self.metrics.per_token.observe(now - self.last)
        else:
            self.metrics.ttft.observe(now - self.arrival)
        self.last = now

    def ended(self, reason: str, generated: int) -> None:
        if self.done:  # a failing step ends every row it ran, some of which it may have ended already
            return
        m, self.done = self.metrics, True
        m.latency.observe(time.perf_counter() - self.arrival)
        m.finished[reason if reason in m.finished else "error"].inc()
        m.generation_tokens.inc(generated)
