"""The slow start: the adaptive controller's first climb, doubling the limit per window.

TCP's slow start with HyStart's exit on a rise in delay (see `jorbmp.adaptive`'s module
doc): each level passes after a short window, and the climb ends at the first sign of
queueing (execs clearly slower than at the levels that passed) or of throughput not
growing with the limit. `SlowStart` only judges the levels; the controller moves the
limit and, at the end, hands over to careful probing.

A level's exec time is that of its own execs: the ones started at it. The execs in
flight when the limit doubled (as many as the old limit: it was saturated) are the
first to finish after the change, and a first-come-first-served service (a semaphore,
a remote pool of workers) serves them at the old level's pace: their exec time says
nothing of the queue the new level makes, and a window of them let a service that
serves 4 pass 8 and 16. So the first ``old limit`` completions after a change are
skipped (the update that crosses them split in proportion). The added slots' own
execs may still have waited little (the old ones were about to finish); those started
after them wait behind them. A level passes once its added slots' worth of own execs
are clear of queueing (`START_CLEAR`), or once its whole limit's worth are not clearly
queued; where exec times hold (the common case), the first is as soon as before.
"""

from __future__ import annotations

import math
from typing import Literal

from ._adaptive_noise import Noise
from ._adaptive_tunables import DECISIVE, START_CLEAR, START_EXECS, WORTH
from ._adaptive_windows import Measurement, Windows

__all__ = ["FAILED", "PASSED", "SlowStart"]

# What an update showed of the level: it passed (double the limit), or it failed
# (queueing, or flat throughput: back to the last level that passed).
PASSED: Literal["passed"] = "passed"
FAILED: Literal["failed"] = "failed"


class SlowStart:
    """Judges each slow-start level from the windows the controller's updates close."""

    __slots__ = (
        "_due",
        "_fresh",
        "_last",
        "_level",
        "_looks",
        "_mark",
        "_noise",
        "_windows",
        "_x",
        "good",
        "passed",
    )

    def __init__(self, windows: Windows, noise: Noise, limit: int) -> None:
        self._windows, self._noise = windows, noise
        # The passed levels' execs pooled (their exec time: the reference for queueing),
        # the windows at the level under way, the last passed one's (jobs/s, seconds),
        # and the level it passed at.
        self.passed, self._level = Measurement(), Measurement()
        self._x = (0.0, 0.0)
        self.good = limit
        # The level's own execs: from the count `_mark` on, finished execs started at
        # it (None: from the first update; at the start none are in flight); `_fresh`
        # the counters where they began, once reached; `_last`, the last update's.
        self._mark: int | None = None
        self._fresh: tuple[int, float] | None = None
        self._last = (0, 0.0)
        self._looks = 0
        # A window closed at the level, to be judged (its exec-time spread), once enough
        # of the level's own execs have finished; looks taken at the level.
        self._due: tuple[float, int] | None = None

    def update(
        self, now: float, processed: int, exec_seconds: float, sat: bool, limit: int
    ) -> Literal["passed", "failed"] | None:
        """Feed one update at ``limit``; `PASSED` or `FAILED` once the level is judged:
        after a window has closed at it, on its own execs (see the module doc) or,
        queueing clear already, at any update."""
        windows, ref, level = self._windows, self.passed, self._level
        n_own, e_own = self._own(processed, exec_seconds)
        window = windows.feed(now, processed, exec_seconds, sat, limit, quick=True)
        if window is not None:
            n, t, e, noise, df = window
            self._noise.learn_count(noise, df)
            level.add(n, t, e, math.inf)
            self._due = (windows.lat_noise, windows.lat_df)
        if ref.execs == 0:  # the first level: its window timed the first execs
            if self._due is None:
                return None
            return self._pass(processed, limit, round(level.execs), level.exec_seconds)
        if not sat:
            return None
        yardstick, lat = self._noise, e_own / n_own if n_own else 0.0
        if self._due is None or n_own < max(1, limit - self.good):
            if n_own >= START_EXECS and yardstick.queued(lat, n_own, ref, 2):
                return FAILED
            return None
        if yardstick.queued(lat, n_own, ref) or self._flat(level.rate, level.seconds, limit):
            # One look's luck, or queueing: a look after the next window decides.
            self._due, self._looks = None, self._looks + 1
            return FAILED if self._looks >= 2 else None
        if n_own < limit and not yardstick.clear(lat, n_own, ref, START_CLEAR):
            return None  # neither clear yet: more of the level's own execs will tell
        yardstick.learn_lat(ref, n_own, e_own)
        return self._pass(processed, limit, n_own, e_own)

    def _pass(self, processed: int, limit: int, n_own: int, e_own: float) -> Literal["passed"]:
        """The level passed: its own execs join the reference, and the next level's
        own execs are those after the ``limit`` in flight now."""
        level, due = self._level, self._due
        if due is not None:
            # The spread of exec times over a window's updates is learnt only from a
            # level that passed: one whose execs queue mixes the fast execs started
            # before it with its own slow ones, and would widen the yardstick judging it.
            self._noise.learn_lat_updates(*due)
        self.passed.add(n_own, level.seconds, e_own, math.inf)
        self._x, self.good = (level.rate, level.seconds), limit
        level.clear()
        self._looks, self._due = 0, None
        # The limit doubles at this update: the ``limit`` execs in flight (saturated)
        # finish before those started at the next level (first come first served).
        self._mark, self._fresh = processed + limit, None
        return PASSED

    def _own(self, processed: int, exec_seconds: float) -> tuple[int, float]:
        """Execs started at the level under way that have finished, and their exec
        seconds: those after the first `_mark` (the update that crosses it split
        in proportion)."""
        last_n, last_e = self._last
        self._last = (processed, exec_seconds)
        if self._mark is None or processed < last_n:  # the start, or counters went back
            self._mark, self._fresh = processed, (processed, exec_seconds)
        fresh, mark = self._fresh, self._mark
        if fresh is None:
            if processed < mark:
                return 0, 0.0
            share = (mark - last_n) / (processed - last_n) if processed > last_n else 1.0
            fresh = self._fresh = (mark, last_e + max(0.0, share) * (exec_seconds - last_e))
        return processed - fresh[0], max(0.0, exec_seconds - fresh[1])

    def _flat(self, x: float, t: float, limit: int) -> bool:
        """Whether throughput grew clearly less with the limit than the `WORTH` of the
        slots added since the last level that passed (counts at least Poisson-noisy)."""
        (x0, t0), ratio = self._x, limit / self.good
        noise = max(self._noise.count, 1 / x if x > 0 else math.inf)
        sigma = math.sqrt(noise * (1 / t + 1 / t0))
        return x / x0 - 1 < WORTH * (ratio - 1) - DECISIVE * sigma
