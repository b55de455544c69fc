"""Jobs waiting out a not-before time (a retry delay, a ``Retry-After``), off every queue.

One heap and one timer for all of them, however many: a job waiting here holds no
worker, no slot and no timer of its own. The wait follows the event loop's clock
(``time.monotonic``), so a step of the wall clock (NTP, a suspended laptop's catch-up)
neither stretches nor cuts it. `Job.not_before` keeps the wall-clock time too (seconds
since the epoch), as it is stored on the job and must mean the same after a stop and a
resume in another process: only a job resumed from a checkpoint is timed from it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from .run import Job


class DelayQueue:
    """Holds jobs until their delay has passed, then hands each to ``release``.

    `charge` adds to each lane's ``metrics.delay_wait`` the time during which it had
    jobs held here while the whole run had nothing else to do (no job queued or
    executing in any state): the run was held up by that back-off (an API's
    Retry-After) alone, as the run report's hint says."""

    def __init__(self, release: Callable[[Any, Job[Any]], None]) -> None:
        self.release = release
        self.held: dict[Any, int] = {}  # lane -> its jobs held here now
        self.charged_at: float | None = None  # loop time of the last `charge`
        self.heap: list[tuple[float, int, Any, Job[Any]]] = []  # (loop time due, ...)
        self.seq = itertools.count()  # ties: first in, first out
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # loop time the timer is set for

    def __len__(self) -> int:
        return len(self.heap)

    def add(self, lane: Any, job: Job[Any], delay: float | None = None) -> None:
        """Hold ``job`` (of ``lane``) for ``delay`` seconds, or, without one, until
        ``job.not_before`` (wall time: a job resumed from a checkpoint)."""
        loop = asyncio.get_running_loop()
        if delay is None:
            wall = job.not_before or 0.0
            # A hand-edited checkpoint's inf or nan: due now, not never.
            delay = wall - time.time() if math.isfinite(wall) else 0.0
        at = loop.time() + max(0.0, delay)
        heapq.heappush(self.heap, (at, next(self.seq), lane, job))
        self.held[lane] = self.held.get(lane, 0) + 1
        if self.timer is None or at < self.timer_at:
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.heap:
            return
        self.timer_at = at = self.heap[0][0]
        self.timer = loop.call_at(at, self._due, loop)

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        now = loop.time()
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, lane, job = heapq.heappop(heap)
            held = self.held[lane] = self.held[lane] - 1
            if not held:
                del self.held[lane]
            self.release(lane, job)
        self._arm(loop)

    def close(self) -> None:
        """Stop the timer (the run is over); the jobs keep their ``not_before``."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.heap.clear()
        self.held.clear()

    def charge(self, now: float, lanes: Iterable[Any]) -> None:
        """Called on each housekeeping tick (``now``: loop time; ``lanes``: every
        `jorbmp._lane.Lane`): the time since the last call counts as delay wait for
        each lane with jobs held, if no lane has a job queued or executing."""
        since, self.charged_at = self.charged_at, now
        if since is None or not self.held:
            return
        for lane in lanes:
            backend = lane.backend
            if lane.queue or (backend is not None and backend.executing()):
                return
        for lane in self.held:
            lane.metrics.delay_wait += now - since
