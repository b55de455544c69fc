"""Adaptive concurrency: a state's limit chosen at run time, within [min, max], for throughput.

A user writes ``State(..., concurrency=AdaptiveConcurrency(1, 64))``; the coordinator
keeps one `ConcurrencyController` per such state, feeds it the state's cumulative
counters about every 0.1 s, and runs at most ``controller.limit`` execs of it at once.
The controller knows nothing of the engine: it sees counts, seconds and a flag, and
reads time only from the clock it is given (tests step a fake one).

The algorithm: hill climbing on measured throughput, as the .NET thread pool and
Netflix's concurrency-limits do it, with the latency signal of Vegas and Envoy's
gradient folded in by Little's law (saturated, throughput = limit / latency):

- **Windows, not samples.** A measurement is a window of consecutive saturated updates
  holding at least ``max(WINDOW_EXECS, WINDOW_PER_SLOT * limit)`` finished execs and at
  least `WINDOW_LATENCIES` mean exec times. It starts `SETTLE_LATENCIES` mean exec times
  after a limit change (execs started under the old limit finish first). An update
  with ``saturated=False`` (an empty queue, a rate limit) ends the window unused and
  never changes the limit: without demand, low throughput says nothing of capacity.
- **Probes decided by the worth of the extra slots.** The limit holds at a level (its
  last `BASE_WINDOWS` windows are its measurement), then tries a neighbour,
  ``level +- step``. Which of the two stays is decided by the *worth* of the slots
  between them: the throughput they add, as a share of what they would add if latency
  held, ``(x_hi/x_lo - 1) / (hi/lo - 1)``: 1 where latency holds, 0 on a plateau,
  below 0 under contention. The higher level wins at `WORTH` (0.5) and above: slots
  that bring less than half their keep cost more latency than they give. Once settled
  (below), the level held keeps its place unless the other wins by `MARGIN`.
- **Noise-aware length.** A probe of the base step is measured for `PROBE_WINDOWS`
  windows; sooner when its result is `DECISIVE` standard deviations from the bar (the
  noise is a running estimate from the held windows), longer, up to `PROBE_MAX`, when
  within one. A probe of a bigger step is decided by its first window.
- **Fast growth, then fine steps.** The first probe doubles the limit, and each probe
  that wins doubles the step in the same direction (slow start: 2, 4, 8, 16). A lost
  probe returns to its level and retries that side with the base step (`STEP_SHARE`
  of the limit, at least 1), then the other side. Going down while execs take
  `QUEUEING` longer than the least mean exec time seen, the probe goes straight to
  ``level * least / now`` (Envoy's gradient: the queueing share of the slots goes).
- **Settled.** Once both neighbours have lost, the limit holds for `HOLD_FIRST`
  seconds, doubling per round up to `HOLD_MAX`, then probes one base step either side:
  a settled limit moves by one step, and back. A neighbour that wins by less than
  `DECISIVE` is verified by probing back at once, the benefit of the doubt going to
  the settled level; one that wins decisively, or beats the settled level twice, means
  the world changed, and climbing starts again.
- **Following change.** A settled level whose throughput moves by more than `DRIFT`
  from what it was when it settled (a remote service lost capacity) ends the holding:
  probing starts at once, first in the direction the throughput moved. A rise in
  capacity shows at the next probe up, within about `HOLD_MAX` seconds.

Every update is O(1): a few sums and comparisons (the history of changes is bounded).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveConcurrency", "ConcurrencyController", "LimitHistory"]

# The fewest finished execs in a window, and per slot of the limit: each slot turns
# over about twice, so a window's count is not one exec's luck. More: slower decisions.
WINDOW_EXECS = 20
WINDOW_PER_SLOT = 2
# The least length of a window in mean exec times (execs overlapping its ends count
# for a small share of it), and how long after a change of the limit a window starts.
WINDOW_LATENCIES = 2.0
SETTLE_LATENCIES = 1.0
# Windows of held throughput kept as a level's measurement (more: less noise, staler).
BASE_WINDOWS = 6
# Windows a probe at the base step is measured for (a probe of a bigger step changes
# throughput by far more than the noise: its first window decides it), and the most: a
# result within one standard deviation of the bar is measured on, up to PROBE_MAX.
PROBE_WINDOWS = 3
PROBE_MAX = 5
# A probe is decided before PROBE_WINDOWS when its result lies this many standard
# deviations beyond the bar: a probe that clearly loses costs one window.
DECISIVE = 3.0
# The noise of a window's throughput (relative standard deviation): assumed at first,
# the least assumed ever (counts are never that exact), and the weight of each held
# window in its running estimate.
NOISE_FIRST = 0.05
MIN_NOISE = 0.02
NOISE_WEIGHT = 0.2
# The worth of the extra slots (throughput gained over what they would add at
# constant latency) at which the higher level wins: below it, slots cost more latency
# than they bring; above it, they are worth their keep. MARGIN is the incumbent's edge.
WORTH = 0.5
MARGIN = 0.2
# Exec time above the least seen by this share means execs queue for something: a
# climbing limit then probes down by the queueing share at once. LAT_MIN_FORGET: the
# share of the gap to a window's mean exec time the least closes per window, so a
# least measured long ago (a faster service then) does not stay forever.
QUEUEING = 0.2
LAT_MIN_FORGET = 0.01
# The base step as a share of the limit: probes change the limit by ~10%, enough to see
# over the noise, small enough that a settled limit stays within a step of its level.
STEP_SHARE = 0.1
# Seconds a settled limit holds before probing again: the first hold, and the most it
# doubles to. Longer holds cost less throughput in probes, and see a rise later.
HOLD_FIRST = 0.5
HOLD_MAX = 2.0
# A settled level's throughput moving by more than this share (or DECISIVE times the
# noise, if more) means the world changed.
DRIFT = 0.3
# Limit changes kept in `LimitHistory.changes`; older ones are thinned, every other one
# dropped, when there are more.
HISTORY_MAX = 200

# Modes: measuring the base level, or a probe of a neighbour.
_HOLD, _PROBE = "hold", "probe"
# Phases: climbing (steps double as probes win), settled (both neighbours lost; holds
# between probes), verifying (a settled level's neighbour won; probing back decides).
_CLIMB, _SETTLED, _VERIFY = "climb", "settled", "verify"


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


class _Windows:
    """Cuts a state's cumulative counters into measurement windows (see the module doc)."""

    __slots__ = ("_settle_until", "_start", "latency")

    def __init__(self) -> None:
        self._start: tuple[float, int, float] | None = None  # time, processed, exec seconds
        self._settle_until = -math.inf
        self.latency = 0.0  # mean exec seconds of the last window (0: none yet)

    def restart(self, now: float) -> None:
        """The limit changed at ``now``: the next window starts once it has settled."""
        self._start = None
        self._settle_until = now + SETTLE_LATENCIES * self.latency

    def feed(
        self, now: float, processed: int, exec_seconds: float, saturated: bool, limit: int
    ) -> tuple[int, float] | None:
        """``(execs, seconds)`` of the window that closes at this update, if one does."""
        start = self._start
        if not saturated or now < self._settle_until:
            self._start = None
            return None
        if start is None:
            self._start = (now, processed, exec_seconds)
            return None
        t0, n0, e0 = start
        n, t = processed - n0, now - t0
        if n < 0 or t < 0:  # counters or clock went back: measure afresh
            self._start = (now, processed, exec_seconds)
            return None
        if (
            n < max(WINDOW_EXECS, WINDOW_PER_SLOT * limit)
            or t <= 0
            or t < WINDOW_LATENCIES * self.latency
        ):
            return None
        self.latency = max(0.0, exec_seconds - e0) / n
        self._start = (now, processed, exec_seconds)  # windows follow each other
        return n, t


class ConcurrencyController:
    """One state's concurrency limit, chosen for throughput within [spec.min, spec.max].

    ``update`` takes the state's cumulative finished execs and their wall seconds, and
    whether jobs were waiting for one of its slots, and returns the limit (see the
    module doc). The limit starts at ``initial`` (clamped into the bounds) or at
    ``min(max, max(min, 2))``: some parallelism at once, doubling from there.
    """

    __slots__ = (
        "_backoff",
        "_base",
        "_base_lat",
        "_base_sums",
        "_changes",
        "_clock",
        "_dir",
        "_fails",
        "_hi",
        "_hold_until",
        "_jump",
        "_lat_min",
        "_limit",
        "_lo",
        "_mode",
        "_noise",
        "_phase",
        "_probe_windows",
        "_ref",
        "_seen",
        "_step",
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
        self._limit = self._base = min(self._hi, max(self._lo, start))
        self._mode = _HOLD
        self._windows = _Windows()
        # The base level's last windows, [(execs, seconds)], and the probe's windows.
        self._base_sums: deque[tuple[int, float]] = deque(maxlen=BASE_WINDOWS)
        self._probe_windows: list[tuple[int, float]] = []
        # The relative standard deviation of a held window's throughput (a running
        # estimate, from each held window against the level's others).
        self._noise = NOISE_FIRST
        # Mean exec seconds at the base level (recent windows), and the least of any
        # window (forgotten slowly): exec time without queueing.
        self._base_lat = 0.0
        self._jump = False  # the probe under way is a gradient jump (below)
        self._lat_min = math.inf
        self._step, self._dir = max(1, self._limit), 1  # the first probe doubles
        self._fails = 0  # base-step probes lost in a row (2: both sides lost)
        self._phase = _CLIMB
        self._backoff = HOLD_FIRST
        self._hold_until = -math.inf
        self._ref = 0.0  # the throughput of the level when it settled
        now = clock()
        self._changes: list[tuple[float, int]] = [(now, self._limit)]
        self._seen = [self._limit, self._limit]

    @property
    def limit(self) -> int:
        """The current limit, always within [min, max]."""
        return self._limit

    @property
    def history(self) -> LimitHistory:
        """A snapshot of the limit's range and changes so far, for the run report."""
        return LimitHistory(self._seen[0], self._seen[1], self._limit, tuple(self._changes))

    def update(self, processed: int, exec_seconds: float, saturated: bool) -> int:
        """Take the state's cumulative counters (see the class doc); return the limit."""
        now = self._clock()
        window = self._windows.feed(now, processed, exec_seconds, saturated, self._limit)
        if window is not None:
            lat, low = self._windows.latency, self._lat_min
            self._lat_min = lat if lat < low else low + LAT_MIN_FORGET * (lat - low)
            if self._mode == _HOLD:
                self._held(now, *window)
            else:
                self._probed(now, *window)
        return self._limit

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyController limit={self._limit} in [{self._lo}, {self._hi}] "
            f"{self._mode} {self._phase} step={self._step}>"
        )

    # -- decisions (each at the close of a window) --

    def _held(self, now: float, n: int, t: float) -> None:
        x = n / t
        drift = max(DRIFT, DECISIVE * self._noise)
        if self._phase != _CLIMB and self._ref > 0 and abs(x / self._ref - 1) > drift:
            # The level's throughput moved: what was measured here is stale.
            self._phase, self._fails, self._backoff = _CLIMB, 0, HOLD_FIRST
            self._dir = 1 if x > self._ref else -1  # less throughput: less capacity
            self._step, self._hold_until = self._base_step(self._base), now
            self._base_sums.clear()
        elif len(self._base_sums) >= 2:
            sums = self._base_sums
            xb = sum(w[0] for w in sums) / sum(w[1] for w in sums)
            var = (x / xb - 1) ** 2 * len(sums) / (len(sums) + 1)
            noise = math.sqrt((1 - NOISE_WEIGHT) * self._noise**2 + NOISE_WEIGHT * var)
            self._noise = max(MIN_NOISE, noise)
        lat = self._windows.latency
        self._base_lat = lat if len(self._base_sums) == 0 else (self._base_lat + lat) / 2
        self._base_sums.append((n, t))
        if now >= self._hold_until:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        self._jump = False
        if (
            self._phase == _CLIMB
            and self._dir < 0
            and self._base_lat > (1 + QUEUEING) * self._lat_min > 0
        ):
            # Execs queue for something: go down by the share of their time spent
            # queueing (Envoy's gradient), as one big step that one window decides.
            lean = math.ceil(self._base * self._lat_min / self._base_lat)
            if self._base - lean > self._step:
                self._step, self._jump = self._base - lean, True
        target = min(self._hi, max(self._lo, self._base + self._dir * self._step))
        if target == self._base:  # at a bound: that side has lost
            self._mode = _HOLD
            if self._lo == self._hi:
                self._hold_until = math.inf
            else:
                self._lost(now)
            return
        self._mode = _PROBE
        self._probe_windows = []
        self._set(now, target)

    def _probed(self, now: float, n: int, t: float) -> None:
        windows = self._probe_windows
        windows.append((n, t))
        sums = self._base_sums
        xb = sum(w[0] for w in sums) / sum(w[1] for w in sums)
        xp = sum(w[0] for w in windows) / sum(w[1] for w in windows)
        lo, hi = min(self._base, self._limit), max(self._base, self._limit)
        x_lo, x_hi = (xb, xp) if self._base < self._limit else (xp, xb)
        worth = (x_hi / x_lo - 1) / (hi / lo - 1)
        # Climbing, the two levels are equals; settled, the level the limit holds at
        # keeps its place unless the other wins by MARGIN; verifying, the benefit of
        # the doubt is the settled level's, which the probe returns to.
        edge = {_CLIMB: 0.0, _SETTLED: MARGIN, _VERIFY: -MARGIN}[self._phase]
        bar = WORTH + edge if self._dir > 0 else WORTH - edge
        # The standard deviation of ``worth`` from the windows' noise: decide once the
        # result is clear of the bar, early when it is far beyond it, or at the most.
        k = len(windows)
        sigma = self._noise * math.sqrt(1 / k + 1 / len(sums)) * lo / (hi - lo)
        clear = abs(worth - bar)
        if self._step > self._base_step(self._base):
            pass  # a big step: its first window decides (the truth is rarely near the bar)
        elif clear < DECISIVE * sigma and (k < PROBE_WINDOWS or (clear < sigma and k < PROBE_MAX)):
            return
        if worth >= bar if self._dir > 0 else worth <= bar:
            self._moved(now, clear >= DECISIVE * sigma)
        else:
            self._mode = _HOLD
            self._set(now, self._base)
            base_step = self._base_step(self._base)
            if self._step > base_step:  # overshot: retry this side with the base step
                self._step, self._hold_until = base_step, now
            else:
                self._lost(now, xb)

    def _moved(self, now: float, decisive: bool) -> None:
        """The probe's level won (``decisive``: far beyond the noise): it becomes the
        base, and probing goes on from it."""
        self._base = self._limit
        self._base_sums.clear()
        self._base_sums.extend(self._probe_windows)
        self._base_lat = self._windows.latency
        self._fails = 0
        if self._phase == _VERIFY:  # back where it settled: the move was noise
            self._phase, self._mode = _SETTLED, _HOLD
            self._dir, self._step = -self._dir, self._base_step(self._base)
            self._hold_until = now + self._backoff
            return
        if self._phase == _SETTLED and decisive:  # the world changed: climb
            self._phase = _CLIMB
        if self._phase == _SETTLED:  # most likely noise: probe back at once
            self._phase = _VERIFY
            self._dir, self._step = -self._dir, self._base_step(self._base)
        elif self._jump:  # it landed where the queueing said: fine steps from here
            self._step = self._base_step(self._base)
        else:  # momentum: double the step, at most doubling or halving the limit
            cap = self._base if self._dir > 0 else max(1, self._base // 2)
            self._step = min(cap, 2 * self._step)
            self._backoff = HOLD_FIRST
        self._start_probe(now)

    def _lost(self, now: float, xb: float = 0.0) -> None:
        """A base-step probe on this side lost: try the other side, or settle."""
        self._dir, self._step = -self._dir, self._base_step(self._base)
        self._hold_until = now
        if self._phase == _VERIFY:  # the settled level lost to its neighbour: climb on
            self._phase, self._fails, self._backoff = _CLIMB, 0, HOLD_FIRST
            return
        self._fails += 1
        if self._fails >= 2:
            self._fails, self._phase = 0, _SETTLED
            if xb > 0:
                self._ref = xb
            self._hold_until = now + self._backoff
            self._backoff = min(HOLD_MAX, 2 * self._backoff)

    def _base_step(self, level: int) -> int:
        return max(1, int(level * STEP_SHARE))

    def _set(self, now: float, limit: int) -> None:
        if limit == self._limit:
            return
        self._limit = limit
        self._windows.restart(now)
        seen = self._seen
        seen[0], seen[1] = min(seen[0], limit), max(seen[1], limit)
        changes = self._changes
        changes.append((now, limit))
        if len(changes) > HISTORY_MAX:  # thin the older half: every other one goes
            half = len(changes) // 2
            changes[1:half] = changes[1:half:2]
