"""Continuous batching: one thread owns the engine and its running `Batch`. Requests wait in a bounded queue,
join the batch at step boundaries as slots free up, stream their tokens to the asyncio side as they are chosen,
and leave when they end or are cancelled (a disconnected client's row is freed before the next step)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..generation import Batch, Engine, GenerationConfig, Row
from ..predict import TextTracker

if TYPE_CHECKING:
    from .metrics import RequestTimer

log = logging.getLogger("zoo.serve")


class QueueFull(Exception):
    """More requests are waiting than the server's --max-queue."""


class ShuttingDown(Exception):
    """The server stopped accepting requests."""


@dataclass
class Job:
    """A row and where its events go: ("text", delta) per token, then ("end", finish, rest) or
    ("error", message). Events are delivered on the submitting event loop."""

    row: Row
    tracker: TextTracker
    deliver: Callable[[tuple], None]
    index: int = 0  # the choice it answers
    timer: RequestTimer | None = None  # the server's metrics of it

    def on_token(self, _tok: int) -> None:
        now = time.perf_counter()
        self.deliver(("text", self.tracker.delta(self.row.generated)))
        if self.timer:
            self.timer.token(now)

    def admitted(self) -> None:
        if self.timer:
            self.timer.admitted(len(self.row.prompt))

    def ended(self, reason: str) -> None:
        if self.timer:
            self.timer.ended(reason, len(self.row.generated))


def async_deliverer(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> Callable[[tuple], None]:
    """Events put on `queue` as (index, event), from any thread."""
    def deliver(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass
    return deliver


class Scheduler:
    def __init__(self, engine: Engine, eos: int, pad: int, size: int, max_len: int, max_queue: int) -> None:
        self.batch = Batch(engine, eos, pad, size, max_len)
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}  # id(row) -> its job, while in the batch
        self.cond = threading.Condition()
        self.accepting, self.stopping = True, False
        self.thread = threading.Thread(target=self._loop, name="zoo-scheduler", daemon=True)

    @property
    def continuous(self) -> bool:
        return self.batch.can_join

    def start(self, warm_up: list[int]) -> None:
        """Compile what the first requests would run (a prompt's prefill, greedy and sampling steps, on the
        prompt `warm_up`), then take requests."""
        if self.batch.can_join:
            self.batch.open()
        for cfg in (GenerationConfig(max_new_tokens=2), GenerationConfig(max_new_tokens=2, do_sample=True)):
            self.batch.admit([Row(list(warm_up), cfg, np.random.default_rng(0))])
            while self.batch.rows:
                self.batch.step()
        self.thread.start()

    def submit(self, job: Job) -> None:
        job.row.on_token = job.on_token
        with self.cond:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """Free the job's row: dropped from the queue now, or out of the batch before the next step."""
        job.row.cancelled = True
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.ended("cancelled")
            self.cond.notify()

    def stop(self, timeout: float) -> None:
        """Stop accepting; cancel whatever is still waiting or running; wait for the thread."""
        with self.cond:
            self.accepting, self.stopping = False, True
            for job in list(self.waiting) + list(self.jobs.values()):
                job.row.cancelled = True
            self.cond.notify()
        self.thread.join(timeout)

    def load(self) -> dict[str, Any]:
        return {"running": len(self.batch.rows), "waiting": len(self.waiting), "slots": self.batch.size,
                "continuous_batching": self.continuous}

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.batch.rows and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.batch.rows:
                    for job in self.waiting:
                        job.deliver(("error", "the server shut down before the request ran"))
                        job.ended("cancelled")
                    self.waiting.clear()
                    return
                admit = [self.waiting.popleft() for _ in range(min(self.batch.free(), len(self.waiting)))]
            try:
                self._run(admit)
            except Exception as exc:  # noqa: BLE001 - a failing engine ends the rows it ran, never the server
                log.exception("generation failed")
                self._fail(admit + list(self.jobs.values()), f"generation failed: {exc}")

    def _run(self, admit: list[Job]) -> None:
        for job in admit:
            self.jobs[id(job.row)] = job
            job.admitted()
        if admit:
            self.batch.admit([j.row for j in admit])
        for row in self.batch.step():
            job = self.jobs.pop(id(row))
            job.ended(row.finish or "length")
            if row.finish == "cancelled":
                continue
            job.deliver(("end", row.finish, job.tracker.rest(row.generated, row.finish or "length")))

    def _fail(self, jobs: list[Job], message: str) -> None:
        self.batch.slots = [None] * self.batch.size
        if self.batch.can_join:  # a fresh cache: the failed call may have left the old one half-written
            self.batch.cache = None
            try:
                self.batch.open()
            except Exception:  # noqa: BLE001
                log.exception("could not reopen the batch")
        for job in {id(j): j for j in jobs}.values():
            self.jobs.pop(id(job.row), None)
            job.deliver(("error", message))
            job.ended("error")
