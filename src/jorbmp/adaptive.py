"""Adaptive concurrency: a state's limit chosen at run time, within [min, max], for throughput.

A user writes ``State(..., concurrency=AdaptiveConcurrency(1, 64))``; the coordinator
keeps one `ConcurrencyController` per such state, feeds it the state's cumulative
counters about every 0.1 s, and runs at most ``controller.limit`` execs of it at once.
The controller knows nothing of the engine: it sees counts, seconds and a flag, and
reads time only from the clock it is given (tests step a fake one).

The algorithm: hill climbing on measured throughput, as the .NET thread pool and
Netflix's concurrency-limits do it, with the latency signal of Vegas and Envoy's
gradient folded in by Little's law (saturated, throughput = limit / latency), and
every comparison a statistical one, against the measured noise:

- **Windows, not samples.** A measurement is a window of consecutive saturated updates,
  at least `WINDOW_UPDATES` of them, lasting at least `WINDOW_LATENCIES` mean exec
  times and long enough for `WINDOW_EXECS` execs at the limit. Its length comes from
  the previous window's exec time, never from its own count (a window that ended once
  it held enough execs would end early when they came fast: a rate biased upwards).
  The first window only measures the exec time. A window starts `SETTLE_LATENCIES`
  mean exec times after a limit change (execs started under the old limit finish
  first). An update with ``saturated=False`` (an empty queue, a rate limit) ends the
  window unused and never changes the limit: without demand, low throughput says
  nothing of capacity.
- **Measured noise.** The noise is the relative variance of throughput over one
  second (a t-second measurement has noise / t): Poisson counts have 1 / rate, a
  wobbling service more. It is estimated from the spread of the updates within each
  window (or, with one-exec updates, of windows against their level's others) and
  its running mean is the yardstick of every decision. A level's measurement is the
  sum of its windows (`BASE_WINDOWS` windows' worth at most, older ones fading).
- **Probes decided by the worth of the extra slots.** The limit holds at a level, then
  tries a neighbour, ``level +- step``. Which of the two stays is decided by the
  *worth* of the slots between them: the throughput they add, as a share of what they
  would add if latency held, ``(x_hi/x_lo - 1) / (hi/lo - 1)``: 1 where latency
  holds, 0 on a plateau, below 0 under contention. The higher level wins at `WORTH`
  (0.5) and above. Once settled (below), the level held keeps its place unless the
  other wins by `MARGIN`.
- **As long as the noise needs.** A probe starts once the base is measured well
  enough for it (`BASE_RESOLUTION`), and is measured until its worth lies `CONFIDENT`
  standard deviations from the bar (`DECISIVE` in its first `PROBE_WINDOWS`
  windows), or until the wrong choice could cost no more than `RESOLUTION` of the
  throughput. Where the base is the less certain of the two, the limit goes back to
  it to measure it more (a probe measured on cannot make up for a short base). After
  `PROBE_CAP` windows, an unclear base step keeps the base; an unclear big step goes
  by the measurement, and fine steps follow.
- **Slow start.** The first climb doubles the limit after a short window at each
  level (TCP's slow start, with HyStart's exit on a rise in delay): once `START_EXECS`
  execs, and as many as the limit, have finished since the change, and one mean exec
  time has passed, saturated throughout. A level is judged on its own execs, those
  started at it: the execs in flight at the change finish first, and a first-come-
  first-served service serves them at the old level's pace (`_adaptive_start`). It
  passes once its added slots' worth of them are clear of queueing (`START_CLEAR`),
  or all its slots' worth are not clearly queued. It ends at the first sign of
  queueing: its own execs taking clearly (`QUEUEING`, and beyond their noise, learnt
  from the updates of levels that passed) longer than at the levels before, at two
  looks (twice that clearly: at any update), or throughput not growing with the
  limit. The limit then goes back to the last level that passed, and careful probing
  starts there, its first probe the level that failed (the windows were short: their
  verdict may be their noise's). With 1 s execs, windows of `WINDOW_EXECS` execs at a
  limit of 2 take 10 s each.
- **Fast growth, then fine steps.** The first careful probe doubles the limit, and
  each probe that wins clearly doubles the step in the same direction (2, 4, 8, 16).
  A lost probe returns to its level and retries that side with the base step
  (`STEP_SHARE` of the limit, at least 1), then the other side. Going down while a
  level's execs take clearly (`QUEUEING`, and beyond their noise) longer than the
  least mean exec time measured, the probe goes straight to ``level * least / now``
  (Envoy's gradient: the queueing share of the slots goes).
- **Settled.** Once both neighbours have lost, the limit holds for `HOLD_FIRST`
  seconds, doubling per round up to `HOLD_MAX`, and at least `HOLD_PER_PROBE` times
  the last probe (noisy probes are long; probing stays a small share of the time),
  then probes one base step either side: a settled limit moves by one step, and back.
  A neighbour that wins is verified by probing back at once, the benefit of the doubt
  going to the settled level; one that beats the settled level twice means the world
  changed, and climbing starts again.
- **Following change.** A settled level whose throughput moves by more than `DRIFT`
  (or `DECISIVE` times a window's noise) from what it was when it settled (a remote
  service lost capacity) ends the holding: probing starts at once, first in the
  direction the throughput moved. A rise in capacity shows at the next probe up.

Every update is O(1): a few sums and comparisons (the history of changes is bounded).

The parts, one module each, with the controller here tying them together::

    update(processed, exec_seconds, saturated)
      -> Windows (_adaptive_windows: cut the counters into windows, sum them)
      -> SlowStart (_adaptive_start)  until the first climb ends, then
         Prober (_adaptive_probe: hold, probe, settle, drift), deciding by
         judge / ready (_adaptive_verdict: the sequential tests)
      -> set the limit (restart the windows, record the change in the history)

Both deciders measure against `Noise` (_adaptive_noise); every tunable is in
_adaptive_tunables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._adaptive_noise import Noise
from ._adaptive_probe import Prober
from ._adaptive_start import FAILED, PASSED, SlowStart
from ._adaptive_tunables import HISTORY_MAX
from ._adaptive_windows import Windows

__all__ = ["AdaptiveConcurrency", "ConcurrencyController", "LimitHistory"]


def _check_int(state_name: str, what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"state {state_name!r}: AdaptiveConcurrency {what} must be an int, got {value!r}"
        )
    return value


@dataclass(frozen=True, init=False)
class AdaptiveConcurrency:
    """A state's concurrency chosen at run time within [min, max], for throughput.

    ``State(..., concurrency=AdaptiveConcurrency(1, 64))``; ``max`` is required.
    """

    min: int
    max: int

    def __init__(self, min: int = 1, max: int | None = None) -> None:
        if max is None:
            raise TypeError("AdaptiveConcurrency needs max, e.g. AdaptiveConcurrency(1, 64)")
        object.__setattr__(self, "min", min)
        object.__setattr__(self, "max", max)

    def check(self, state_name: str) -> None:
        """``ValueError`` naming the state unless 1 <= min <= max, both ints."""
        lo = _check_int(state_name, "min", self.min)
        hi = _check_int(state_name, "max", self.max)
        if lo < 1:
            raise ValueError(
                f"state {state_name!r}: AdaptiveConcurrency min must be >= 1, got {lo}"
            )
        if hi < lo:
            raise ValueError(
                f"state {state_name!r}: AdaptiveConcurrency max must be >= min, "
                f"got min={lo}, max={hi}"
            )


@dataclass(frozen=True)
class LimitHistory:
    """A controller's limit over a run, for the report: the least and greatest limit it
    set, the last, and ``(time, limit)`` at its changes (the first entry is the start;
    at most about `HISTORY_MAX`, older ones thinned)."""

    min: int
    max: int
    final: int
    changes: tuple[tuple[float, int], ...]


class _History:
    """The limit's least, greatest and changes so far: `LimitHistory`'s live side.

    At most about `HISTORY_MAX` changes are kept (the first is the start): past that,
    the older half is thinned, so a long run's record stays bounded and O(1) a change."""

    __slots__ = ("_changes", "_seen")

    def __init__(self, now: float, limit: int) -> None:
        self._changes: list[tuple[float, int]] = [(now, limit)]
        self._seen = [limit, limit]

    def record(self, now: float, limit: int) -> None:
        seen = self._seen
        seen[0], seen[1] = min(seen[0], limit), max(seen[1], limit)
        changes = self._changes
        changes.append((now, limit))
        if len(changes) > HISTORY_MAX:  # thin the older half: every other one goes
            half = len(changes) // 2
            changes[1:half] = changes[1:half:2]

    def snapshot(self, limit: int) -> LimitHistory:
        return LimitHistory(self._seen[0], self._seen[1], limit, tuple(self._changes))


class ConcurrencyController:
    """One state's concurrency limit, chosen for throughput within [spec.min, spec.max].

    ``update`` takes the state's cumulative finished execs and their wall seconds, and
    whether jobs were waiting for one of its slots, and returns the limit (see the
    module doc). The limit starts at ``initial`` (clamped into the bounds) or at
    ``min(max, max(min, 2))``: some parallelism at once, doubling from there.
    """

    __slots__ = (
        "_clock",
        "_hi",
        "_history",
        "_limit",
        "_lo",
        "_noise",
        "_probe",
        "_start",
        "_windows",
    )

    def __init__(
        self,
        spec: AdaptiveConcurrency,
        clock: Callable[[], float] = time.monotonic,
        initial: int | None = None,
    ) -> None:
        spec.check("<adaptive>")  # the state checks it first, naming itself
        self._lo, self._hi, self._clock = spec.min, spec.max, clock
        start = min(spec.max, max(spec.min, 2)) if initial is None else int(initial)
        self._limit = min(self._hi, max(self._lo, start))
        self._windows = Windows()
        self._noise = Noise()
        # The slow start until the first climb ends (None after), then the prober.
        self._start: SlowStart | None = SlowStart(self._windows, self._noise, self._limit)
        self._probe = Prober(self._lo, self._hi, self._limit, self._noise, self._set)
        self._history = _History(clock(), self._limit)

    @property
    def limit(self) -> int:
        """The current limit, always within [min, max]."""
        return self._limit

    @property
    def history(self) -> LimitHistory:
        """A snapshot of the limit's range and changes so far, for the run report."""
        return self._history.snapshot(self._limit)

    def update(self, processed: int, exec_seconds: float, saturated: bool) -> int:
        """Take the state's cumulative counters (see the class doc); return the limit."""
        now = self._clock()
        if self._start is not None:
            self._slow_start(self._start, now, processed, exec_seconds, saturated)
            return self._limit
        window = self._windows.feed(now, processed, exec_seconds, saturated, self._limit)
        if window is not None:
            self._probe.window(now, window)
        return self._limit

    def __repr__(self) -> str:
        probe = self._probe
        return (
            f"<ConcurrencyController limit={self._limit} in [{self._lo}, {self._hi}] "
            f"{probe.mode} {probe.phase} step={probe.step} "
            f"noise={math.sqrt(self._noise.count):.3f}>"
        )

    def _slow_start(
        self, start: SlowStart, now: float, processed: int, exec_seconds: float, sat: bool
    ) -> None:
        """Double the limit at each level that passes, up to the bound; at a failed
        level or the bound, hand over to careful probing."""
        verdict = start.update(now, processed, exec_seconds, sat, self._limit)
        if verdict is None:
            return
        if verdict == PASSED:
            target = min(self._hi, 2 * self._limit)
            if target != self._limit:
                # The window that closed began the next at this update: at the new
                # level, with no settling (its length waits for execs started there).
                self._set(now, target, settle=False)
                return
        self._start = None
        if start.passed.execs > 0:  # exec time without queueing, for the gradient
            self._noise.note_least(start.passed.latency)
        self._probe.begin(now, self._limit, start.good, failed=verdict == FAILED)

    def _set(self, now: float, limit: int, settle: bool = True) -> None:
        """Move the limit: the next window waits for it to settle (``settle``), and the
        change is recorded."""
        if limit == self._limit:
            return
        self._limit = limit
        if settle:
            self._windows.restart(now)
        self._history.record(now, limit)
