"""Probes as sequential tests: is a probed level worth its extra slots, and is it clear?

The *worth* of the slots between two levels is the throughput they add as a share of
what they would add if latency held, ``(x_hi/x_lo - 1) / (hi/lo - 1)``: 1 where latency
holds, 0 on a plateau, below 0 under contention (see `jorbmp.adaptive`'s module doc).
These functions only compute: `ready` says whether the base is measured well enough
to start a probe, `judge` whether a probe under way is decided, and which side to
measure on if not. The prober acts on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._adaptive_tunables import (
    BASE_RESOLUTION,
    CONFIDENT,
    DECISIVE,
    PROBE_CAP,
    PROBE_WINDOWS,
    RESOLUTION,
    SWITCH,
)
from ._adaptive_windows import Measurement

__all__ = ["Verdict", "judge", "ready"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A probe's standing after a look at it.

    ``decided`` False: measure on, at the base (``measure`` -1), the probe (+1), or
    where the limit is (0). Else ``wins`` (the probed level clears the bar in the
    probe's direction), ``shown`` (by `CONFIDENT` deviations) and ``fine`` (the wrong
    choice would cost at most `RESOLUTION` of the throughput)."""

    decided: bool
    measure: int
    wins: bool
    shown: bool
    fine: bool


def ready(base_m: Measurement, base: int, target: int, noise: float) -> bool:
    """Whether the base is measured well enough to compare ``target`` with it: its own
    share of the deviation of worth at most `BASE_RESOLUTION`, or `PROBE_CAP` windows
    (a probe compared against one noisy window of the base would decide on its luck)."""
    lo, hi = min(base, target), max(base, target)
    sigma = math.sqrt(noise / max(base_m.seconds, 1e-12)) * lo / (hi - lo)
    return not (sigma > BASE_RESOLUTION and base_m.windows < PROBE_CAP)


def judge(
    base_m: Measurement,
    probe_m: Measurement,
    base: int,
    target: int,
    bar: float,
    up: bool,
    noise: float,
    looks: int,
) -> Verdict:
    """Compare the probe's level ``target`` with the ``base`` against the ``bar`` on
    worth (``up``: the probe is the higher level, and wins at the bar and above), after
    ``looks`` looks: decided once the worth is clear of the bar (by `DECISIVE` before
    `PROBE_WINDOWS` windows, `CONFIDENT` after), precise enough that it matters little
    which way it goes, or `PROBE_CAP` looks on."""
    xb, xp = base_m.rate, probe_m.rate
    lo, hi = min(base, target), max(base, target)
    x_lo, x_hi = (xb, xp) if base < target else (xp, xb)
    worth = (x_hi / x_lo - 1) / (hi / lo - 1)
    # The standard deviation of ``worth``, from the noise and both measurements' lengths.
    var_p = noise / probe_m.seconds
    var_b = noise / base_m.seconds
    spread = math.sqrt(var_p + var_b)  # of the throughput ratio
    sigma, clear = spread * lo / (hi - lo), abs(worth - bar)
    # The most the wrong choice could cost, in throughput, at CONFIDENT sigmas.
    fine = (clear + CONFIDENT * sigma) * (hi - lo) / lo <= RESOLUTION
    z = DECISIVE if probe_m.windows < PROBE_WINDOWS else CONFIDENT
    if clear < z * sigma and not fine and looks < PROBE_CAP:
        # Measure where the uncertainty is: the probe's level, or back at the base
        # (moving only once one side holds SWITCH times the other's: every move costs
        # a settling time).
        measure = -1 if var_b > SWITCH * var_p else 1 if var_p > SWITCH * var_b else 0
        return Verdict(False, measure, False, False, fine)
    wins = worth >= bar if up else worth <= bar
    return Verdict(True, 0, wins, clear >= CONFIDENT * sigma, fine)
