"""`Backoff`, the default `State.retry_delay`: exponential, with jitter, bounded.

A job that fails because a service is down should not be retried at once (all its
attempts would be spent in a second), nor all at the same moment as the others
(they would hit the service together when it comes back). The delay of attempt n is
``first * factor**(n-1)``, at most ``max``, of which a random share up to ``jitter``
is taken off: with the defaults 0.5-1 s, then 1-2 s, 2-4 s, ... up to 30-60 s.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""

    first: float = 1.0
    factor: float = 2.0
    max: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        for name in ("first", "factor", "max", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Backoff: {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Backoff: {name} must be finite and >= 0, got {value!r}")
        if self.factor < 1:
            raise ValueError(f"Backoff: factor must be >= 1, got {self.factor!r}")
        if self.jitter > 1:
            raise ValueError(f"Backoff: jitter must be in [0, 1], got {self.jitter!r}")

    def __call__(self, attempt: int) -> float:
        try:
            delay = min(self.max, self.first * self.factor ** max(attempt - 1, 0))
        except OverflowError:  # a job retried forever
            delay = self.max
        return delay * (1.0 - self.jitter * random.random())
