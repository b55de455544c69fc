"""Jobs waiting out a not-before time (a retry delay, a ``Retry-After``), off every queue.

One heap and one timer for all of them, however many: a job waiting here holds no
worker, no slot and no timer of its own. The time is wall-clock (seconds since the
epoch, `Job.not_before`) because it is stored on the job and must mean the same
after a stop and a resume in another process.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

from .run import Job


class DelayQueue:
    """Holds jobs until their ``not_before`` passes, then hands each to ``release``."""

    def __init__(self, release: Callable[[Any, Job[Any]], None]) -> None:
        self.release = release
        self.heap: list[tuple[float, int, Any, Job[Any]]] = []
        self.seq = itertools.count()  # ties: first in, first out
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # wall time the timer is set for

    def __len__(self) -> int:
        return len(self.heap)

    def add(self, lane: Any, job: Job[Any]) -> None:
        """Hold ``job`` (of ``lane``) until ``job.not_before``."""
        at = job.not_before or 0.0
        if not math.isfinite(at):  # a hand-edited checkpoint: due now, not never
            at = 0.0
        heapq.heappush(self.heap, (at, next(self.seq), lane, job))
        if self.timer is None or at < self.timer_at:
            self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.heap:
            return
        at = self.heap[0][0]
        loop = asyncio.get_running_loop()
        self.timer_at = at
        self.timer = loop.call_at(loop.time() + max(0.0, at - time.time()), self._due)

    def _due(self) -> None:
        self.timer = None
        now = time.time()
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, lane, job = heapq.heappop(heap)
            self.release(lane, job)
        self._arm()

    def close(self) -> None:
        """Stop the timer (the run is over); the jobs keep their ``not_before``."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.heap.clear()
