"""Rate-limit validation and clock handling (review r16).

`AIMDRateLimiter` refuses any parameter that would let its rate leave ``[min, max]``
or switch the limit off (a negative ``increase``, NaN, infinities, bools, non-numbers),
and only counts its clock's forward steps. `make_gate` (and so `Processor(...)`)
refuses nonsense ``rate_limit`` values with a ``ValueError`` naming the state.
Real limiter objects throughout; injected clocks, no sleeping.
"""

from __future__ import annotations

import math
import re
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


def test_forward_clock_jump_owes_no_lateness() -> None:
    """A wall clock (time.time + an NTP step) jumping an hour ahead while a caller
    sleeps in acquire: at b06c975 the hour counted as the caller's late wake-up and
    the bucket handed out ``rate * MAX_LATE`` tokens at once (125 starts in one real
    second at 100/s). Now such a step fills the bucket to its burst only."""
    clock = Clock(0.0)
    lim = AIMDRateLimiter(100, 100, 100, clock=clock)
    assert lim._take(1000) == lim.burst  # the idle bucket's burst
    lim._bucket._sleepers = 1  # a caller sleeps in acquire, owed what accrues late
    clock.now = 0.1
    assert lim._take(1000) == 10  # a late wake-up: what 0.1 s is worth
    clock.now = 3600.0
    assert lim._take(1000) == lim.burst


def test_a_rate_of_one_per_second_or_less_keeps_delivering() -> None:
    """Every wait at 1/s and below is longer than `MAX_STEP`: the window must still let
    its grants go (7cc0b2d kept them in it forever: 2 starts, then a hang)."""
    for rate in (1.0, 0.5):
        clock = Clock(0.0)
        lim = AIMDRateLimiter(rate, rate, rate, clock=clock)
        got = 0
        for step in range(1, 41):
            clock.now = 1.5 * step / rate  # a reading each 1.5 tokens' worth of time
            got += lim._take(1)
        assert got == 40, (rate, got)


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
