"""Measurement windows: a state's cumulative counters cut into windows, and summed.

`Windows` turns the controller's updates (cumulative execs and exec seconds, and
whether the state was saturated) into windows of consecutive saturated updates, each
long enough to measure (see `jorbmp.adaptive`'s module doc); `Measurement` is a
level's sum of them. Neither decides anything: they only count.
"""

from __future__ import annotations

import math

from ._adaptive_tunables import (
    FIRST_EXECS,
    SETTLE_LATENCIES,
    START_EXECS,
    START_UPDATES,
    UPDATE_EXECS,
    WINDOW_EXECS,
    WINDOW_LATENCIES,
    WINDOW_UPDATES,
)

__all__ = ["Measurement", "Window", "Windows"]

# A closed window: (execs, seconds, exec seconds, noise, the noise's degrees of freedom).
Window = tuple[int, float, float, float, int]


class Measurement:
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

    def take(self, other: Measurement) -> None:
        self.execs, self.seconds = other.execs, other.seconds
        self.exec_seconds, self.windows = other.exec_seconds, other.windows

    @property
    def rate(self) -> float:
        return self.execs / self.seconds if self.seconds > 0 else 0.0

    @property
    def latency(self) -> float:
        return self.exec_seconds / self.execs if self.execs > 0 else 0.0


class Windows:
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
    ) -> Window | None:
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
