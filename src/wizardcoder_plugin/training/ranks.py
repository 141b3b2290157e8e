"""What data-parallel ranks agree on outside the training graphs: each step's logged loss and whether any rank
asked to stop (one all-reduce per step), and waiting together while rank 0 writes a checkpoint.

A rank waiting in a collective gives up after a backend timeout: ≈30 s on MindSpore's CPU backend (HCCL's own on
Ascend), while a real model's checkpoint takes minutes to write. So rank 0 writes in pieces and joins a keep-alive
all-reduce between them at least every `interval` seconds; the other ranks join the same all-reduces until rank 0's
last one says the checkpoint is written. Nobody leaves early either: msrun kills every rank as soon as one exits
non-zero, rank 0 with its half-written checkpoint."""

from __future__ import annotations

import time

import numpy as np


class RankSync:
    # rank 0 flushes its checkpoint to disk every this many bytes, so that no keep-alive waits for gigabytes of
    # dirty pages (a file's closing fsync included)
    flush_bytes = 256 * 2**20

    def __init__(self, world: int, interval: float = 5.0) -> None:
        from mindspore import ops

        self.world, self.interval = world, interval
        self.all_reduce = ops.AllReduce()
        self._last = time.monotonic()

    def mean(self, loss: float, stop: bool) -> tuple[float, bool]:
        """The ranks' mean loss, and whether any of them asked to stop."""
        mean_loss, asked = self._reduce(loss, float(stop)) / self.world
        return float(mean_loss), bool(asked > 0)

    # rank 0, writing a checkpoint
    def writing(self) -> None:
        """The write starts (the other ranks are in `wait_for_rank0` from now on)."""
        self._last = time.monotonic()

    def tick(self, _nbytes: int = 0) -> None:
        """Between two pieces of the write: a keep-alive if `interval` has passed since the last one."""
        if time.monotonic() - self._last >= self.interval:
            self._reduce(0.0, 0.0)

    def written(self) -> None:
        self._reduce(0.0, 1.0)

    # the other ranks
    def wait_for_rank0(self) -> None:
        """Returns once rank 0 has written its checkpoint (it calls `written`)."""
        while self._reduce(0.0, 0.0)[1] == 0:
            pass

    def _reduce(self, a: float, b: float) -> np.ndarray:
        from mindspore import Tensor

        # one shape for every call: one compiled op
        out = self.all_reduce(Tensor(np.array([a, b], np.float32))).asnumpy()
        self._last = time.monotonic()
        return out
