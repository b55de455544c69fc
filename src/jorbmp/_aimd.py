"""The AIMD controller: when the rate of an `AIMDRateLimiter` goes up or down, and how far.

Plain AIMD (halve the rate on a rate-limit error, add a fixed step while requests
succeed) saws between half a server's allowance and a little over it: against a
server allowing 50 requests in any second it got 79-81% of them through, with a 429
every few seconds. This controller keeps AIMD's reactions, and learns the allowance:

- **The allowance is measured.** A rate-limit error says the server's window is full:
  the successes of the last `ALLOWANCE_SECONDS` are what it lets through. The cut
  takes ``decrease`` times the smaller of that and the rate, so a rate that had
  climbed far past the allowance does not stay past it after the cut.
- **Recovery is fast, up to just below it.** Each interval closes `RECOVERY` of the gap
  to the holding level, a share of the allowance (`HEADROOM` at first), as BIC and
  CUBIC TCP climb back fast to the window where the last loss happened and slowly
  beyond it. A server counts arrivals, not our grants: a request delayed on its way
  (a busy machine, a stalled server) arrives with the next ones, and a second there
  holds more than it did here. An error while holding that level says so: the share
  drops by `HEADROOM_STEP` (down to `MIN_HEADROOM`), and climbs back by as much after
  each probe delay without one. Errors on the way back after a cut do not count: they
  answer the cut's own aftermath (a drop of the allowance errs for several intervals).
- **Probing starts soon after a change, and backs off while the allowance holds.**
  After the probe delay at that level without an error, the rate creeps up by
  `PROBE_STEP` of the allowance, doubling each interval, to find out whether the limit
  was raised; a probe past it costs an error or two. The delay is `PROBE_FIRST` after
  an error that measured a new allowance (a drop may be brief: 500/s, 5/s for 10 s,
  500/s again), and doubles, up to `PROBE_AFTER`, with each error that measured the
  same one again (a fixed limit: about one probe in 30 s). Successes that keep pace
  past the allowance (by more than `_margin`), or steps as large as
  ``increase``, mean the allowance is stale: it is forgotten, and the rate climbs by
  ``increase`` as before the first error.
- **No growth unless the rate was what held the state back** (as TCP does not grow a
  window the sender does not fill, RFC 7661, and Netflix's concurrency-limits
  ``AIMDLimit`` grows only while requests in flight fill it): a caller found the
  bucket empty within the last interval, and the state used at least `USED_SHARE` of
  the rate's tokens since the last decision. A state held back by its concurrency or by slow jobs
  keeps its rate (at most about a tenth above what it uses), instead of climbing to
  ``max`` and bursting once the jobs speed up.
- **Retry-After is honoured:** the job waits it out (the coordinator), and the rate
  does not grow before it has passed.

**The allowance is measured per second: a limitation.** A server that counts per 10 s
or per minute answers 429 for the rest of its window once it is full, so the last
second's successes at those errors are 0 or 1: fewer than `GRAIN`, while the last
`LONG_SECONDS` held more, leave the allowance as it was, instead of taking it down to
``min``. Simulated (1 ms steps, a deep queue,
``AIMDRateLimiter(10, 1, 100)``, 300 s): 100 per 10 s, 94% of it through (b06c975:
29%); 600 per minute, 66% (46%): a minute's window stays full for most of a minute
after each probe that fills it. A floor of the successes of the last 10 s did no
better, and kept the level high for 10 s after a drop of a per-second allowance (500/s
to 5/s): 100-160 429s a second instead of a few in all. The price of the longer
span: an allowance that drops to about one a second is learned only once those 10 s
show it (10/s to 1/s: 24 429s in the next 90 s, b06c975 4).

Everything here is arithmetic on the times it is given: the limiter passes its own
clock's readings, and tests step them.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["AimdControl"]

# Seconds of successes that measure the allowance at a rate-limit error: the window
# most servers count in. A longer one would average in seconds before the limit.
ALLOWANCE_SECONDS = 1.0
# The share of the measured allowance the rate returns to and holds, at first: close
# enough to use nearly all of it, far enough that the timing jitter of requests on
# their way (a few ms of a second) does not fill the server's window.
HEADROOM = 0.97
# How far the share drops after an error at or below the holding level (jitter beyond
# the headroom), and the least it drops to.
HEADROOM_STEP = 0.02
MIN_HEADROOM = 0.85
# The share of the gap to the holding level closed per interval after a cut: back
# within about three intervals, each smaller than the one before.
RECOVERY = 0.75
# Seconds at the holding level without an error before probing above it, at most. Each
# probe past a fixed limit costs an error or two; this many seconds keeps them to about
# one in 30 s, at the price of finding a raised limit that much later.
PROBE_AFTER = 30.0
# The probe delay after an error that measured a new allowance; it doubles with each
# error that measures the same one again (within `_margin` of it), up to PROBE_AFTER.
PROBE_FIRST = 2.0
# Allowances closer than this share (or than `GRAIN` successes a second, the count's
# grain at low rates) are the same one. Successes in a second beyond the allowance by
# more than that say the server lets more through than it did: it is forgotten.
SAME_ALLOWANCE = 0.1
GRAIN = 1.5
# Seconds of the longer success tally that tells a service allowing about one a second
# from one whose longer window is full (see `AimdControl.backed_off`).
LONG_SECONDS = 10.0
# The first probe step, as a share of the allowance; it doubles every interval.
PROBE_STEP = 0.01
# Bins of the success tally per `ALLOWANCE_SECONDS`: its count is exact to a tenth.
TALLY_BINS = 10
# The share of the rate's tokens a state must have taken since the last decision for
# the rate to count as what holds it back. One held to its rate takes 99% and more;
# one held to 80% by its concurrency (a caller still waits now and then, when two
# slots free at once) must not grow the rate.
USED_SHARE = 0.9


def _margin(allowance: float) -> float:
    """How far from ``allowance`` a measurement still counts as the same allowance."""
    return max(SAME_ALLOWANCE * allowance, GRAIN / ALLOWANCE_SECONDS)


class _Tally:
    """Events in the last ``seconds``, counted in `TALLY_BINS` bins (cheap at any rate).

    The oldest bin, partly out of the window, counts for the share still in it (as if
    its events were spread evenly): dropping it whole would count up to a bin's worth
    fewer, and an allowance measured that much low would be held for `PROBE_AFTER`.
    """

    __slots__ = ("_bins", "_count", "_width", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._width = seconds / TALLY_BINS
        self._bins: deque[list[float]] = deque()  # [start, count]
        self._count = 0

    def add(self, now: float) -> None:
        bins = self._bins
        if bins and 0 <= now - bins[-1][0] < self._width:
            bins[-1][1] += 1
        else:
            self._expire(now)
            bins.append([now, 1])
        self._count += 1

    def count(self, now: float) -> float:
        self._expire(now)
        bins = self._bins
        if not bins:
            return 0.0
        start, n = bins[0]
        outside = (now - self.seconds - start) / self._width  # of the oldest bin
        return self._count - n * min(1.0, max(0.0, outside))

    def _expire(self, now: float) -> None:
        bins, horizon = self._bins, now - self.seconds - self._width
        while bins and bins[0][0] <= horizon:
            self._count -= int(bins.popleft()[1])


class AimdControl:
    """The rate of an `AIMDRateLimiter`, and the rules that move it (see the module).

    ``rate`` stays within ``[min_rate, max_rate]``; ``allowance`` is the server's
    measured allowance per second (None until the first rate-limit error, or once
    probing found it stale).
    """

    __slots__ = (
        "_granted",
        "_headroom",
        "_hold_until",
        "_last_decision",
        "_last_decrease",
        "_level_since",
        "_long",
        "_probe_after",
        "_probes",
        "_successes",
        "allowance",
        "decrease",
        "increase",
        "interval",
        "max_rate",
        "min_rate",
        "rate",
    )

    def __init__(
        self,
        rate: float,
        min_rate: float,
        max_rate: float,
        increase: float,
        decrease: float,
        interval: float,
        now: float,
    ) -> None:
        self.rate = rate
        self.min_rate = min_rate
        self.max_rate = max_rate
        self.increase = increase
        self.decrease = decrease
        self.interval = interval
        self.allowance: float | None = None
        self._last_decision = now  # the last time growth was considered
        self._granted = 0  # tokens granted, as of then
        self._last_decrease = -math.inf
        self._hold_until = now  # no increase before (a cut's interval, a Retry-After)
        self._headroom = HEADROOM  # the share of the allowance held
        self._level_since: float | None = None  # when the rate reached the holding level
        self._probes = 0  # probe steps since then
        self._probe_after = PROBE_FIRST  # seconds at the level before probing
        self._successes = _Tally(ALLOWANCE_SECONDS)
        self._long = _Tally(LONG_SECONDS)

    def _clamp(self, rate: float) -> float:
        return min(self.max_rate, max(self.min_rate, rate))

    def _level(self, allowance: float) -> float:
        """The rate held below ``allowance``."""
        return min(self.max_rate, self._headroom * allowance)

    def succeeded(self, now: float, short_at: float, granted: int) -> None:
        """A successful exec at ``now``. ``short_at``: the last time a caller found the
        bucket empty; ``granted``: the tokens it has granted in all."""
        self._successes.add(now)
        self._long.add(now)
        if now < self._hold_until or now - self._last_decision < self.interval:
            return
        span = now - self._last_decision
        # The limiter keeps rate and interval normal floats; still, a product that
        # underflows is no reason to lose an exec's result to ZeroDivisionError.
        offered = self.rate * span
        used = (granted - self._granted) / offered if offered > 0 else 1.0
        # A cut within the span holds callers back by itself (the grants made at the
        # old rate fill the window of the new one): low use then is the cut's doing.
        cut = self._last_decrease >= self._last_decision
        self._last_decision, self._granted = now, granted
        if self.increase <= 0 or now - short_at > self.interval:
            return  # nobody waited for a token: the rate is not what holds them back
        if used < USED_SHARE and not cut:
            return  # tokens went unused: something else holds the state back
        self.rate = self._clamp(self._next_rate(now))

    def _next_rate(self, now: float) -> float:
        rate, allowance = self.rate, self.allowance
        if allowance is None:
            return rate + self.increase
        level = self._level(allowance)
        if rate < level:
            rate += RECOVERY * (level - rate)
            if level - rate < PROBE_STEP * allowance:
                rate = level
            return rate
        if self._level_since is None:
            self._level_since = now
        if now - self._level_since < self._probe_after:
            return rate
        if self._successes.count(now) / ALLOWANCE_SECONDS >= allowance + _margin(allowance):
            self.allowance = None  # successes keep pace well past it: it grew
            return rate + self.increase
        if self._probes == 0 and self._headroom < HEADROOM:
            # A probe delay without an error: take back one step of headroom first.
            self._headroom = min(HEADROOM, self._headroom + HEADROOM_STEP)
            self._level_since = now
            return self._level(allowance)
        step = math.ldexp(PROBE_STEP * allowance, self._probes)  # doubling
        self._probes += 1
        if step >= self.increase:
            self.allowance = None  # probed far past it without an error: it grew
            return rate + self.increase
        return rate + step

    def backed_off(self, now: float, retry_after: float | None) -> bool:
        """A rate-limit error at ``now``: cut the rate, unless an earlier error within
        the interval already did (they answer requests sent before the first cut).
        True if it cut."""
        if retry_after is not None and retry_after > 0:
            self._hold_until = max(self._hold_until, now + retry_after)
        if now - self._last_decrease < self.interval:
            return False
        previous = self.allowance
        if (
            previous is not None
            and self._level_since is not None
            and self.rate <= self._level(previous) * 1.001
        ):
            # Holding, not probing: the server's count ran ahead of ours by more than
            # the headroom. (On the way back after a cut, the rate is below the level
            # because of the cut: such an error says nothing about the headroom.)
            self._headroom = max(MIN_HEADROOM, self._headroom - HEADROOM_STEP)
        measured = self._successes.count(now) / ALLOWANCE_SECONDS
        if measured > 0 and (
            measured >= GRAIN / ALLOWANCE_SECONDS
            or previous is None
            or self._long.count(now) / LONG_SECONDS < GRAIN / ALLOWANCE_SECONDS
        ):
            # Fewer successes than GRAIN a second, while the last `LONG_SECONDS` held
            # more, are too few to measure: a server counting per 10 s or per minute
            # answers 429 for the rest of its window once it is full, and an allowance
            # taken from them fell to ``min`` for minutes. A service that lets one a
            # second through shows as much over the longer span as well.
            self.allowance = self._clamp(measured)
        allowance = self.allowance
        if (
            previous is not None
            and allowance is not None
            and abs(allowance - previous) <= _margin(previous)
        ):
            self._probe_after = min(PROBE_AFTER, 2 * self._probe_after)  # it holds
        else:
            self._probe_after = PROBE_FIRST  # a new allowance: it may change back soon
        base = self.rate if self.allowance is None else min(self.rate, self.allowance)
        self.rate = self._clamp(base * self.decrease)
        self._last_decrease = now
        self._hold_until = max(self._hold_until, now + self.interval)
        self._level_since = None
        self._probes = 0
        return True

    def __repr__(self) -> str:
        allowance = "?" if self.allowance is None else f"{self.allowance:g}/s"
        return f"<AimdControl rate={self.rate:g}/s allowance={allowance}>"
