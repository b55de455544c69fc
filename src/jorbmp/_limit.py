"""One state's concurrency limit: fixed, or set by its adaptive controller as it goes.

The coordinator's loop only asks a lane for its current limit; the controller
(`jorbmp.adaptive.ConcurrencyController`) sees the state's metrics at each
housekeeping tick and may move it. The slot-seconds the limit allowed over the run are
kept too: a state's utilisation is its busy slot-seconds over them, so an adaptive
state held at 8 of a maximum of 256 is not reported 3% busy.
"""

from __future__ import annotations

import math

from .adaptive import AdaptiveConcurrency, ConcurrencyController, LimitHistory

__all__ = ["StateLimit", "rate_ceiling"]

# A rate-limited adaptive state's limit rises to at most this many times the slots its
# rate keeps busy (rate x mean exec time, Little's law), plus one: room for bursts and
# for exec times that grow, while the slow start cannot double far past what the
# tokens could ever keep busy (at 5/s and 20 ms execs it reached 32 threads).
RATE_HEADROOM = 2.0


def rate_ceiling(rate: float, mean_seconds: float) -> int | None:
    """The most slots a state limited to ``rate`` per second could use, or None."""
    need = RATE_HEADROOM * rate * mean_seconds
    return math.ceil(need) + 1 if math.isfinite(need) else None


class StateLimit:
    """A state's limit on execs at once (`current`), within [1, `maximum`]."""

    __slots__ = (
        "_area",
        "_held",
        "_held_free",
        "_held_time",
        "_since",
        "controller",
        "current",
        "maximum",
    )

    def __init__(self, concurrency: int | AdaptiveConcurrency, now: float) -> None:
        self.controller: ConcurrencyController | None = None
        if isinstance(concurrency, AdaptiveConcurrency):
            self.controller = ConcurrencyController(concurrency)
            self.current, self.maximum = self.controller.limit, concurrency.max
        else:
            self.current = self.maximum = concurrency
        self._area = 0.0  # limit x seconds, up to `_since`
        self._since = now
        # Slot-seconds free slots spent waiting for a rate limit's token (see `update`),
        # and the free slots held so at the last update, and its time.
        self._held, self._held_free, self._held_time = 0.0, 0, now

    def __repr__(self) -> str:
        kind = "adaptive" if self.controller is not None else "fixed"
        return f"<StateLimit {kind} {self.current}/{self.maximum}>"

    def capacity_seconds(self, now: float) -> float:
        """Slot-seconds the limit allowed since the run started."""
        return self._area + self.current * max(0.0, now - self._since)

    def update(
        self,
        now: float,
        processed: int,
        exec_seconds: float,
        saturated: bool,
        held_free: int = 0,
        ceiling: int | None = None,
    ) -> bool:
        """Let the controller see the state's cumulative execs and exec seconds, whether
        jobs wait for a slot now, how many slots are free only because jobs wait for a
        rate limit's token (``held_free``), and the most slots of use (``ceiling``, see
        `rate_ceiling`); True if the limit moved.

        A slot kept free by the rate limit is a slot held by it: its seconds count as
        exec seconds, so that above the limit a rate needs, each slot's time per job
        grows as limit / rate, as queueing for any other resource does, and the
        controller settles at the least limit that keeps up with the rate (with the
        exec time alone, 2 and 4 slots at 30/s of 100 ms execs were a tie).
        """
        if self.controller is None:
            return False
        self._held += self._held_free * max(0.0, now - self._held_time)
        self._held_free, self._held_time = held_free, now
        limit = self.controller.update(processed, exec_seconds + self._held, saturated, ceiling)
        if limit == self.current:
            return False
        self._area = self.capacity_seconds(now)
        self._since = now
        self.current = limit
        return True

    def history(self) -> LimitHistory | None:
        """The controller's limits over the run (None for a fixed limit)."""
        return None if self.controller is None else self.controller.history
