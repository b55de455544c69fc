"""Per-state rate limits: the adaptive `AIMDRateLimiter` and the gate the coordinator awaits.

A state's ``rate_limit`` may be a number (executions per second, burst 1), an
``aiolimiter.AsyncLimiter`` or an `AIMDRateLimiter`. The coordinator turns it into a
`RateGate` and awaits it once per job before dispatch, so every worker of the state
shares the one limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

__all__ = ["AIMDRateLimiter", "RateGate", "make_gate"]

# Default multiplicative decrease: halve the rate on a rate-limit error, as TCP does.
DEFAULT_DECREASE = 0.5
# Default number of good intervals to climb from min to max: slow enough not to
# re-trigger the remote limit at once, fast enough to recover within a minute or so.
DEFAULT_STEPS_MIN_TO_MAX = 10


class AIMDRateLimiter:
    """A token bucket whose rate adapts to the remote service: additive increase,
    multiplicative decrease (AIMD), clamped to ``[min_rate, max_rate]`` per second.

    `backoff` (on a rate-limit error) multiplies the rate by ``decrease``; several
    errors within one ``interval`` count once, since they usually answer requests sent
    before the first one. `success` adds ``increase`` at most once per ``interval``,
    and not within an interval of a decrease. ``clock`` is injectable for tests.
    """

    __slots__ = (
        "_clock",
        "_last_decrease",
        "_last_increase",
        "_last_refill",
        "_tokens",
        "burst",
        "decrease",
        "increase",
        "interval",
        "max_rate",
        "min_rate",
        "rate",
    )

    def __init__(
        self,
        initial: float,
        min: float,
        max: float,
        *,
        increase: float | None = None,
        decrease: float = DEFAULT_DECREASE,
        interval: float = 1.0,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < min <= initial <= max:
            raise ValueError(
                f"AIMDRateLimiter needs 0 < min <= initial <= max, got {min}, {initial}, {max}"
            )
        if not 0 < decrease < 1:
            raise ValueError(f"AIMDRateLimiter decrease must be in (0, 1), got {decrease}")
        if interval <= 0 or burst < 1:
            raise ValueError("AIMDRateLimiter needs interval > 0 and burst >= 1")
        self.rate = float(initial)
        self.min_rate = float(min)
        self.max_rate = float(max)
        self.increase = (
            float(increase)
            if increase is not None
            else (max - min) / DEFAULT_STEPS_MIN_TO_MAX or min
        )
        self.decrease = decrease
        self.interval = interval
        self.burst = burst
        self._clock = clock
        now = clock()
        self._tokens = burst
        self._last_refill = now
        self._last_increase = now
        self._last_decrease = -float("inf")

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last_refill) * self.rate)
        self._last_refill = now
        return now

    def try_acquire(self) -> float:
        """Take a token and return 0.0, or return the seconds until one is available."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    def has_capacity(self, amount: float = 1) -> bool:
        self._refill()
        return self._tokens >= amount

    async def acquire(self) -> None:
        """Wait until a token is available and take it."""
        while (delay := self.try_acquire()) > 0:
            await asyncio.sleep(delay)

    def backoff(self) -> None:
        """Record a rate-limit error: cut the rate (once per interval) and drain the bucket."""
        now = self._refill()
        self._tokens = min(self._tokens, 0.0)
        if now - self._last_decrease < self.interval:
            return
        self.rate = max(self.min_rate, self.rate * self.decrease)
        self._last_decrease = now

    def success(self) -> None:
        """Record a successful exec: raise the rate by ``increase``, at most once per interval."""
        now = self._clock()
        if now - self._last_increase < self.interval or now - self._last_decrease < self.interval:
            return
        self.rate = min(self.max_rate, self.rate + self.increase)
        self._last_increase = now

    def __repr__(self) -> str:
        return (
            f"<AIMDRateLimiter rate={self.rate:g}/s [{self.min_rate:g}..{self.max_rate:g}] "
            f"tokens={self._tokens:.2f}>"
        )


class SteadyRate:
    """``rate_limit=<number>``: starts on a fixed grid of ``1/rate`` seconds, burst 1.

    A plain token bucket capped at one token loses the time by which each timer fires
    late, so 50/s drifts to ~48/s. Here start ``k`` is due at ``t0 + k/rate``: a late
    start does not delay the next ones, yet any window of one second holds at most
    ``rate + 1`` starts. After an idle spell the grid restarts, so idleness never
    turns into a burst.
    """

    __slots__ = ("_next", "interval", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.interval = 1.0 / rate
        self._next: float | None = None

    async def acquire(self) -> None:
        now = asyncio.get_running_loop().time()
        due = self._next
        if due is None or now - due > self.interval:
            due = now  # idle for a while: restart the grid here
        self._next = due + self.interval  # reserved before sleeping: waiters queue up
        if due > now:
            await asyncio.sleep(due - now)

    def __repr__(self) -> str:
        return f"<SteadyRate {self.rate:g}/s>"


class RateGate:
    """What the coordinator awaits before each dispatch of a rate-limited state."""

    __slots__ = ("aimd", "limiter")

    def __init__(self, limiter: AsyncLimiter | AIMDRateLimiter | SteadyRate) -> None:
        self.limiter = limiter
        self.aimd = limiter if isinstance(limiter, AIMDRateLimiter) else None

    async def acquire(self) -> None:
        await self.limiter.acquire()

    def backoff(self) -> None:
        if self.aimd is not None:
            self.aimd.backoff()

    def success(self) -> None:
        if self.aimd is not None:
            self.aimd.success()

    def __repr__(self) -> str:
        return f"<RateGate {self.limiter!r}>"


def make_gate(state_name: str, rate_limit: object) -> RateGate | None:
    """Validate a state's ``rate_limit`` and wrap it; ``ValueError`` names the state."""
    if rate_limit is None:
        return None
    if isinstance(rate_limit, (AsyncLimiter, AIMDRateLimiter)):
        return RateGate(rate_limit)
    if isinstance(rate_limit, (int, float)) and not isinstance(rate_limit, bool):
        if rate_limit <= 0:
            raise ValueError(f"state {state_name!r}: rate_limit must be > 0, got {rate_limit}")
        return RateGate(SteadyRate(float(rate_limit)))
    raise ValueError(
        f"state {state_name!r}: rate_limit must be None, a number, an aiolimiter.AsyncLimiter "
        f"or an AIMDRateLimiter, got {type(rate_limit).__name__}"
    )
