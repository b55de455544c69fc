"""The measured noise: the yardstick every decision of the adaptive controller uses.

Two running estimates, learnt from each window (from its own updates' spread, or
against the other windows of its level): the relative variance of throughput over
one second (a t-second measurement has ``count / t``; Poisson counts: 1 / rate) and
that of a mean exec time over one exec. With them, the least mean exec time seen
(exec time without queueing), so "execs queue" is a test against the noise too.
"""

from __future__ import annotations

import math

from ._adaptive_tunables import (
    DECISIVE,
    LAT_MIN_FORGET,
    LAT_NOISE_FIRST,
    MIN_NOISE,
    NOISE_FIRST,
    NOISE_PRIOR_DF,
    NOISE_WEIGHT,
    QUEUEING,
)
from ._adaptive_windows import Measurement

__all__ = ["Noise"]


class Noise:
    """The noise of throughput (`count`) and of exec times (`lat`), and `lat_min`.

    The first estimates are plain means with the prior as one sample; later ones a
    running average, each window weighing at least `NOISE_WEIGHT`."""

    __slots__ = ("count", "lat", "lat_min", "lat_samples", "samples")

    def __init__(self) -> None:
        # The relative variance of throughput measured over one second, and of mean
        # exec time over one exec.
        self.count, self.lat = NOISE_FIRST, LAT_NOISE_FIRST
        self.samples = 0  # degrees of freedom the throughput noise has learnt from
        self.lat_samples = 0  # those the exec-time noise has learnt from updates
        # The least mean exec time of a level's measurement (forgotten slowly): exec
        # time without queueing.
        self.lat_min = math.inf

    def learn(self, m: Measurement, n: int, t: float, e: float, noise: float, df: int) -> None:
        """Learn from a window: from its own updates (``noise`` with ``df`` degrees of
        freedom), else against the other windows of its level ``m`` (their squared
        relative difference has the variance of both, noise / t + noise / m.seconds;
        for exec times, per exec)."""
        if df == 0 and m.windows >= 2:
            noise, df = (n / t / m.rate - 1) ** 2 / (1 / t + 1 / m.seconds), 1
        self.learn_count(noise, df)
        self.learn_lat(m, n, e)

    def learn_count(self, noise: float, df: int) -> None:
        """Learn the throughput noise from an estimate with ``df`` degrees of freedom."""
        if df:
            self.samples += df
            w = max(NOISE_WEIGHT, df / (self.samples + NOISE_PRIOR_DF))
            self.count = max(MIN_NOISE, (1 - w) * self.count + w * noise)

    def learn_lat(self, m: Measurement, n: int, e: float) -> None:
        """Learn the exec-time noise from a window against the others of its level."""
        if m.windows >= 2 and n > 0 and m.latency > 0:  # (execs of no measurable time)
            lat_var = (e / n / m.latency - 1) ** 2 / (1 / n + 1 / m.execs)
            w = max(NOISE_WEIGHT, 1 / (m.windows + 1))
            self.lat = (1 - w) * self.lat + w * lat_var

    def learn_lat_updates(self, lat_noise: float, df: int) -> None:
        """Learn the exec-time noise from a window's own updates' spread (fair whether
        or not execs queue)."""
        if df:
            self.lat_samples += df
            w = max(NOISE_WEIGHT, df / (self.lat_samples + NOISE_PRIOR_DF))
            self.lat = (1 - w) * self.lat + w * lat_noise

    def assume_poisson(self, x: float, df: int) -> None:
        """Nothing learnt yet, nor from this window (updates of one exec or none):
        until windows tell, counts at ``x`` jobs/s are as noisy as Poisson ones."""
        if self.samples == 0 and df == 0:
            self.count = max(self.count, 1 / x)

    def queued(self, latency: float, n: float, ref: Measurement, z: float = 1.0) -> bool:
        """Whether a mean exec time over ``n`` execs is clearly (`QUEUEING`, and beyond
        ``z`` times `DECISIVE` times the noise of both) above the reference's."""
        return self._excess(latency, n, ref.latency, ref.execs, z)

    def clear(self, latency: float, n: float, ref: Measurement, z: float) -> bool:
        """Whether a mean exec time over ``n`` execs lies ``z`` standard deviations (of
        it and the reference's) below the `QUEUEING` bar over the reference's."""
        spread = z * math.sqrt(self.lat * (1 / n + 1 / ref.execs))
        return latency / ref.latency - 1 + spread <= QUEUEING if ref.latency > 0 else False

    def queueing(self, m: Measurement) -> bool:
        """Whether a level's execs take clearly longer than the least seen."""
        low = self.lat_min
        if not low < math.inf:
            return False
        return self._excess(m.latency, m.execs, low, m.execs, 1.0)

    def _excess(self, latency: float, n: float, low: float, low_n: float, z: float) -> bool:
        excess = latency / low - 1 if low > 0 else 0.0
        spread = z * DECISIVE * math.sqrt(self.lat * (1 / n + 1 / low_n))
        return excess > max(QUEUEING, spread)

    def note_least(self, latency: float) -> None:
        """A mean exec time measured without queueing (the slow start's levels)."""
        self.lat_min = min(self.lat_min, latency)

    def note_latency(self, m: Measurement) -> None:
        """A level's measured exec time: the least, or closing the gap to it by
        `LAT_MIN_FORGET` (a least measured long ago, a faster service then, fades)."""
        lat, low = m.latency, self.lat_min
        if lat > 0:
            self.lat_min = lat if lat < low else low + LAT_MIN_FORGET * (lat - low)
