"""How a run stops or pauses: the part of the coordinator that holds dispatch back.

A run stops gracefully (a Ctrl-C or SIGTERM, or no space for its checkpoint within
its patience): no new dispatches, in-flight execs finish within the grace period;
at once (a second Ctrl-C, the grace period over: executing jobs stay in their prior
state); or fails (an error on the loop). It pauses, without stopping, while its
checkpoint cannot be written (`jorbmp._checkpoint_guard`).

A mixin of `jorbmp._coordinator.Coordinator`, as `jorbmp._transitions.Transitions`
is, rather than an object of its own: the flags it sets are read on every pump
(`held`) and in the transitions, and the processor's signal handlers call it on the
coordinator; through ``self`` they stay one attribute lookup away.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ._checkpoint_guard import CheckpointGuard
from .errors import CheckpointSpaceError

if TYPE_CHECKING:
    from ._lane import Lane

__all__ = ["Stopping"]

log = logging.getLogger("jorbmp")


class Stopping:
    """Stops, abandons, fails and pauses a run (see `Coordinator`, which owns the
    state named below)."""

    lanes: dict[str, Lane]
    guard: CheckpointGuard
    grace: float
    done: asyncio.Future[str]
    stopping: bool
    abandoning: bool
    paused: bool
    changed: bool

    def settle(self, lane: Lane) -> None:
        raise NotImplementedError

    def executing(self) -> int:
        """Execs in flight in every state: what a graceful stop waits for."""
        return sum(lane.backend.executing() for lane in self.lanes.values() if lane.backend)

    def held(self) -> bool:
        """No new dispatches: stopping, or paused while the checkpoint cannot be written."""
        return self.stopping or self.paused

    def checkpoint_changed(self) -> None:
        """The guard paused or resumed dispatch: show it, and on resuming pump every lane
        (jobs queued meanwhile) and see whether the run is complete."""
        self.paused = self.guard.paused
        self.changed = True
        if not self.paused and not self.done.done():
            for lane in self.lanes.values():
                self.settle(lane)

    def checkpoint_given_up(self, error: CheckpointSpaceError) -> None:
        """No space for the checkpoint within its patience: stop gracefully; the final
        write (`final_writes`) then raises ``error``."""
        self.request_stop()

    def request_stop(self) -> None:
        """Stop dispatching; let in-flight execs finish within the grace period."""
        if self.done.done():
            self.stopping = True  # (ends a wait for space for the final write)
            return
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: waiting up to %gs for %d executing jobs", self.grace, self.executing())
        for lane in self.lanes.values():
            if lane.gate_task is not None:
                lane.gate_task.cancel()
        if self.executing() == 0:
            self.done.set_result("stopped")
        else:
            asyncio.get_running_loop().call_later(self.grace, self.abandon)

    def abandon(self) -> None:
        """Give up on executing jobs now; they stay in their prior state."""
        self.stopping = True
        if not self.done.done():
            self.abandoning = True
            self.done.set_result("stopped")

    def fail(self, exc: BaseException) -> None:
        self.stopping = True
        if not self.done.done():
            self.done.set_exception(exc)
