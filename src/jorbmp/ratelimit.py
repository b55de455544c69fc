"""Per-state rate limits: the adaptive `AIMDRateLimiter` and the gate the coordinator awaits.

A state's ``rate_limit`` may be a number (executions per second, burst 1), an
``aiolimiter.AsyncLimiter`` or an `AIMDRateLimiter`. The coordinator turns it into a
`RateGate`, so every worker of the state shares the one limit: its lane takes as many
tokens as the gate holds without waiting (`RateGate.take`), one per job it dispatches,
and awaits `RateGate.acquire` only when none is left.

The number and the `AIMDRateLimiter` share one engine, `_Bucket`: a token bucket
computed from elapsed time, not a grid of timers. asyncio's timers fire late (a sleep
lasts at least ~1 ms, more on a busy loop), so a bucket capped at its burst would lose
the time each wake-up is late: 10,000/s delivered 1,695-5,445/s that way. Here the
tokens that accrue while a caller sleeps in `acquire` are owed to it, and the wake-up
hands out all of them at once, to the caller and those that follow it at once; an
idle bucket still fills only to its burst. A sliding log of grants (`_Window`) keeps
every one-second window at most ``rate + burst``, whatever the catch-up.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import time
from collections import deque
from collections.abc import Callable

from aiolimiter import AsyncLimiter

from ._aimd import AimdControl

__all__ = ["AIMDRateLimiter", "RateGate", "make_gate"]

# Default multiplicative decrease: halve the rate on a rate-limit error, as TCP does.
DEFAULT_DECREASE = 0.5
# Default number of good intervals to climb from min to max: slow enough not to
# re-trigger the remote limit at once, fast enough to recover within a minute or so.
DEFAULT_STEPS_MIN_TO_MAX = 10

# The longest a sleeping caller's wake-up may be late and still be handed every token
# that accrued meanwhile (beyond the burst). A wake-up later than this (a loop blocked
# for longer) delivers what this much lateness is worth, one later than `MAX_STEP`
# only the burst; the rest is lost.
MAX_LATE = 0.25
# An elapsed time longer than this since the bucket's last reading is idle time or a
# step of the clock (an injected ``time.time`` under NTP), not a late wake-up: it
# fills the bucket to its burst only (a step of an hour is no hour of lateness owed).
MAX_STEP = 1.0
# After a grant, for this long the tokens beyond the burst stay on offer to the next
# caller: the callers that follow a late wake-up at once (the coordinator's gate asks
# again right after each dispatch). A caller after a longer pause finds an idle
# bucket, holding at most its burst.
CREDIT_SECONDS = 0.02
# The sliding window that holds at most ``rate + burst`` grants. It is a little longer
# than one second so that up to 10 ms of jitter between a grant and the start of its
# exec (a dispatch, a pipe, a thread switch) cannot push a second's starts over the
# limit. The price: at most ``(rate + burst) / 1.01`` per second in the long run.
WINDOW_SECONDS = 1.01
# Grants this close together share one entry of the window's log, stamped with the
# latest of them (so they leave the window no earlier than they should): the log
# holds at most about 1 / MERGE_SECONDS entries, whatever the rate.
MERGE_SECONDS = 0.001
# The least rate (per second) and interval (seconds) a limit may have: below them the
# arithmetic (a rate times a span, a second divided by a rate) leaves normal floats
# and ends in 0.0 or inf (5e-324/s made the first success divide by zero). One
# execution in ~30 years, and a microsecond, are far past any real use.
MIN_RATE = 1e-9
MIN_INTERVAL = 1e-6
# Tokens short of a whole one by less than this count as whole: elapsed times are
# differences of floats, and 4 x 0.25 tokens must make one.
TOKEN_EPSILON = 1e-9


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


class _Window:
    """A sliding log of grants: at most ``limit`` in any `WINDOW_SECONDS`.

    Entries are ``[first, last, count]``: grants within `MERGE_SECONDS` of an entry's
    first one join it, and the entry leaves the window `WINDOW_SECONDS` after its last.
    """

    __slots__ = ("_count", "_entries")

    def __init__(self) -> None:
        self._entries: deque[list[float]] = deque()
        self._count = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        horizon = now - WINDOW_SECONDS
        while entries and entries[0][1] <= horizon:
            self._count -= int(entries.popleft()[2])

    def room(self, now: float, limit: float) -> int:
        """How many grants at ``now`` keep every window within ``limit``."""
        self._expire(now)
        return max(0, math.floor(limit - self._count))

    def delay(self, now: float, limit: float) -> float:
        """0.0 if one more grant at ``now`` keeps every window within ``limit``, else
        the seconds until enough grants have left the window."""
        self._expire(now)
        excess = self._count + 1 - limit
        if excess <= 0:
            return 0.0
        horizon = now - WINDOW_SECONDS
        for entry in self._entries:
            excess -= entry[2]
            if excess <= 0:
                return max(entry[1] - horizon, 1e-6)
        return WINDOW_SECONDS  # unreachable: limit >= 1

    def record(self, now: float, n: int = 1) -> None:
        entries = self._entries
        if entries and now - entries[-1][0] < MERGE_SECONDS:
            last = entries[-1]
            last[1] = max(last[1], now)
            last[2] += n
        else:
            entries.append([now, now, n])
        self._count += n


class _Bucket:
    """The token bucket behind `SteadyRate` and `AIMDRateLimiter`.

    Tokens accrue at ``rate`` per second of elapsed time. An idle bucket holds at most
    ``burst``; while a caller sleeps in `wait`, or within `CREDIT_SECONDS` of the last
    grant, it holds up to ``burst + rate * MAX_LATE``: the tokens a late wake-up is
    owed, handed out at once (unless more than `MAX_STEP` passed: a clock's step or a
    loop blocked that long). `_Window` caps every window at ``rate + burst`` grants.
    The rate is passed in on every call, as `AIMDRateLimiter` changes it.

    ``short_at`` is the last time a caller asked for more than the bucket held, and
    ``granted`` counts the tokens handed out: together they tell whether the rate is
    what holds the caller back (`AIMDRateLimiter` grows only then).
    """

    __slots__ = (
        "_credit_until",
        "_last",
        "_sleepers",
        "_window",
        "burst",
        "granted",
        "short_at",
        "tokens",
    )

    def __init__(self, burst: float, now: float) -> None:
        self.burst = burst
        self.tokens = burst
        self._last = now
        self._sleepers = 0
        self._credit_until = -math.inf
        self._window = _Window()
        self.short_at = -math.inf
        self.granted = 0

    def refill(self, now: float, rate: float) -> None:
        elapsed = now - self._last
        if elapsed <= 0:
            return
        self._last = now
        tokens = self.tokens + elapsed * rate
        if elapsed > MAX_STEP:
            # Idle time or a step of the clock: which, the bucket cannot tell, so it
            # owes no late wake-up anything. (The window is left as it is: moving its
            # grants along with a step would keep them in it forever at rates of 1/s
            # and below, where every wait is that long, and after every idle spell.)
            cap = self.burst
        elif self._sleepers or now <= self._credit_until:
            cap = self.burst + rate * MAX_LATE
        else:
            cap = self.burst
        self.tokens = min(tokens, cap)

    def take_many(self, now: float, rate: float, n: int) -> int:
        """Take up to ``n`` tokens, as many as the bucket and the window allow now,
        without waiting; how many were taken."""
        self.refill(now, rate)
        room = self._window.room(now, rate + self.burst)
        got = min(n, int(self.tokens + TOKEN_EPSILON), room)
        if got > 0:
            self.tokens -= got
            self._credit_until = now + CREDIT_SECONDS
            self._window.record(now, got)
            self.granted += got
        if got == room < n:
            # The window held the caller back, not the tokens: what accrued meanwhile
            # is not owed to anyone (a hoard would burst out when the rate rises).
            self.tokens = min(self.tokens, self.burst)
        if got < n:
            self.short_at = now
        return got

    def take(self, now: float, rate: float) -> float:
        """Take a token and return 0.0, or return the seconds until one may be taken."""
        if self.take_many(now, rate, 1):
            return 0.0
        wait = (1 - TOKEN_EPSILON - self.tokens) / rate
        return max(wait, self._window.delay(now, rate + self.burst), 1e-6)

    def drain(self) -> None:
        self.tokens = min(self.tokens, 0.0)
        self._credit_until = -math.inf

    async def wait(self, clock: Callable[[], float], rate: Callable[[], float]) -> None:
        """Sleep until a token may be taken, and take it."""
        while (delay := self.take(clock(), rate())) > 0:
            self._sleepers += 1
            try:
                await asyncio.sleep(delay)
                # Still counted as sleeping: what accrued while it slept is owed to it,
                # and stays on offer to the callers that follow it at once.
                now = clock()
                self.refill(now, rate())
                self._credit_until = now + CREDIT_SECONDS
            finally:
                self._sleepers -= 1


class AIMDRateLimiter:
    """A token bucket whose rate adapts to the remote service: additive increase,
    multiplicative decrease (AIMD), clamped to ``[min_rate, max_rate]`` per second.

    `backoff` (on a rate-limit error) multiplies the rate by ``decrease``; several
    errors within one ``interval`` count once, since they usually answer requests sent
    before the first one. `success` raises the rate at most once per ``interval``, not
    within an interval of a decrease nor before a Retry-After has passed, and only
    while the rate is what holds the state back (a caller found the bucket empty).
    Before the first error it adds ``increase``; after one, it climbs back fast to just
    below the allowance the server was measured to grant, holds there, and probes
    above it now and then (`jorbmp._aimd`; it measures per second, so a service that
    counts per minute is followed poorly: 66% of its allowance in simulation, see
    there). ``clock`` is injectable for tests; only its
    forward steps count (see `_tick`).

    Every parameter must be a finite number (not a bool): ``MIN_RATE <= min <=
    initial <= max``, ``increase >= 0``, ``0 < decrease < 1``, ``interval >=
    MIN_INTERVAL``, ``burst >= 1``;
    anything else raises ``ValueError`` naming the parameter, so the rate can never
    leave ``[min, max]``.
    """

    __slots__ = ("_bucket", "_clock", "_clock_last", "_control", "_now", "burst")

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
        if min_f < MIN_RATE:
            raise ValueError(f"{owner} min must be >= {MIN_RATE:g} per second, got {min!r}")
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
        if not interval_f >= MIN_INTERVAL:
            raise ValueError(
                f"{owner} interval must be >= {MIN_INTERVAL:g} seconds, got {interval!r}"
            )
        burst_f = _number(owner, "burst", burst)
        if burst_f < 1:
            raise ValueError(f"{owner} burst must be >= 1, got {burst!r}")
        if not callable(clock):
            raise ValueError(f"{owner} clock must be a callable returning seconds, got {clock!r}")
        self.burst = burst_f
        self._clock = clock
        self._clock_last = _number(owner, "clock()", clock())
        now = self._now = self._clock_last
        self._bucket = _Bucket(burst_f, now)
        self._control = AimdControl(
            initial_f, min_f, max_f, increase_f, decrease_f, interval_f, now
        )

    @property
    def rate(self) -> float:
        """The current rate, per second."""
        return self._control.rate

    @property
    def min_rate(self) -> float:
        return self._control.min_rate

    @property
    def max_rate(self) -> float:
        return self._control.max_rate

    @property
    def increase(self) -> float:
        return self._control.increase

    @property
    def decrease(self) -> float:
        return self._control.decrease

    @property
    def interval(self) -> float:
        return self._control.interval

    @property
    def allowance(self) -> float | None:
        """The rate the remote service was measured to allow at the last rate-limit
        error, per second; None before one (or once probing found it had grown)."""
        return self._control.allowance

    def _tick(self) -> float:
        """The limiter's own time: the clock's forward steps only.

        ``time.monotonic`` (the default) never steps back, but an injected clock
        (``time.time`` under NTP, a test clock) may. A backward step counts as no time
        passing, instead of draining the bucket into a debt as long as the jump and
        freezing increases until the clock catches up; a forward step longer than
        `MAX_STEP` fills the bucket to its burst only (`_Bucket.refill`), though the
        grants before it leave the window at once, so the real second around a step
        may hold up to twice ``rate + burst`` (use a monotonic clock to avoid it);
        a non-finite reading is ignored.
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
        self._bucket.refill(now, self._control.rate)
        return now

    def _rate(self) -> float:
        return self._control.rate

    def try_acquire(self) -> float:
        """Take a token and return 0.0, or return the seconds until one is available."""
        return self._bucket.take(self._tick(), self._control.rate)

    def _take(self, n: int) -> int:
        """Take up to ``n`` tokens without waiting; how many were taken (the gate's
        dispatch of several jobs per wake-up)."""
        return self._bucket.take_many(self._tick(), self._control.rate, n)

    def has_capacity(self, amount: float = 1) -> bool:
        self._refill()
        return self._bucket.tokens >= amount

    async def acquire(self) -> None:
        """Wait until a token is available and take it.

        Waits with ``asyncio.sleep``, i.e. in the event loop's seconds, which are
        ``time.monotonic``'s: an injected clock must advance in real time for this to
        return (tests drive `try_acquire` instead). A wake-up that comes late is
        handed the tokens that accrued meanwhile (see `_Bucket`), so the rate holds
        however coarse the loop's timers are.
        """
        await self._bucket.wait(self._tick, self._rate)

    def backoff(self, retry_after: float | None = None) -> None:
        """Record a rate-limit error: cut the rate (once per interval) and drain the
        bucket. ``retry_after`` (seconds, the server's Retry-After): no increase
        before it has passed."""
        now = self._refill()  # what accrued so far, at the rate before the cut
        self._bucket.drain()
        self._control.backed_off(now, retry_after)

    def success(self) -> None:
        """Record a successful exec: raise the rate, at most once per interval, if
        the rate was what held the state back (see the class)."""
        now = self._refill()  # what accrued so far, at the rate before the increase
        bucket = self._bucket
        self._control.succeeded(now, bucket.short_at, bucket.granted)

    def __repr__(self) -> str:
        control = self._control
        allowance = "" if control.allowance is None else f" allowance={control.allowance:g}/s"
        return (
            f"<AIMDRateLimiter rate={control.rate:g}/s "
            f"[{control.min_rate:g}..{control.max_rate:g}]{allowance} "
            f"tokens={self._bucket.tokens:.2f}>"
        )


class SteadyRate:
    """``rate_limit=<number>``: a token bucket of ``rate`` per second, burst 1.

    Computed from elapsed time (`_Bucket`): a wake-up that comes late hands out every
    token that accrued while its caller slept, so the delivered rate does not depend on
    how late the loop's timers fire, yet any window of one second holds at most
    ``rate + 1`` grants, and an idle spell never turns into a burst beyond one.
    """

    __slots__ = ("_bucket", "interval", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.interval = 1.0 / rate
        self._bucket = _Bucket(1.0, time.monotonic())

    def _rate(self) -> float:
        return self.rate

    async def acquire(self) -> None:
        await self._bucket.wait(time.monotonic, self._rate)

    def take(self, n: int) -> int:
        """Take up to ``n`` tokens without waiting; how many were taken."""
        return self._bucket.take_many(time.monotonic(), self.rate, n)

    def __repr__(self) -> str:
        return f"<SteadyRate {self.rate:g}/s tokens={self._bucket.tokens:.2f}>"


class RateGate:
    """What the coordinator awaits before each dispatch of a rate-limited state.

    An ``aiolimiter.AsyncLimiter`` binds itself to the first event loop it runs on,
    and every exec runs a loop of its own: the gate rebinds it to the current loop
    (`_rebind`) before its first use there, so a limiter kept across execs (the
    resume pattern) neither warns nor keeps waiters of a closed loop.
    """

    __slots__ = ("_loop", "aimd", "limiter")

    def __init__(self, limiter: AsyncLimiter | AIMDRateLimiter | SteadyRate) -> None:
        self.limiter = limiter
        self.aimd = limiter if isinstance(limiter, AIMDRateLimiter) else None
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self, n: int) -> int:
        """Take up to ``n`` tokens without waiting; how many were taken.

        An ``AsyncLimiter`` has no way to take without awaiting: it answers 0, and its
        state takes each token in `acquire` (which does not suspend while the bucket
        has room).
        """
        limiter = self.limiter
        if isinstance(limiter, SteadyRate):
            return limiter.take(n)
        if isinstance(limiter, AIMDRateLimiter):
            return limiter._take(n)
        return 0

    def rate(self) -> float:
        """The limit's current rate per second, for the status."""
        limiter = self.limiter
        if isinstance(limiter, AsyncLimiter):
            return float(limiter.max_rate) / float(limiter.time_period)
        return float(limiter.rate)

    async def acquire(self) -> None:
        limiter = self.limiter
        if isinstance(limiter, AsyncLimiter):
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                _rebind(limiter, loop)
                self._loop = loop
        await limiter.acquire()

    def backoff(self, retry_after: float | None = None) -> None:
        """A rate-limit error (with the server's Retry-After, if it gave one)."""
        if self.aimd is not None:
            self.aimd.backoff(retry_after)

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
        if rate < MIN_RATE:
            raise ValueError(f"{where} must be >= {MIN_RATE:g} per second, got {rate_limit!r}")
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


def _rebind(limiter: AsyncLimiter, loop: asyncio.AbstractEventLoop) -> None:
    """Move an ``AsyncLimiter`` bound to a closed event loop onto ``loop``.

    This is what aiolimiter (1.2+) itself does when it finds its loop closed, less its
    "re-used across loops" warning: drop the waiters and the wake-up timer of the
    closed loop (nothing can wait on a closed loop), keep the bucket's level, which is
    in ``time.monotonic`` seconds on every asyncio loop. A limiter bound to a loop
    that is still open (another thread's) is left alone, and so is a version of
    aiolimiter that keeps no loop.
    """
    bound = getattr(limiter, "_event_loop", None)
    if bound is None or bound is loop or not isinstance(bound, asyncio.AbstractEventLoop):
        return
    if not bound.is_closed():
        return
    waiters = getattr(limiter, "_waiters", None)
    limiter._event_loop = loop
    if isinstance(waiters, list):
        limiter._waiters = [w for w in waiters if w[-1].get_loop() is loop]
    if hasattr(limiter, "_waker_handle"):
        limiter._waker_handle = None
