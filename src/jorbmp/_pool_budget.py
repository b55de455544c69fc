"""One process pool's part of the run's CPU budget (`PoolBudget`, over
`jorbmp._cpus.CpuBudget`).

The pool's `jorbmp._pool_slots.Slots` holds one budget slot for each worker that
holds a batch (acquired when an idle worker is taken for one, released when its last
batch is back, when it is gone, or when the pool closes), so the state's slots held
are always its busy workers. A release hands the freed core on at once: the lanes the
budget names as `hungry` are settled (pumped on the next loop iteration, with any
other lane that changed), not left until the next result or tick.
"""

from __future__ import annotations

from collections.abc import Callable

from ._cpus import CpuBudget

__all__ = ["PoolBudget"]


class PoolBudget:
    """State ``name``'s view of ``budget``; ``wake(state)`` settles that state's lane."""

    __slots__ = ("budget", "name", "wake")

    def __init__(self, budget: CpuBudget, name: str, wake: Callable[[str], None]) -> None:
        self.budget = budget
        self.name = name
        self.wake = wake

    def __repr__(self) -> str:
        return f"<PoolBudget {self.name!r} {self.budget!r}>"

    def demand(self, waiting: int, mean_seconds: float | None) -> None:
        """Jobs of the state waiting now, and its mean exec time (cheap)."""
        self.budget.demand(self.name, waiting, mean_seconds)

    def cap(self, limit: int) -> None:
        """The state's controller moved its limit to ``limit``."""
        self.budget.cap(self.name, limit)

    def admits(self) -> int:
        """How many idle workers could start an exec now."""
        return self.budget.admits(self.name)

    def share(self) -> int:
        """Slots the state may hold now."""
        return self.budget.share(self.name)

    def yields(self) -> bool:
        """Whether the state's busy workers should take no second batch now."""
        return self.budget.yields(self.name)

    def acquire(self) -> bool:
        """A slot for one worker to start executing, if the budget allows it now."""
        return self.budget.acquire(self.name)

    def release(self, wake: bool = True) -> None:
        """Give back a worker's slot; with ``wake``, pump the lanes that can use it."""
        self.budget.release(self.name)
        if wake:
            self.wake_hungry()

    def wake_hungry(self) -> None:
        """Pump the lanes that could use a free core now. Also called each tick: shares
        move without a release too (a state's demand drops, a starving one falls due),
        and a state kept from free cores that way waited for the next release, which a
        rate-limited state sharing the budget made one per token."""
        for name in self.budget.hungry():
            self.wake(name)
