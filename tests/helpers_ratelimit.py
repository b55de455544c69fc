"""A stepped clock and the callers of a limiter, for the tests of `AIMDRateLimiter`."""

from __future__ import annotations

from jorbmp import AIMDRateLimiter


class Clock:
    """A clock the test sets."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def starve(lim: AIMDRateLimiter) -> None:
    """Take tokens until one is refused: a caller found the bucket empty."""
    while lim.try_acquire() == 0.0:
        pass


def busy(lim: AIMDRateLimiter, clock: Clock, seconds: float, step: float = 0.001) -> None:
    """A state held back by the rate for ``seconds``: it takes every token as soon as
    there is one (so `success` may raise the rate afterwards)."""
    start, steps = clock.now, max(1, round(seconds / step))
    for k in range(1, steps + 1):
        clock.now = start + seconds * k / steps
        starve(lim)
