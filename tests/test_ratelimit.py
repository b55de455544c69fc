"""AIMDRateLimiter arithmetic with an injected clock: no sleeping."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers_ratelimit import Clock, busy

from jorbmp import AIMDRateLimiter

pytestmark = pytest.mark.timeout(10)


def test_token_bucket_rate_and_burst() -> None:
    clock = Clock()
    lim = AIMDRateLimiter(2, 1, 10, clock=clock)
    assert lim.try_acquire() == 0.0  # burst 1
    assert lim.try_acquire() == pytest.approx(0.5)
    clock.now += 0.25
    assert lim.try_acquire() == pytest.approx(0.25)
    clock.now += 0.25
    assert lim.try_acquire() == 0.0
    clock.now += 10  # tokens never exceed the burst
    assert lim.try_acquire() == 0.0
    assert lim.try_acquire() > 0


def test_multiplicative_decrease_is_coalesced_and_clamped() -> None:
    clock = Clock()
    lim = AIMDRateLimiter(16, 3, 20, interval=1.0, clock=clock)
    lim.backoff()
    assert lim.rate == 8
    lim.backoff()  # same interval: these answer requests sent before the first backoff
    lim.backoff()
    assert lim.rate == 8
    clock.now += 1.0
    lim.backoff()
    assert lim.rate == 4
    clock.now += 1.0
    lim.backoff()
    assert lim.rate == 3  # clamped to min
    assert lim.has_capacity() is False  # the bucket was drained


def test_additive_increase_once_per_interval_and_clamped() -> None:
    clock = Clock()
    lim = AIMDRateLimiter(5, 1, 7, increase=1.0, interval=1.0, clock=clock)
    busy(lim, clock, 0.5)
    lim.success()
    assert lim.rate == 5  # not a full interval since start
    busy(lim, clock, 0.5)
    lim.success()
    lim.success()
    assert lim.rate == 6
    busy(lim, clock, 1.0)
    lim.success()
    busy(lim, clock, 1.0)
    lim.success()
    assert lim.rate == 7  # clamped to max
    clock.now += 1.5  # no success within the last second: no allowance measured
    lim.backoff()
    assert lim.rate == 3.5
    busy(lim, clock, 0.5)
    lim.success()  # no increase within an interval of a decrease
    assert lim.rate == 3.5


def test_default_increase_climbs_from_min_to_max_in_ten_steps() -> None:
    lim = AIMDRateLimiter(1, 1, 11)
    assert lim.increase == 1.0
    assert "rate=1/s" in repr(lim)


@pytest.mark.parametrize("args", [(0, 0, 1), (5, 6, 10), (11, 1, 10)])
def test_invalid_bounds(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="min <= initial <= max"):
        AIMDRateLimiter(*args)


def test_acquire_waits_in_real_time() -> None:
    lim = AIMDRateLimiter(20, 1, 20)

    async def take(n: int) -> float:
        start = time.monotonic()
        for _ in range(n):
            await lim.acquire()
        return time.monotonic() - start

    elapsed = asyncio.run(take(5))
    assert 0.15 <= elapsed < 1.0  # 4 waits of 50 ms after the first token


def test_numeric_rate_is_steady_and_never_bursts() -> None:
    from jorbmp.ratelimit import SteadyRate

    gate = SteadyRate(20)

    async def take(n: int) -> list[float]:
        loop = asyncio.get_running_loop()
        times = []
        for i in range(n):
            if i == 20:
                await asyncio.sleep(0.01)  # late callers do not delay the grid
            await gate.acquire()
            times.append(loop.time())
        return times

    times = asyncio.run(take(41))
    assert 1.95 <= times[-1] - times[0] < 2.1  # 40 intervals of 50 ms, no drift
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert worst <= 21  # limit + burst in any one-second window

    async def after_idle() -> float:
        await asyncio.sleep(0.3)  # idle: the grid restarts instead of bursting
        loop = asyncio.get_running_loop()
        start = loop.time()
        await gate.acquire()
        await gate.acquire()
        return loop.time() - start

    assert asyncio.run(after_idle()) >= 0.045
