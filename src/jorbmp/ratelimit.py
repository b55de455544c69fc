"""Per-state rate limits: the adaptive `AIMDRateLimiter` and the gate the coordinator awaits.

A state's ``rate_limit`` may be a number (executions per second, burst 1), an
``aiolimiter.AsyncLimiter`` or an `AIMDRateLimiter`. The coordinator turns it into a
`RateGate` and awaits it once per job before dispatch, so every worker of the state
shares the one limit.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

__all__ = ["AIMDRateLimiter", "RateGate", "make_gate"]

# Default multiplicative decrease: halve the rate on a rate-limit error, as TCP does.
DEFAULT_DECREASE = 0.5
# Default number of good intervals to climb from min to max: slow enough not to
# re-trigger the remote limit at once, fast enough to recover within a minute or so.
DEFAULT_STEPS_MIN_TO_MAX = 10


def _number(owner: str, name: str, value: object) -> float:
    """``value`` as a finite float, or ``ValueError`` naming ``owner``'s parameter.

    ``bool`` is refused although it is an ``int``: ``True`` is never meant as a rate.
    NaN and infinities are refused: every comparison with NaN is false, so it would
    slip past the range checks below and switch the limit off.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner} {name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{owner} {name} must be a finite number, got {value!r}")
    return result


class AIMDRateLimiter:
    """A token bucket whose rate adapts to the remote service: additive increase,
    multiplicative decrease (AIMD), clamped to ``[min_rate, max_rate]`` per second.

    `backoff` (on a rate-limit error) multiplies the rate by ``decrease``; several
    errors within one ``interval`` count once, since they usually answer requests sent
    before the first one. `success` adds ``increase`` at most once per ``interval``,
    and not within an interval of a decrease. ``clock`` is injectable for tests; only
    its forward steps count (see `_tick`).

    Every parameter must be a finite number (not a bool): ``0 < min <= initial <=
    max``, ``increase >= 0``, ``0 < decrease < 1``, ``interval > 0``, ``burst >= 1``;
    anything else raises ``ValueError`` naming the parameter, so the rate can never
    leave ``[min, max]``.
    """

    __slots__ = (
        "_clock",
        "_clock_last",
        "_last_decrease",
        "_last_increase",
        "_last_refill",
        "_now",
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
        owner = "AIMDRateLimiter"
        initial_f = _number(owner, "initial", initial)
        min_f = _number(owner, "min", min)
        max_f = _number(owner, "max", max)
        if not 0 < min_f <= initial_f <= max_f:
            raise ValueError(
                f"{owner} needs 0 < min <= initial <= max, "
                f"got min={min!r}, initial={initial!r}, max={max!r}"
            )
        if increase is None:
            increase_f = (max_f - min_f) / DEFAULT_STEPS_MIN_TO_MAX or min_f
        else:
            increase_f = _number(owner, "increase", increase)
            if increase_f < 0:
                # A negative step would walk the rate below min (and below zero, where
                # try_acquire's negative "delay" lets every caller through unthrottled).
                raise ValueError(f"{owner} increase must be >= 0, got {increase!r}")
        decrease_f = _number(owner, "decrease", decrease)
        if not 0 < decrease_f < 1:
            raise ValueError(f"{owner} decrease must be in (0, 1), got {decrease!r}")
        interval_f = _number(owner, "interval", interval)
        if interval_f <= 0:
            raise ValueError(f"{owner} interval must be > 0 seconds, got {interval!r}")
        burst_f = _number(owner, "burst", burst)
        if burst_f < 1:
            raise ValueError(f"{owner} burst must be >= 1, got {burst!r}")
        if not callable(clock):
            raise ValueError(f"{owner} clock must be a callable returning seconds, got {clock!r}")
        self.rate = initial_f
        self.min_rate = min_f
        self.max_rate = max_f
        self.increase = increase_f
        self.decrease = decrease_f
        self.interval = interval_f
        self.burst = burst_f
        self._clock = clock
        self._clock_last = _number(owner, "clock()", clock())
        now = self._now = self._clock_last
        self._tokens = burst_f
        self._last_refill = now
        self._last_increase = now
        self._last_decrease = -math.inf

    def _tick(self) -> float:
        """The limiter's own time: the clock's forward steps only.

        ``time.monotonic`` (the default) never steps back, but an injected clock
        (``time.time`` under NTP, a test clock) may. A backward step counts as no time
        passing, instead of draining the bucket into a debt as long as the jump and
        freezing increases until the clock catches up; a non-finite reading is ignored.
        """
        try:
            raw = float(self._clock())
        except (TypeError, ValueError):
            return self._now
        if math.isfinite(raw):
            step = raw - self._clock_last
            self._clock_last = raw
            if step > 0:
                self._now += step
        return self._now

    def _refill(self) -> float:
        now = self._tick()
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
        """Wait until a token is available and take it.

        Waits with ``asyncio.sleep``, i.e. in the event loop's seconds, which are
        ``time.monotonic``'s: an injected clock must advance in real time for this to
        return (tests drive `try_acquire` instead).
        """
        while (delay := self.try_acquire()) > 0:
            await asyncio.sleep(delay)

    def backoff(self) -> None:
        """Record a rate-limit error: cut the rate (once per interval) and drain the bucket."""
        now = self._refill()
        self._tokens = min(self._tokens, 0.0)
        if now - self._last_decrease < self.interval:
            return
        self.rate = min(self.max_rate, max(self.min_rate, self.rate * self.decrease))
        self._last_decrease = now

    def success(self) -> None:
        """Record a successful exec: raise the rate by ``increase``, at most once per interval."""
        now = self._tick()
        if now - self._last_increase < self.interval or now - self._last_decrease < self.interval:
            return
        self.rate = max(self.min_rate, min(self.max_rate, self.rate + self.increase))
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
    where = f"state {state_name!r}: rate_limit"
    if rate_limit is None:
        return None
    if isinstance(rate_limit, AIMDRateLimiter):
        return RateGate(rate_limit)
    if isinstance(rate_limit, AsyncLimiter):
        _check_async_limiter(where, rate_limit)
        return RateGate(rate_limit)
    if isinstance(rate_limit, type) and issubclass(rate_limit, (AsyncLimiter, AIMDRateLimiter)):
        raise ValueError(
            f"{where} must be an instance, got the class {rate_limit.__name__}; "
            f"construct one, e.g. {rate_limit.__name__}(...)"
        )
    if isinstance(rate_limit, bool):
        raise ValueError(
            f"{where} must be a number of executions per second, got {rate_limit!r}; "
            "use None for no limit"
        )
    if isinstance(rate_limit, numbers.Real):
        rate = float(rate_limit)
        if math.isnan(rate) or rate <= 0:
            raise ValueError(f"{where} must be > 0, got {rate_limit!r}")
        if math.isinf(rate):
            raise ValueError(f"{where} must be finite, got {rate_limit!r}; use None for no limit")
        return RateGate(SteadyRate(rate))
    raise ValueError(
        f"{where} must be None, a number, an aiolimiter.AsyncLimiter "
        f"or an AIMDRateLimiter, got {type(rate_limit).__name__}"
    )


def _check_async_limiter(where: str, limiter: AsyncLimiter) -> None:
    """Refuse an ``AsyncLimiter`` that cannot grant the one unit the gate asks for.

    ``acquire()`` raises for ``max_rate < 1`` on every call, which would surface only at
    dispatch time, inside the gate task, and leave the state's jobs waiting forever; a
    non-finite or non-positive ``time_period`` makes the bucket never leak or never fill.
    """
    # Typed float by aiolimiter, but nothing stops AsyncLimiter("10") at construction.
    max_rate: object = limiter.max_rate
    period: object = limiter.time_period
    if isinstance(max_rate, bool) or not isinstance(max_rate, numbers.Real):
        raise ValueError(f"{where}: AsyncLimiter max_rate must be a number, got {max_rate!r}")
    if not math.isfinite(max_rate) or max_rate < 1:
        raise ValueError(
            f"{where}: AsyncLimiter max_rate must be a finite number >= 1 "
            f"(each dispatch acquires 1), got {max_rate!r}"
        )
    if isinstance(period, bool) or not isinstance(period, numbers.Real):
        raise ValueError(f"{where}: AsyncLimiter time_period must be a number, got {period!r}")
    if not math.isfinite(period) or period <= 0:
        raise ValueError(
            f"{where}: AsyncLimiter time_period must be a finite number > 0, got {period!r}"
        )
