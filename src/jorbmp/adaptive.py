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
  time has passed, saturated throughout. It ends at the first sign of queueing: execs
  taking clearly (`QUEUEING`, and beyond their noise, learnt from the updates) longer
  than at the levels before, over two windows at the level (twice that clearly: at
  any update), or throughput not growing with the limit. The limit then goes back to
  the last level that passed, and careful probing starts there, its first probe the
  level that failed (the windows were short: their verdict may be their noise's).
  With 1 s execs, windows of `WINDOW_EXECS` execs at a limit of 2 take 10 s each.
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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveConcurrency", "ConcurrencyController", "LimitHistory"]

# Execs at the limit a window lasts for, and its least length in mean exec times
# (execs overlapping its ends count for a small share of it): a window's count is not
# one exec's luck. More: slower decisions. And the fewest updates in a window: with
# three, a window brings its own estimate of the noise (with two degrees of freedom).
WINDOW_EXECS = 20
WINDOW_LATENCIES = 2.0
WINDOW_UPDATES = 3
# Updates holding fewer execs than this on average mostly show their rounding: such a
# window brings no estimate of the noise (and until one does, counts are assumed as
# noisy as Poisson ones, 1 / rate).
UPDATE_EXECS = 3
# Execs the first window, which only measures the exec time, waits for (its count
# decides its end, so its rate would be biased).
FIRST_EXECS = 5
# Mean exec times after a limit change before a window starts.
SETTLE_LATENCIES = 1.0
# Slow start (the first climb): a level passes once START_EXECS execs, and as many as
# the limit, have finished since the change, over START_UPDATES updates at least (two:
# a window then brings an estimate of the noise) and one mean exec time. Fewer: faster
# growth, more overshoot when queueing shows late.
START_EXECS = 4
START_UPDATES = 2
# A level's measurement keeps BASE_WINDOWS windows' worth of seconds at most (older
# ones fade in proportion): more, less noise; fewer, fresher after a change.
BASE_WINDOWS = 30
# A probe is decided once its worth lies CONFIDENT standard deviations beyond the bar
# (DECISIVE in its first PROBE_WINDOWS windows: early looks need more), or once the
# wrong choice could cost at most RESOLUTION of the throughput (at CONFIDENT
# deviations), or after PROBE_CAP windows. It starts once the base's own share of the
# deviation of worth is at most BASE_RESOLUTION (or the base has PROBE_CAP windows):
# a probe compared against one noisy window of the base would decide on its luck.
# The limit measures where the variance is SWITCH times the other side's.
PROBE_WINDOWS = 3
PROBE_CAP = 25
DECISIVE = 2.5
CONFIDENT = 2.0
RESOLUTION = 0.05
BASE_RESOLUTION = 0.14
SWITCH = 2.0
# The noise of throughput (relative variance over one second) assumed at first (5%
# per 0.1 s) and weighted as NOISE_PRIOR_DF degrees of freedom; the least ever assumed
# (2% per 0.1 s: counts are never that exact); that of a mean exec time per exec at
# first (a CV of 0.3). The running estimates are means of what the windows bring until
# NOISE_WEIGHT is the weight of each (more: follows change sooner, wobbles more).
NOISE_FIRST = 0.05**2 * 0.1
NOISE_PRIOR_DF = 1
MIN_NOISE = 0.02**2 * 0.1
LAT_NOISE_FIRST = 0.3**2
NOISE_WEIGHT = 0.05
# The worth of the extra slots (throughput gained over what they would add at
# constant latency) at which the higher level wins: below it, slots cost more latency
# than they bring; above it, they are worth their keep. MARGIN is the incumbent's edge.
WORTH = 0.5
MARGIN = 0.2
# A level's exec time above the least seen by this share (and by DECISIVE times its
# noise) means execs queue for something: a climbing limit then probes down by the
# queueing share at once. LAT_MIN_FORGET: the share of the gap to a measurement's
# mean exec time the least closes per measurement, so a least measured long ago (a
# faster service then) does not stay forever.
QUEUEING = 0.2
LAT_MIN_FORGET = 0.02
# The base step as a share of the limit: probes change the limit by ~10%, enough to see
# over the noise, small enough that a settled limit stays within a step of its level.
STEP_SHARE = 0.1
# Seconds a settled limit holds before probing again: the first hold, and the most it
# doubles to; and at least HOLD_PER_PROBE times the last probe's length (noisy counts
# make probes long: probing then still takes at most a third of the time). Longer
# holds cost less throughput in probes, and see a rise later.
HOLD_FIRST = 0.5
HOLD_MAX = 2.0
HOLD_PER_PROBE = 2.0
# A settled level's throughput moving by more than this share (or DECISIVE times a
# window's noise, if more) means the world changed.
DRIFT = 0.3
# Limit changes kept in `LimitHistory.changes`; older ones are thinned, every other one
# dropped, when there are more.
HISTORY_MAX = 200

# Modes: measuring the base level, a probe of a neighbour, or the base again during a
# probe (its measurement was the less certain one).
_HOLD, _PROBE, _REVISIT = "hold", "probe", "revisit"
# Phases: the slow start (the first climb, see the module doc), climbing (steps double
# as probes win), settled (both neighbours lost; holds between probes), verifying (a
# settled level's neighbour won; probing back decides).
_START, _CLIMB, _SETTLED, _VERIFY = "start", "climb", "settled", "verify"


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


class _Sums:
    """Execs, wall seconds and exec seconds over some windows: a level's measurement.

    ``cap`` seconds at most: beyond, all three shrink in proportion (older windows
    fade), so a level long held stays current and every update stays O(1)."""

    __slots__ = ("exec_seconds", "execs", "seconds", "windows")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.execs = 0.0
        self.seconds = 0.0
        self.exec_seconds = 0.0
        self.windows = 0

    def add(self, execs: int, seconds: float, exec_seconds: float, cap: float) -> None:
        self.execs += execs
        self.seconds += seconds
        self.exec_seconds += exec_seconds
        self.windows += 1
        if self.seconds > cap > 0:
            f = cap / self.seconds
            self.execs, self.seconds, self.exec_seconds = (
                self.execs * f,
                cap,
                self.exec_seconds * f,
            )

    def take(self, other: _Sums) -> None:
        self.execs, self.seconds = other.execs, other.seconds
        self.exec_seconds, self.windows = other.exec_seconds, other.windows

    @property
    def rate(self) -> float:
        return self.execs / self.seconds if self.seconds > 0 else 0.0

    @property
    def latency(self) -> float:
        return self.exec_seconds / self.execs if self.execs > 0 else 0.0


class _Windows:
    """Cuts a state's cumulative counters into measurement windows (see the module doc).

    Within a window it also sums each update's share of the execs, so a closing
    window brings an estimate of the noise from its own updates: an update of ``dt``
    seconds whose count varies by ``noise * rate**2 * dt`` (Poisson counts: noise
    = 1 / rate; a wobbling rate: its variance times the update's length)."""

    __slots__ = (
        "_k",
        "_last",
        "_lat_k",
        "_lat_spread",
        "_settle_until",
        "_spread",
        "_start",
        "lat_df",
        "lat_noise",
        "latency",
    )

    def __init__(self) -> None:
        self._start: tuple[float, int, float] | None = None  # time, processed, exec seconds
        self._last = (0.0, 0, 0.0)  # the window's last update: time, processed, exec s
        self._k = 0  # updates in the window
        self._spread = 0.0  # the sum over them of execs**2 / seconds
        # Updates with execs, and the sum over them of exec seconds**2 / execs: each
        # update's mean exec time varies by (per exec variance) / its execs.
        self._lat_k, self._lat_spread = 0, 0.0
        self._settle_until = -math.inf
        self.latency = 0.0  # mean exec seconds of the last window (0: none yet)
        # The last window's estimate of the relative variance of one exec's time, and
        # its degrees of freedom (0: none, fewer than two updates with execs).
        self.lat_noise, self.lat_df = 0.0, 0

    def restart(self, now: float) -> None:
        """The limit changed at ``now``: the next window starts once it has settled."""
        self._start = None
        self._settle_until = now + SETTLE_LATENCIES * self.latency

    def _begin(self, now: float, processed: int, exec_seconds: float) -> None:
        self._start = self._last = (now, processed, exec_seconds)
        self._k, self._spread = 0, 0.0
        self._lat_k, self._lat_spread = 0, 0.0

    def open(self, processed: int, exec_seconds: float) -> tuple[int, float]:
        """Execs finished in the window under way and their exec seconds (0 without one)."""
        if self._start is None:
            return 0, 0.0
        return processed - self._start[1], max(0.0, exec_seconds - self._start[2])

    def feed(
        self,
        now: float,
        processed: int,
        exec_seconds: float,
        saturated: bool,
        limit: int,
        quick: bool = False,
    ) -> tuple[int, float, float, float, int] | None:
        """``(execs, seconds, exec seconds, noise, its degrees of freedom)`` of the window
        closing at this update, if one does (noise 0 with none: a one-update window).
        ``quick``: slow-start windows (see `START_EXECS`), the first one returned too."""
        start = self._start
        if not saturated or now < self._settle_until:
            self._start = None
            return None
        if start is None:
            self._begin(now, processed, exec_seconds)
            return None
        t0, n0, e0 = start
        n, t = processed - n0, now - t0
        t1, n1, e1 = self._last
        if n < 0 or t < 0 or processed < n1 or now <= t1:  # counters or clock went back
            self._begin(now, processed, exec_seconds)
            return None
        self._k += 1
        self._spread += (processed - n1) ** 2 / (now - t1)
        if processed > n1:
            self._lat_k += 1
            self._lat_spread += max(0.0, exec_seconds - e1) ** 2 / (processed - n1)
        self._last = (now, processed, exec_seconds)
        # A window's length comes from the last window's exec time, not from its own
        # count: one that closed once it held enough execs would close early when its
        # execs came fast, and measure a rate biased upwards (most at low limits).
        e = max(0.0, exec_seconds - e0)
        self._exec_noise(n, e)
        if self.latency <= 0:  # no exec time known yet: a first, short window measures it
            if n < FIRST_EXECS or (quick and self._k < START_UPDATES):
                return None
            self.latency = e / n
            self._begin(now, processed, exec_seconds)
            # Its count decided its end: only the slow start, which asks no unbiased
            # rate of it, takes it as a window.
            return (n, t, e, 0.0, 0) if quick else None
        if quick:
            short = n < max(START_EXECS, limit) or t < self.latency or self._k < START_UPDATES
        else:
            short = n == 0 or t < self.latency * max(WINDOW_LATENCIES, WINDOW_EXECS / limit)
            short = short or self._k < WINDOW_UPDATES
        if short:
            return None
        self.latency = e / n
        # sum((dn - r dt)**2 / dt) = spread - 2 r n + r**2 t, about noise * r**2 * (k - 1)
        # Updates of a few execs each mostly show their rounding: none then.
        r, df = n / t, self._k - 1 if n >= UPDATE_EXECS * self._k else 0
        noise = max(0.0, self._spread - 2 * r * n + r * r * t) / (r * r * df) if df else 0.0
        self._begin(now, processed, exec_seconds)  # windows follow each other
        return n, t, e, noise, df

    def _exec_noise(self, n: int, e: float) -> None:
        """The exec-time noise of the window so far, from its updates' mean exec times:
        sum(n_i (l_i - l)**2) = spread - e**2 / n, about (variance) * l**2 * (k - 1)."""
        k = self._lat_k
        if k < 2 or n <= 0 or e <= 0:
            self.lat_noise, self.lat_df = 0.0, 0
            return
        self.lat_noise = max(0.0, self._lat_spread - e * e / n) / ((k - 1) * (e / n) ** 2)
        self.lat_df = k - 1


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
        "_base_m",
        "_changes",
        "_clock",
        "_dir",
        "_fails",
        "_good",
        "_hi",
        "_hold_until",
        "_jump",
        "_lat_min",
        "_lat_noise",
        "_lat_samples",
        "_level_m",
        "_limit",
        "_lo",
        "_looks",
        "_mode",
        "_noise",
        "_phase",
        "_probe_m",
        "_probe_since",
        "_probe_time",
        "_ref",
        "_samples",
        "_seen",
        "_start_m",
        "_start_x",
        "_step",
        "_target",
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
        # The base level's measurement (its held windows, older ones fading) and the
        # probe's (all its windows).
        self._base_m, self._probe_m = _Sums(), _Sums()
        self._probe_since = self._probe_time = 0.0  # when the probe began; the last's length
        self._target, self._looks = self._limit, 0  # the probe's level; windows judged
        # Noise: the relative variance of throughput measured over one second (a window
        # of t seconds has noise / t), and of mean exec time over one exec; running
        # estimates from each window (its own updates, or against its level's others).
        self._noise, self._lat_noise = NOISE_FIRST, LAT_NOISE_FIRST
        self._samples = 0  # degrees of freedom the throughput noise has learnt from
        self._lat_samples = 0  # those the exec-time noise has learnt from updates
        # The least mean exec time of a level's measurement (forgotten slowly): exec
        # time without queueing.
        self._lat_min = math.inf
        self._jump = False  # the probe under way is a gradient jump (below)
        self._step, self._dir = max(1, self._limit), 1  # the first probe doubles
        self._fails = 0  # base-step probes lost in a row (2: both sides lost)
        self._phase = _START
        # The slow start: its passed windows pooled (their exec time: the reference for
        # queueing), the last one's (jobs/s, seconds), and the level it passed at.
        self._start_m, self._level_m = _Sums(), _Sums()  # and the windows at this level
        self._start_x = (0.0, 0.0)
        self._good = self._limit
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
        if self._phase == _START:
            self._slow_start(now, processed, exec_seconds, saturated)
            return self._limit
        window = self._windows.feed(now, processed, exec_seconds, saturated, self._limit)
        if window is not None:
            if self._mode == _HOLD:
                self._held(now, *window)
            elif self._mode == _PROBE:
                self._probed(now, *window)
            else:
                self._revisited(now, *window)
        return self._limit

    def __repr__(self) -> str:
        return (
            f"<ConcurrencyController limit={self._limit} in [{self._lo}, {self._hi}] "
            f"{self._mode} {self._phase} step={self._step} noise={math.sqrt(self._noise):.3f}>"
        )

    # -- the slow start --

    def _slow_start(self, now: float, processed: int, exec_seconds: float, sat: bool) -> None:
        """Double the limit at each window that passes; end at the first sign of
        queueing, seen at the window's close or, clear already, at any update."""
        windows, ref, level = self._windows, self._start_m, self._level_m
        window = windows.feed(now, processed, exec_seconds, sat, self._limit, quick=True)
        if window is None:
            n, e = windows.open(processed, exec_seconds)
            n, e = n + round(level.execs), e + level.exec_seconds
            if sat and ref.execs > 0 and n >= START_EXECS and self._queued(e / n, n, ref, 2):
                self._end_start(now, failed=True)
            return
        n, t, e, noise, df = window
        if windows.lat_df:  # from its updates' spread: fair whether or not execs queue
            self._lat_samples += windows.lat_df
            w = max(NOISE_WEIGHT, windows.lat_df / (self._lat_samples + NOISE_PRIOR_DF))
            self._lat_noise = (1 - w) * self._lat_noise + w * windows.lat_noise
        self._learn_count_noise(noise, df)
        level.add(n, t, e, math.inf)
        if ref.execs > 0:
            n, t, e = round(level.execs), level.seconds, level.exec_seconds
            if self._queued(e / n, n, ref) or self._flat(n / t, t):
                # One window's luck, or queueing: a second window at the level decides.
                if level.windows >= 2:
                    self._end_start(now, failed=True)
                return
            self._learn_lat_noise(ref, n, e)
        ref.add(n, t, e, math.inf)
        self._start_x, self._good = (n / t, t), self._limit
        level.clear()
        target = min(self._hi, 2 * self._limit)
        if target == self._limit:
            self._end_start(now, failed=False)
            return
        # The window that closed began the next at this update: at the new level, with
        # no settling (its length waits for execs started at the new level).
        self._base = target
        self._set(now, target, settle=False)

    def _queued(self, latency: float, n: float, ref: _Sums, z: float = 1.0) -> bool:
        """Whether a mean exec time over ``n`` execs is clearly (`QUEUEING`, and beyond
        ``z`` times `DECISIVE` times the noise of both) above the reference's."""
        return self._excess(latency, n, ref.latency, ref.execs, z)

    def _excess(self, latency: float, n: float, low: float, low_n: float, z: float) -> bool:
        excess = latency / low - 1 if low > 0 else 0.0
        spread = z * DECISIVE * math.sqrt(self._lat_noise * (1 / n + 1 / low_n))
        return excess > max(QUEUEING, spread)

    def _flat(self, x: float, t: float) -> bool:
        """Whether throughput grew clearly less with the limit than the `WORTH` of the
        slots added since the last level that passed (counts at least Poisson-noisy)."""
        (x0, t0), ratio = self._start_x, self._limit / self._good
        noise = max(self._noise, 1 / x if x > 0 else math.inf)
        sigma = math.sqrt(noise * (1 / t + 1 / t0))
        return x / x0 - 1 < WORTH * (ratio - 1) - DECISIVE * sigma

    def _end_start(self, now: float, failed: bool) -> None:
        """End the slow start: back at the last level that passed (``failed``) or at the
        bound, careful probing starts; its first probe is the level that failed."""
        self._phase, self._mode, self._dir = _CLIMB, _HOLD, 1
        self._base_m.clear()
        self._hold_until = now
        if self._start_m.execs > 0:  # exec time without queueing, for the gradient
            self._lat_min = min(self._lat_min, self._start_m.latency)
        if failed:
            self._base, failed_at = self._good, self._limit
            self._step = max(self._base_step(self._base), failed_at - self._base)
            self._set(now, self._base)
        else:
            self._base, self._step = self._limit, self._base_step(self._limit)

    # -- decisions (each at the close of a window) --

    def _held(self, now: float, n: int, t: float, e: float, noise: float, df: int) -> None:
        x, base = n / t, self._base_m
        if self._samples == 0 and df == 0:
            # Nothing learnt yet, nor from this window (updates of one exec or none):
            # until windows tell, counts are as noisy as Poisson ones.
            self._noise = max(self._noise, 1 / x)
        drift = max(DRIFT, DECISIVE * math.sqrt(self._noise / t))
        if self._phase != _CLIMB and self._ref > 0 and abs(x / self._ref - 1) > drift:
            # The level's throughput moved: what was measured here is stale.
            self._phase, self._fails, self._backoff = _CLIMB, 0, HOLD_FIRST
            self._dir = 1 if x > self._ref else -1  # less throughput: less capacity
            self._step, self._hold_until = self._base_step(self._base), now
            base.clear()
        else:
            self._learn_noise(base, n, t, e, noise, df)
        base.add(n, t, e, BASE_WINDOWS * t)
        if now >= self._hold_until:
            self._start_probe(now)

    def _learn_noise(self, m: _Sums, n: int, t: float, e: float, noise: float, df: int) -> None:
        """Update the noise estimates from a window: from its own updates (``noise``
        with ``df`` degrees of freedom), else against the other windows of its level
        ``m`` (their squared relative difference has the variance of both, noise / t +
        noise / m.seconds; for exec times, per exec). The first estimates are plain
        means with the prior as one sample; later ones a running average."""
        if df == 0 and m.windows >= 2:
            noise, df = (n / t / m.rate - 1) ** 2 / (1 / t + 1 / m.seconds), 1
        self._learn_count_noise(noise, df)
        self._learn_lat_noise(m, n, e)

    def _learn_count_noise(self, noise: float, df: int) -> None:
        if df:
            self._samples += df
            w = max(NOISE_WEIGHT, df / (self._samples + NOISE_PRIOR_DF))
            self._noise = max(MIN_NOISE, (1 - w) * self._noise + w * noise)

    def _learn_lat_noise(self, m: _Sums, n: int, e: float) -> None:
        if m.windows >= 2:
            lat_var = (e / n / m.latency - 1) ** 2 / (1 / n + 1 / m.execs)
            w = max(NOISE_WEIGHT, 1 / (m.windows + 1))
            self._lat_noise = (1 - w) * self._lat_noise + w * lat_var

    def _start_probe(self, now: float) -> None:
        self._jump = False
        base = self._base_m
        if self._phase == _CLIMB and self._dir < 0 and base.execs > 0 and self._queueing():
            # Execs queue for something: go down by the share of their time spent
            # queueing (Envoy's gradient), as one big step.
            lean = math.ceil(self._base * self._lat_min / base.latency)
            if self._base - lean > self._step:
                self._step, self._jump = self._base - lean, True
        target = min(self._hi, max(self._lo, self._base + self._dir * self._step))
        self._mode = _HOLD
        if target == self._base:  # at a bound: that side has lost
            if self._lo == self._hi:
                self._hold_until = math.inf
            else:
                self._lost(now)
            return
        # The base must be measured well enough for this comparison first (or for
        # PROBE_CAP windows, where the noise allows no better): hold on meanwhile.
        lo, hi = min(self._base, target), max(self._base, target)
        sigma = math.sqrt(self._noise / max(base.seconds, 1e-12)) * lo / (hi - lo)
        if sigma > BASE_RESOLUTION and base.windows < PROBE_CAP:
            self._hold_until = now
            return
        self._note_latency(base)
        self._mode, self._target, self._looks = _PROBE, target, 0
        self._probe_m.clear()
        self._probe_since = now
        self._set(now, target)

    def _queueing(self) -> bool:
        """Whether the base level's execs take clearly longer than the least seen."""
        base, low = self._base_m, self._lat_min
        if not low < math.inf:
            return False
        return self._excess(base.latency, base.execs, low, base.execs, 1.0)

    def _note_latency(self, m: _Sums) -> None:
        lat, low = m.latency, self._lat_min
        if lat > 0:
            self._lat_min = lat if lat < low else low + LAT_MIN_FORGET * (lat - low)

    def _probed(self, now: float, n: int, t: float, e: float, noise: float, df: int) -> None:
        self._learn_noise(self._probe_m, n, t, e, noise, df)
        self._probe_m.add(n, t, e, math.inf)
        self._judge(now)

    def _revisited(self, now: float, n: int, t: float, e: float, noise: float, df: int) -> None:
        """A window back at the base during a probe: the base's measurement was the
        less certain of the two (a probe measured on cannot make up for a short base)."""
        self._learn_noise(self._base_m, n, t, e, noise, df)
        self._base_m.add(n, t, e, BASE_WINDOWS * t)
        self._judge(now)

    def _judge(self, now: float) -> None:
        """Compare the probe's level with the base, and decide, or measure on: at the
        probe's level, or at the base's when the base is the less certain."""
        probe, base, target = self._probe_m, self._base_m, self._target
        self._looks += 1
        xb, xp = base.rate, probe.rate
        lo, hi = min(self._base, target), max(self._base, target)
        x_lo, x_hi = (xb, xp) if self._base < target else (xp, xb)
        worth = (x_hi / x_lo - 1) / (hi / lo - 1)
        # Climbing, the two levels are equals; settled, the level the limit holds at
        # keeps its place unless the other wins by MARGIN; verifying, the benefit of
        # the doubt is the settled level's, which the probe returns to.
        edge = {_CLIMB: 0.0, _SETTLED: MARGIN, _VERIFY: -MARGIN}[self._phase]
        bar = WORTH + edge if self._dir > 0 else WORTH - edge
        # The standard deviation of ``worth``, from the noise and both measurements'
        # lengths. Measure on until the result is clear of the bar (by DECISIVE before
        # PROBE_WINDOWS, CONFIDENT after), or precise enough that it matters little
        # which way it goes, or PROBE_CAP windows long.
        var_p = self._noise / probe.seconds
        var_b = self._noise / base.seconds
        spread = math.sqrt(var_p + var_b)  # of the throughput ratio
        sigma, clear = spread * lo / (hi - lo), abs(worth - bar)
        # The most the wrong choice could cost, in throughput, at CONFIDENT sigmas.
        fine = (clear + CONFIDENT * sigma) * (hi - lo) / lo <= RESOLUTION
        z = DECISIVE if probe.windows < PROBE_WINDOWS else CONFIDENT
        if clear < z * sigma and not fine and self._looks < PROBE_CAP:
            # Measure where the uncertainty is: the probe's level, or back at the base
            # (moving only once one side holds SWITCH times the other's: every move
            # costs a settling time).
            if var_b > SWITCH * var_p:
                self._mode = _REVISIT
            elif var_p > SWITCH * var_b:
                self._mode = _PROBE
            self._set(now, self._base if self._mode == _REVISIT else target)
            return
        self._note_latency(probe)
        self._probe_time = now - self._probe_since
        wins = worth >= bar if self._dir > 0 else worth <= bar
        shown = clear >= CONFIDENT * sigma
        # Unclear after PROBE_CAP windows, a big step goes by the measurement (the
        # levels are far apart, and fine steps follow); a base step keeps the base.
        big = self._step > self._base_step(self._base) and self._phase == _CLIMB
        if wins and (shown or fine or big):
            self._set(now, target)
            self._moved(now, shown)
            return
        # Lost, or not shown to win within PROBE_CAP: the base keeps its place.
        self._mode = _HOLD
        self._set(now, self._base)
        base_step = self._base_step(self._base)
        if self._step > base_step:  # overshot: retry this side with the base step
            self._step, self._hold_until = base_step, now
        else:
            self._lost(now, xb)

    def _moved(self, now: float, decisive: bool) -> None:
        """The probe's level won (``decisive``: beyond the noise, not merely close to
        the bar): it becomes the base, and probing goes on from it."""
        self._base = self._limit
        self._base_m.take(self._probe_m)
        self._fails = 0
        if self._phase == _VERIFY:  # back where it settled: the move was noise
            self._phase, self._mode = _SETTLED, _HOLD
            self._dir, self._step = -self._dir, self._base_step(self._base)
            self._hold_until = now + self._hold()
            return
        if self._phase == _SETTLED and decisive:  # the world changed: climb
            self._phase = _CLIMB
        if self._phase == _SETTLED:  # most likely noise: probe back at once
            self._phase = _VERIFY
            self._dir, self._step = -self._dir, self._base_step(self._base)
        elif self._jump or not decisive:  # fine steps from here
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
            self._hold_until = now + self._hold()
            self._backoff = min(HOLD_MAX, 2 * self._backoff)

    def _hold(self) -> float:
        """Seconds a settled level holds before its next probe: the backoff, and at
        least HOLD_PER_PROBE times the last probe, so probing takes a bounded share."""
        return max(self._backoff, HOLD_PER_PROBE * self._probe_time)

    def _base_step(self, level: int) -> int:
        return max(1, int(level * STEP_SHARE))

    def _set(self, now: float, limit: int, settle: bool = True) -> None:
        if limit == self._limit:
            return
        self._limit = limit
        if settle:
            self._windows.restart(now)
        seen = self._seen
        seen[0], seen[1] = min(seen[0], limit), max(seen[1], limit)
        changes = self._changes
        changes.append((now, limit))
        if len(changes) > HISTORY_MAX:  # thin the older half: every other one goes
            half = len(changes) // 2
            changes[1:half] = changes[1:half:2]
