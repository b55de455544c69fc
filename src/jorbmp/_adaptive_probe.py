"""Careful probing: hill climbing by probes of a neighbour, the settled hold, and drift.

After the slow start, the limit holds at a base level, then probes a neighbour,
``base +- step``, until a sequential test (`jorbmp._adaptive_verdict`) decides which
of the two stays: steps double while probes win, fine steps follow, and once both
neighbours have lost the level is settled and holds between probes, verified when a
neighbour beats it, and left when its throughput drifts (see `jorbmp.adaptive`'s
module doc). `Prober` sees only closed windows; it moves the limit through the
controller's ``set_limit``, which restarts the windows and records the change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ._adaptive_noise import Noise
from ._adaptive_tunables import (
    BASE_WINDOWS,
    DECISIVE,
    DRIFT,
    HOLD_FIRST,
    HOLD_MAX,
    HOLD_PER_PROBE,
    MARGIN,
    STEP_SHARE,
    WORTH,
)
from ._adaptive_verdict import judge, ready
from ._adaptive_windows import Measurement, Window

__all__ = ["Prober"]

# Modes: measuring the base level, a probe of a neighbour, or the base again during a
# probe (its measurement was the less certain one).
_HOLD, _PROBE, _REVISIT = "hold", "probe", "revisit"
# Phases: the slow start (before `Prober.begin`), climbing (steps double as probes
# win), settled (both neighbours lost; holds between probes), verifying (a settled
# level's neighbour won; probing back decides).
_START, _CLIMB, _SETTLED, _VERIFY = "start", "climb", "settled", "verify"
# The incumbent's edge on the bar, per phase: climbing, the two levels are equals;
# settled, the level the limit holds at keeps its place unless the other wins by
# MARGIN; verifying, the benefit of the doubt is the settled level's, which the probe
# returns to.
_EDGE = {_CLIMB: 0.0, _SETTLED: MARGIN, _VERIFY: -MARGIN}


def base_step(level: int) -> int:
    """The fine step at ``level``: `STEP_SHARE` of it, at least 1."""
    return max(1, int(level * STEP_SHARE))


class Prober:
    """The base level, the probe under way, and the phase of the climb."""

    __slots__ = (
        "_backoff",
        "_base",
        "_base_m",
        "_dir",
        "_fails",
        "_hi",
        "_hold_until",
        "_jump",
        "_lo",
        "_looks",
        "_noise",
        "_probe_m",
        "_probe_since",
        "_probe_time",
        "_ref",
        "_set",
        "_target",
        "mode",
        "phase",
        "step",
    )

    def __init__(
        self, lo: int, hi: int, limit: int, noise: Noise, set_limit: Callable[[float, int], None]
    ) -> None:
        self._lo, self._hi, self._noise, self._set = lo, hi, noise, set_limit
        self.mode, self.phase = _HOLD, _START
        self._base = limit
        # The base level's measurement (its held windows, older ones fading) and the
        # probe's (all its windows).
        self._base_m, self._probe_m = Measurement(), Measurement()
        self._probe_since = self._probe_time = 0.0  # when the probe began; the last's length
        self._target, self._looks = limit, 0  # the probe's level; windows judged
        self._jump = False  # the probe under way is a gradient jump (below)
        self.step, self._dir = max(1, limit), 1  # the first probe doubles
        self._fails = 0  # base-step probes lost in a row (2: both sides lost)
        self._backoff = HOLD_FIRST
        self._hold_until = -math.inf
        self._ref = 0.0  # the throughput of the level when it settled

    def begin(self, now: float, limit: int, good: int, failed: bool) -> None:
        """The slow start ended at ``limit``: back at ``good``, the last level that
        passed (``failed``), or at the bound, careful probing starts; its first probe
        is the level that failed."""
        self.phase, self.mode, self._dir = _CLIMB, _HOLD, 1
        self._base_m.clear()
        self._hold_until = now
        if failed:
            self._base = good
            self.step = max(base_step(self._base), limit - self._base)
            self._set(now, self._base)
        else:
            self._base, self.step = limit, base_step(limit)

    def window(self, now: float, window: Window) -> None:
        """A window closed at the current limit: the base's, the probe's, or the base's
        again during a probe."""
        if self.mode == _HOLD:
            self._held(now, *window)
        elif self.mode == _PROBE:
            self._probed(now, *window)
        else:
            self._revisited(now, *window)

    def _held(self, now: float, n: int, t: float, e: float, noise: float, df: int) -> None:
        x, base = n / t, self._base_m
        self._noise.assume_poisson(x, df)
        drift = max(DRIFT, DECISIVE * math.sqrt(self._noise.count / t))
        if self.phase != _CLIMB and self._ref > 0 and abs(x / self._ref - 1) > drift:
            # The level's throughput moved: what was measured here is stale.
            self.phase, self._fails, self._backoff = _CLIMB, 0, HOLD_FIRST
            self._dir = 1 if x > self._ref else -1  # less throughput: less capacity
            self.step, self._hold_until = base_step(self._base), now
            base.clear()
        else:
            self._noise.learn(base, n, t, e, noise, df)
        base.add(n, t, e, BASE_WINDOWS * t)
        if now >= self._hold_until:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        self._jump = False
        base = self._base_m
        if self.phase == _CLIMB and self._dir < 0 and base.execs > 0 and self._noise.queueing(base):
            # Execs queue for something: go down by the share of their time spent
            # queueing (Envoy's gradient), as one big step.
            lean = math.ceil(self._base * self._noise.lat_min / base.latency)
            if self._base - lean > self.step:
                self.step, self._jump = self._base - lean, True
        target = min(self._hi, max(self._lo, self._base + self._dir * self.step))
        self.mode = _HOLD
        if target == self._base:  # at a bound: that side has lost
            if self._lo == self._hi:
                self._hold_until = math.inf
            else:
                self._lost(now)
            return
        if not ready(base, self._base, target, self._noise.count):
            self._hold_until = now  # hold on until the base is measured well enough
            return
        self._noise.note_latency(base)
        self.mode, self._target, self._looks = _PROBE, target, 0
        self._probe_m.clear()
        self._probe_since = now
        self._set(now, target)

    def _probed(self, now: float, n: int, t: float, e: float, noise: float, df: int) -> None:
        self._noise.learn(self._probe_m, n, t, e, noise, df)
        self._probe_m.add(n, t, e, math.inf)
        self._judge(now)

    def _revisited(self, now: float, n: int, t: float, e: float, noise: float, df: int) -> None:
        """A window back at the base during a probe: the base's measurement was the
        less certain of the two (a probe measured on cannot make up for a short base)."""
        self._noise.learn(self._base_m, n, t, e, noise, df)
        self._base_m.add(n, t, e, BASE_WINDOWS * t)
        self._judge(now)

    def _judge(self, now: float) -> None:
        """Decide the probe, or measure on: at the probe's level, or at the base's when
        the base is the less certain."""
        target, up = self._target, self._dir > 0
        self._looks += 1
        edge = _EDGE[self.phase]
        bar = WORTH + edge if up else WORTH - edge
        verdict = judge(
            self._base_m, self._probe_m, self._base, target, bar, up, self._noise.count, self._looks
        )
        if not verdict.decided:
            if verdict.measure < 0:
                self.mode = _REVISIT
            elif verdict.measure > 0:
                self.mode = _PROBE
            self._set(now, self._base if self.mode == _REVISIT else target)
            return
        self._noise.note_latency(self._probe_m)
        self._probe_time = now - self._probe_since
        # Unclear after PROBE_CAP windows, a big step goes by the measurement (the
        # levels are far apart, and fine steps follow); a base step keeps the base.
        big = self.step > base_step(self._base) and self.phase == _CLIMB
        if verdict.wins and (verdict.shown or verdict.fine or big):
            self._set(now, target)
            self._moved(now, verdict.shown)
            return
        # Lost, or not shown to win within PROBE_CAP: the base keeps its place.
        self.mode = _HOLD
        self._set(now, self._base)
        step = base_step(self._base)
        if self.step > step:  # overshot: retry this side with the base step
            self.step, self._hold_until = step, now
        else:
            self._lost(now, self._base_m.rate)

    def _moved(self, now: float, decisive: bool) -> None:
        """The probe's level won (``decisive``: beyond the noise, not merely close to
        the bar): it becomes the base, and probing goes on from it."""
        self._base = self._target
        self._base_m.take(self._probe_m)
        self._fails = 0
        if self.phase == _VERIFY:  # back where it settled: the move was noise
            self.phase, self.mode = _SETTLED, _HOLD
            self._dir, self.step = -self._dir, base_step(self._base)
            self._hold_until = now + self._hold()
            return
        if self.phase == _SETTLED and decisive:  # the world changed: climb
            self.phase = _CLIMB
        if self.phase == _SETTLED:  # most likely noise: probe back at once
            self.phase = _VERIFY
            self._dir, self.step = -self._dir, base_step(self._base)
        elif self._jump or not decisive:  # fine steps from here
            self.step = base_step(self._base)
        else:  # momentum: double the step, at most doubling or halving the limit
            cap = self._base if self._dir > 0 else max(1, self._base // 2)
            self.step = min(cap, 2 * self.step)
            self._backoff = HOLD_FIRST
        self._start_probe(now)

    def _lost(self, now: float, xb: float = 0.0) -> None:
        """A base-step probe on this side lost: try the other side, or settle (at
        ``xb`` jobs/s, the reference for drift)."""
        self._dir, self.step = -self._dir, base_step(self._base)
        self._hold_until = now
        if self.phase == _VERIFY:  # the settled level lost to its neighbour: climb on
            self.phase, self._fails, self._backoff = _CLIMB, 0, HOLD_FIRST
            return
        self._fails += 1
        if self._fails >= 2:
            self._fails, self.phase = 0, _SETTLED
            if xb > 0:
                self._ref = xb
            self._hold_until = now + self._hold()
            self._backoff = min(HOLD_MAX, 2 * self._backoff)

    def _hold(self) -> float:
        """Seconds a settled level holds before its next probe: the backoff, and at
        least HOLD_PER_PROBE times the last probe, so probing takes a bounded share."""
        return max(self._backoff, HOLD_PER_PROBE * self._probe_time)
