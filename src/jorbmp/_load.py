"""The coordinator's load, and the batch scale it calls for (issue 16, item 4).

One coordinator feeds every worker. When it cannot keep up, each message should carry
more jobs: fewer messages per job is what lets a run's capacity grow with load
instead of collapsing. The meter reads, over windows of about `WINDOW_SECONDS`, two
shares of the wall time:

- busy: the event loop thread's own CPU time (``time.thread_time``);
- late: how long the housekeeping timer fired after it was due. A loop that is
  runnable but not running (its machine's cores are all taken, by the workers it
  feeds among others) is as far behind as a busy one, and its CPU time does not say
  so: 256 workers of 5 ms jobs on 2 cores kept the loop's CPU near 40% while its
  ticks came 75% late; scaled batches raised that run's throughput by half.

Their sum is the pressure. Above `HIGH` the scale doubles (up to `MAX_SCALE`); below
`LOW` it halves (down to 1). The gap between the two keeps it from flapping: halving
the scale at most doubles the cost per job of the messages, so a pressure under `LOW`
stays under `HIGH` after it. Backends multiply their batch time by the scale (and
process pools the wait between polls of their sockets); the guided shrink of batches
as a queue drains still keeps the tail short. Results still come back every few
milliseconds of exec time, as at scale 1, so a worker's death re-runs no more
finished work than it would without load.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LoadMeter"]

HIGH = 0.7
LOW = 0.3
MAX_SCALE = 8
# Decisions come from this much wall time of ticks, never from a single tick.
WINDOW_SECONDS = 0.5


class LoadMeter:
    """Pressure on the coordinator's event loop, and the batch scale it calls for.

    `tick(late)` is called from each housekeeping tick, ``late`` being how many
    seconds after its due time the tick ran. ``clock`` and ``cpu`` are injectable (the
    tests step them); ``cpu`` must be the CPU time of the loop's thread.
    """

    __slots__ = ("_cpu", "_last", "_last_cpu", "_w_cpu", "_w_late", "_w_wall", "clock", "cpu",
                 "peak", "pressure", "scale")  # fmt: skip

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.clock, self.cpu = clock, cpu
        self.scale = 1  # batches hold this many times the backend's batch time of work
        self.peak = 1  # the largest scale so far (`RunReport.batch_scale`)
        self.pressure = 0.0  # of the last window
        self._last, self._last_cpu = clock(), cpu()
        self._w_wall = self._w_cpu = self._w_late = 0.0

    def __repr__(self) -> str:
        return f"<LoadMeter scale={self.scale} pressure={self.pressure:.2f}>"

    def tick(self, late: float) -> int:
        """Account the time since the last tick; at the end of a window, choose the
        scale. Returns the scale."""
        now, cpu = self.clock(), self.cpu()
        wall = now - self._last
        if wall <= 0:  # (a clock that did not move: nothing to learn)
            return self.scale
        self._w_wall += wall
        self._w_cpu += max(0.0, cpu - self._last_cpu)
        self._w_late += min(max(0.0, late), wall)
        self._last, self._last_cpu = now, cpu
        if self._w_wall >= WINDOW_SECONDS:
            self.pressure = (self._w_cpu + self._w_late) / self._w_wall
            self._w_wall = self._w_cpu = self._w_late = 0.0
            if self.pressure > HIGH and self.scale < MAX_SCALE:
                self.scale *= 2
                self.peak = max(self.peak, self.scale)
            elif self.pressure < LOW and self.scale > 1:
                self.scale //= 2
        return self.scale
