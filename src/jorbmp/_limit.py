"""One state's concurrency limit: fixed, or set by its adaptive controller as it goes.

The coordinator's loop only asks a lane for its current limit; the controller
(`jorbmp.adaptive.ConcurrencyController`) sees the state's metrics at each
housekeeping tick and may move it. The slot-seconds the limit allowed over the run are
kept too: a state's utilisation is its busy slot-seconds over them, so an adaptive
state held at 8 of a maximum of 256 is not reported 3% busy.
"""

from __future__ import annotations

from .adaptive import AdaptiveConcurrency, ConcurrencyController, LimitHistory

__all__ = ["StateLimit"]


class StateLimit:
    """A state's limit on execs at once (`current`), within [1, `maximum`]."""

    __slots__ = ("_area", "_since", "controller", "current", "maximum")

    def __init__(self, concurrency: int | AdaptiveConcurrency, now: float) -> None:
        self.controller: ConcurrencyController | None = None
        if isinstance(concurrency, AdaptiveConcurrency):
            self.controller = ConcurrencyController(concurrency)
            self.current, self.maximum = self.controller.limit, concurrency.max
        else:
            self.current = self.maximum = concurrency
        self._area = 0.0  # limit x seconds, up to `_since`
        self._since = now

    def __repr__(self) -> str:
        kind = "adaptive" if self.controller is not None else "fixed"
        return f"<StateLimit {kind} {self.current}/{self.maximum}>"

    def capacity_seconds(self, now: float) -> float:
        """Slot-seconds the limit allowed since the run started."""
        return self._area + self.current * max(0.0, now - self._since)

    def update(self, now: float, processed: int, exec_seconds: float, saturated: bool) -> bool:
        """Let the controller see the state's cumulative execs and exec seconds, and
        whether jobs wait for a slot now; True if the limit moved."""
        if self.controller is None:
            return False
        limit = self.controller.update(processed, exec_seconds, saturated)
        if limit == self.current:
            return False
        self._area = self.capacity_seconds(now)
        self._since = now
        self.current = limit
        return True

    def history(self) -> LimitHistory | None:
        """The controller's limits over the run (None for a fixed limit)."""
        return None if self.controller is None else self.controller.history
