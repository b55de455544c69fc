"""Rate-limit validation and clock handling (review r16).

`AIMDRateLimiter` refuses any parameter that would let its rate leave ``[min, max]``
or switch the limit off (a negative ``increase``, NaN, infinities, bools, non-numbers),
and only counts its clock's forward steps. `make_gate` (and so `Processor(...)`)
refuses nonsense ``rate_limit`` values with a ``ValueError`` naming the state.
Real limiter objects throughout; injected clocks, no sleeping.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from fractions import Fraction
from typing import Any

import pytest
from aiolimiter import AsyncLimiter
from helpers_ratelimit import busy

from jorbmp import AIMDRateLimiter, Processor, State
from jorbmp.ratelimit import SteadyRate, make_gate

pytestmark = pytest.mark.timeout(10)

NAN = float("nan")
INF = float("inf")


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def aok(ac: Any, oc: Any, jc: Any) -> Any:
    return jc, "done"


DONE = State("done", terminal=True)


def named(param: str, value: object) -> str:
    """A message naming ``param`` and showing ``value``."""
    return rf"\b{re.escape(param)}\b.*{re.escape(repr(value))}"


# --- AIMDRateLimiter parameters ---------------------------------------------------


def test_negative_increase_is_rejected() -> None:
    clock = Clock(0.0)
    with pytest.raises(ValueError, match=named("increase", -10)):
        AIMDRateLimiter(5, 1, 10, increase=-10, clock=clock)


def test_negative_increase_cannot_drive_the_rate_below_min() -> None:
    """The r16 reproduction: before the fix one success took the rate to -5/s, and a
    negative rate made every `try_acquire` answer a negative delay, i.e. no limit."""
    clock = Clock(0.0)
    try:
        lim = AIMDRateLimiter(5, 1, 10, increase=-10, clock=clock)
    except ValueError:
        return
    clock.now = 2.0
    lim.success()
    assert lim.min_rate <= lim.rate <= lim.max_rate


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("increase", NAN),
        ("increase", INF),
        ("increase", True),
        ("increase", "1"),
        ("interval", NAN),
        ("interval", INF),
        ("interval", True),
        ("burst", NAN),
        ("burst", INF),
        ("burst", True),
        ("decrease", "0.5"),
    ],
)
def test_optional_parameters_must_be_finite_numbers(param: str, value: object) -> None:
    kwargs: dict[str, Any] = {param: value}
    with pytest.raises(ValueError, match=named(param, value)):
        AIMDRateLimiter(5, 1, 10, clock=Clock(), **kwargs)


@pytest.mark.parametrize(
    ("args", "param", "value"),
    [
        ((5, 1, INF), "max", INF),
        ((INF, 1, INF), "initial", INF),
        ((True, True, True), "initial", True),
        ((5, True, 10), "min", True),
        ((5, 1, "10"), "max", "10"),
    ],
)
def test_bounds_must_be_finite_numbers(
    args: tuple[Any, Any, Any], param: str, value: object
) -> None:
    with pytest.raises(ValueError, match=named(param, value)):
        AIMDRateLimiter(*args, clock=Clock())


@pytest.mark.parametrize(
    ("args", "kwargs", "param", "value"),
    [
        ((5e-324, 5e-324, 1), {}, "min", 5e-324),
        ((1e-310, 1e-310, 1e-310), {}, "min", 1e-310),
        ((1e-10, 1e-10, 1), {}, "min", 1e-10),
        ((5, 1, 10), {"interval": 5e-324}, "interval", 5e-324),
        ((5, 1, 10), {"interval": 1e-7}, "interval", 1e-07),
    ],
)
def test_rates_and_intervals_too_small_for_the_arithmetic_are_refused(
    args: tuple[Any, Any, Any], kwargs: dict[str, Any], param: str, value: object
) -> None:
    """At b06c975 AIMDRateLimiter(5e-324, 5e-324, 1) was accepted, and its first
    success divided by rate * span, which underflows to 0.0: ZeroDivisionError in the
    coordinator, and that job's result was lost."""
    with pytest.raises(ValueError, match=named(param, value)):
        AIMDRateLimiter(*args, clock=Clock(), **kwargs)


@pytest.mark.parametrize("value", [5e-324, 1e-310, 1e-10])
def test_numeric_rate_limit_too_small_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        make_gate("a", value)


def test_the_least_rate_and_interval_run() -> None:
    """The smallest accepted values do the arithmetic in normal floats."""
    clock = Clock(0.0)
    lim = AIMDRateLimiter(1e-9, 1e-9, 1, interval=1e-6, clock=clock)
    for _ in range(5):
        clock.now += 1e-6
        lim.try_acquire()
        lim.success()
    assert 1e-9 <= lim.rate <= 1


def test_bounds_message_names_each_value() -> None:
    with pytest.raises(ValueError, match=r"min=6, initial=5, max=10"):
        AIMDRateLimiter(5, 6, 10, clock=Clock())


def test_clock_must_be_callable_and_return_a_finite_number() -> None:
    with pytest.raises(ValueError, match=r"\bclock\b.*42"):
        AIMDRateLimiter(5, 1, 10, clock=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\bclock\(\).*nan"):
        AIMDRateLimiter(5, 1, 10, clock=lambda: NAN)


def test_zero_increase_is_allowed_and_keeps_the_rate() -> None:
    clock = Clock()
    lim = AIMDRateLimiter(5, 1, 10, increase=0, clock=clock)
    lim.backoff()
    clock.now += 5
    lim.success()
    assert lim.rate == 2.5
    assert isinstance(lim.increase, float) and isinstance(lim.interval, float)


# --- clock handling ---------------------------------------------------------------


def test_backward_clock_jump_is_no_time_not_a_debt() -> None:
    """Before: a 100 s backward step left the bucket 999 tokens in debt (a 100.1 s wait)."""
    clock = Clock(100.0)
    lim = AIMDRateLimiter(10, 1, 10, clock=clock)
    assert lim.try_acquire() == 0.0
    clock.now = 0.0
    assert lim.try_acquire() == pytest.approx(0.1)  # one token at 10/s, as without the jump
    clock.now = 0.5
    assert lim.try_acquire() == 0.0


def test_forward_clock_jump_grants_at_most_the_burst_beyond_the_rate() -> None:
    """A wall clock (time.time + an NTP step) jumping an hour ahead while a caller
    sleeps in acquire: at b06c975 the hour counted as the caller's late wake-up and
    handed out that much at once (125 starts in one real second at 100/s, 101
    allowed). Real time, ~2.5 s."""
    offset = [0.0]
    lim = AIMDRateLimiter(100, 100, 100, clock=lambda: time.monotonic() + offset[0])
    starts: list[float] = []

    def jump() -> None:  # while the caller sleeps in acquire
        offset[0] = 3600.0

    async def caller() -> None:
        end = time.monotonic() + 2.5
        asyncio.get_running_loop().call_later(1.3, jump)
        while time.monotonic() < end:
            await lim.acquire()
            starts.append(time.monotonic())

    asyncio.run(caller())
    most = max(bisect.bisect_left(starts, t + 1.0) - i for i, t in enumerate(starts))
    # The rate and a burst, give or take a busy host's jitter between a grant and its
    # timestamp here (the hour's worth was 25 more).
    assert most <= 100 + lim.burst + 9


def test_backward_clock_jump_does_not_freeze_increase() -> None:
    clock = Clock(100.0)
    lim = AIMDRateLimiter(5, 1, 10, increase=1, interval=1.0, clock=clock)
    clock.now = 0.0
    lim.success()  # no time has passed in the limiter's terms: no increase yet
    assert lim.rate == 5
    busy(lim, clock, 1.0)  # one interval of real progress, held back by the rate
    lim.success()
    assert lim.rate == 6


def test_backward_clock_jump_does_not_freeze_decrease() -> None:
    clock = Clock(100.0)
    lim = AIMDRateLimiter(8, 1, 10, interval=1.0, clock=clock)
    lim.backoff()
    assert lim.rate == 4
    clock.now = 0.0
    lim.backoff()  # same instant in the limiter's time: coalesced
    assert lim.rate == 4
    clock.now = 1.0
    lim.backoff()
    assert lim.rate == 2


def test_rate_stays_in_bounds_and_delays_stay_positive() -> None:
    clock = Clock()
    lim = AIMDRateLimiter(3, 2, 4, increase=5, decrease=0.01, clock=clock)
    for step in range(200):
        clock.now += 0.7 if step % 3 else -3.0  # with backward steps mixed in
        if step % 7 == 0:
            lim.backoff()
        else:
            lim.success()
        assert 2 <= lim.rate <= 4
        delay = lim.try_acquire()
        assert delay == 0.0 or 0 < delay <= 1 / 2 + 1e-9


# --- make_gate / Processor(...) -----------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_numeric_rate_limit_must_be_finite(value: float) -> None:
    with pytest.raises(
        ValueError, match=r"state 'a': rate_limit must be .*" + re.escape(repr(value))
    ):
        make_gate("a", value)


def test_nan_rate_limit_rejected_by_processor() -> None:
    """Before: NaN slipped past ``rate_limit <= 0`` and the state ran unthrottled."""
    with pytest.raises(ValueError, match=r"state 'a': rate_limit must be > 0, got nan"):
        Processor(None, [State("a", aok, rate_limit=NAN), DONE])


def test_bool_rate_limit_explains_itself() -> None:
    with pytest.raises(
        ValueError, match=r"state 'a': rate_limit .* got True; use None for no limit"
    ):
        make_gate("a", True)


def test_rate_limit_class_instead_of_instance() -> None:
    with pytest.raises(ValueError, match=r"must be an instance, got the class AIMDRateLimiter"):
        make_gate("a", AIMDRateLimiter)


def test_any_real_number_is_a_rate() -> None:
    gate = make_gate("a", Fraction(1, 2))
    assert gate is not None and isinstance(gate.limiter, SteadyRate)
    assert gate.limiter.rate == 0.5 and isinstance(gate.limiter.rate, float)


@pytest.mark.parametrize(
    ("limiter", "match"),
    [
        (AsyncLimiter(0.5), r"max_rate must be a finite number >= 1 .*got 0\.5"),
        (AsyncLimiter(NAN), r"max_rate must be a finite number >= 1 .*got nan"),
        (AsyncLimiter(INF), r"max_rate must be a finite number >= 1 .*got inf"),
        (AsyncLimiter(10, -1), r"time_period must be a finite number > 0, got -1"),
        (AsyncLimiter(10, INF), r"time_period must be a finite number > 0, got inf"),
    ],
)
def test_async_limiter_that_cannot_grant_one_dispatch(limiter: AsyncLimiter, match: str) -> None:
    """Before: accepted; AsyncLimiter(0.5).acquire() raises on every call, inside the
    coordinator's gate task, and the run hung with its job waiting forever."""
    with pytest.raises(ValueError, match=r"state 'a': rate_limit: AsyncLimiter " + match):
        Processor(None, [State("a", aok, rate_limit=limiter), DONE])


def test_valid_limiters_still_accepted() -> None:
    for value in (5, 0.25, AsyncLimiter(1, 0.5), AIMDRateLimiter(1, 1, 1)):
        gate = make_gate("a", value)
        assert gate is not None
    assert make_gate("a", None) is None
    assert math.isclose(AIMDRateLimiter(1, 1, 11).increase, 1.0)
