"""The slow start: the adaptive controller's first climb, doubling the limit per window.

TCP's slow start with HyStart's exit on a rise in delay (see `jorbmp.adaptive`'s module
doc): each level passes after a short window, and the climb ends at the first sign of
queueing (execs clearly slower than at the levels that passed) or of throughput not
growing with the limit. `SlowStart` only judges the levels; the controller moves the
limit and, at the end, hands over to careful probing.
"""

from __future__ import annotations

import math
from typing import Literal

from ._adaptive_noise import Noise
from ._adaptive_tunables import DECISIVE, START_EXECS, WORTH
from ._adaptive_windows import Measurement, Windows

__all__ = ["FAILED", "PASSED", "SlowStart"]

# What an update showed of the level: it passed (double the limit), or it failed
# (queueing, or flat throughput: back to the last level that passed).
PASSED: Literal["passed"] = "passed"
FAILED: Literal["failed"] = "failed"


class SlowStart:
    """Judges each slow-start level from the windows the controller's updates close."""

    __slots__ = ("_level", "_noise", "_windows", "_x", "good", "passed")

    def __init__(self, windows: Windows, noise: Noise, limit: int) -> None:
        self._windows, self._noise = windows, noise
        # The passed windows pooled (their exec time: the reference for queueing), the
        # windows at the level under way, the last passed one's (jobs/s, seconds), and
        # the level it passed at.
        self.passed, self._level = Measurement(), Measurement()
        self._x = (0.0, 0.0)
        self.good = limit

    def update(
        self, now: float, processed: int, exec_seconds: float, sat: bool, limit: int
    ) -> Literal["passed", "failed"] | None:
        """Feed one update at ``limit``; `PASSED` or `FAILED` once the level is judged:
        at the window's close or, queueing clear already, at any update."""
        windows, ref, level = self._windows, self.passed, self._level
        window = windows.feed(now, processed, exec_seconds, sat, limit, quick=True)
        if window is None:
            n, e = windows.open(processed, exec_seconds)
            n, e = n + round(level.execs), e + level.exec_seconds
            if sat and ref.execs > 0 and n >= START_EXECS and self._noise.queued(e / n, n, ref, 2):
                return FAILED
            return None
        n, t, e, noise, df = window
        self._noise.learn_lat_updates(windows.lat_noise, windows.lat_df)
        self._noise.learn_count(noise, df)
        level.add(n, t, e, math.inf)
        if ref.execs > 0:
            n, t, e = round(level.execs), level.seconds, level.exec_seconds
            if self._noise.queued(e / n, n, ref) or self._flat(n / t, t, limit):
                # One window's luck, or queueing: a second window at the level decides.
                return FAILED if level.windows >= 2 else None
            self._noise.learn_lat(ref, n, e)
        ref.add(n, t, e, math.inf)
        self._x, self.good = (n / t, t), limit
        level.clear()
        return PASSED

    def _flat(self, x: float, t: float, limit: int) -> bool:
        """Whether throughput grew clearly less with the limit than the `WORTH` of the
        slots added since the last level that passed (counts at least Poisson-noisy)."""
        (x0, t0), ratio = self._x, limit / self.good
        noise = max(self._noise.count, 1 / x if x > 0 else math.inf)
        sigma = math.sqrt(noise * (1 / t + 1 / t0))
        return x / x0 - 1 < WORTH * (ratio - 1) - DECISIVE * sigma
