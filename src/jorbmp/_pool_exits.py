"""How workers leave a `jorbmp._pool.ProcessPool` (`Exits`): let go, lost, or closed.

A worker leaves the pool in one of three ways, each ending with its exit reaped:

- let go while idle (`Exits.retire`): recycled once what it holds is back
  (`jorbmp._pool_recycle`), beyond the state's share of a CPU budget, or idle for
  `IDLE_RETIRE_SECONDS` in an adaptive state. Its exit charges nobody and replaces
  nobody;
- lost: its socket closed, its process exited, or it could not be sent its work. Its
  death is settled (`jorbmp._pool_deaths`) and a replacement starts (`jorbmp._pool_spawner`);
- closed with the pool (`Exits.close`, `Exits.wait_closed`).

The pool keeps dispatch and results; this module keeps which workers stay, so that
the pool's per-batch path calls in here only when a worker may be leaving.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ._backends import Sink
from ._pool_budget import PoolBudget
from ._pool_deaths import kill_blaming_nobody, killed_by_stop, settle
from ._pool_recycle import Recycler
from ._pool_slots import Slots
from ._pool_spawner import Spawner
from ._pool_worker import Worker
from ._protocol import SLOT_CLOSING

__all__ = ["EXIT_WAIT", "IDLE_RETIRE_SECONDS", "Exits"]

log = logging.getLogger("jorbmp")

# Seconds to wait for a worker to exit on its own before it is killed.
EXIT_WAIT = 2.0
# An adaptive state's worker idle this long goes (a fixed state keeps its workers):
# a state whose jobs ran out leaves no idle worker behind, and one that gets more
# later forks again in a few milliseconds.
IDLE_RETIRE_SECONDS = 1.0


class Exits:
    """The exits of one pool's workers: which go, and what their going settles.

    Shares the pool's live ``workers`` (the same dict) and its `Slots` and `Spawner`;
    owns the workers let go until their exit is reaped (``leaving``)."""

    loop: asyncio.AbstractEventLoop  # (the pool's, from `start`)

    def __init__(
        self,
        state: str,
        workers: dict[Worker, None],
        slots: Slots,
        spawner: Spawner,
        sink: Sink,
        recycler: Recycler | None,
        cpu: PoolBudget | None,
        forkserver: bool,
    ) -> None:
        self.state = state
        self.workers = workers
        # Workers let go while idle (`retire`), until their exit is reaped.
        self.leaving: dict[Worker, None] = {}
        self.slots = slots
        self.spawner = spawner
        self.sink = sink
        self.recycler = recycler
        self.cpu = cpu
        # An adaptive state's pool (its limit was set): idle workers are let go.
        self.adaptive = False
        self.forkserver = forkserver
        self.closing = False
        self.closed_at = 0.0  # monotonic time of `close`

    def __repr__(self) -> str:
        return f"<Exits {self.state!r} leaving={len(self.leaving)}>"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def retire(self, worker: Worker) -> None:
        """Let an idle worker go: its socket closes (it exits on the EOF) and its exit
        is reaped when it comes, charging nobody and replacing nobody."""
        self.slots.withdraw(worker)
        del self.workers[worker]
        self.leaving[worker] = None
        worker.retired = True
        worker.slot[SLOT_CLOSING] = 1.0  # the EOF that follows is no death
        worker.link.close()
        worker.exit_timer = self.loop.call_later(EXIT_WAIT, worker.kill)
        self.spawner.lost(True)
        if self.sink.queued():
            # Jobs wait (for a core of the budget, or a token): the lane pumps again,
            # and starts a worker for them if it has none left.
            self.sink.freed()

    def recycle(self, worker: Worker) -> None:
        """``worker`` goes once what it holds is back (`jorbmp._pool_recycle`): it takes
        no more work, and its replacement may start now."""
        self.slots.withdraw(worker)
        worker.recycling = True
        self.spawner.outgoing += 1

    def recycles(self, worker: Worker) -> bool:
        """A batch of ``worker``'s is all back: whether it is being recycled. One whose
        last batch is back goes now, replacing nobody (its replacement started as jobs
        waited for it)."""
        recycler = self.recycler
        assert recycler is not None
        if not worker.recycling and recycler.over_memory(worker):
            self.recycle(worker)
        if worker.recycling and not worker.batches:
            self.spawner.outgoing -= 1
            self.sink.recycled()
            self.retire(worker)
        return worker.recycling

    def trim(self, worker: Worker) -> None:
        """``worker`` is idle now, inside a CPU budget: it goes if the state has more
        workers than it keeps (`keep`)."""
        if self.staying() > self.keep():
            self.retire(worker)

    def trim_idle(self) -> None:
        """The housekeeping tick: let idle workers go, beyond the state's share of a
        CPU budget, and in an adaptive state those idle for `IDLE_RETIRE_SECONDS`."""
        if self.cpu is not None:
            keep = self.keep()
            for worker in self.slots.idle():
                if self.staying() <= keep:
                    break
                self.retire(worker)
        if self.adaptive and not self.sink.queued():
            # Jobs ran out (a fixed state keeps its workers, as it always has). Not
            # while jobs wait, for a rate limit's token say: the last worker let go
            # then left the queue with nothing to start one again (a hang).
            idle_since = time.monotonic() - IDLE_RETIRE_SECONDS
            for worker in self.slots.idle():
                if worker.since < idle_since:
                    self.retire(worker)

    def staying(self) -> int:
        """Live workers that are not being recycled."""
        return len(self.workers) - self.spawner.outgoing

    def keep(self) -> int:
        """Workers the state keeps: its limit, and in a budget at most its share of it
        plus one idle worker ready for the next slot it gets. A rate-limited state keeps
        at least what its rate keeps busy: while it waits for a token its share drops to
        what it runs (it asks the budget for nothing then), and each result let a
        worker go that the next token started again (60 starts of a 0.3 s app context
        for 200 jobs at 30/s on 4 workers, 19.6/s instead of 28.3/s)."""
        limit = self.spawner.concurrency  # (the pool's limit: `ProcessPool.set_limit`)
        if self.cpu is None:
            return limit
        return min(limit, max(self.cpu.share(), self.sink.rate_slots()) + 1)

    def send_failed(self, worker: Worker, exc: OSError) -> None:
        # The worker may be alive but will never get its batch: replace it, blaming
        # nobody (its jobs go back to the queue).
        log.warning("state %r: cannot send to a worker (%s): replacing it", self.state, exc)
        self.slots.withdraw(worker)
        kill_blaming_nobody(worker)

    def link_closed(self, worker: Worker) -> None:
        # EOF: the worker is exiting. Its sentinel says when it is gone (and with what
        # exit code); waiting for that here would block the loop.
        if worker.exit_timer is None and worker in self.workers:
            self.slots.withdraw(worker)  # it takes no more work (`takes_work`)
            worker.exit_timer = self.loop.call_later(EXIT_WAIT, worker.kill)

    def exited(self, worker: Worker) -> None:
        if worker.retired:
            self.leaving.pop(worker, None)
            worker.detach(self.loop)
            worker.reap(0.1)  # (it has exited: its sentinel said so)
            worker.process.close()
            return
        # Results the worker sent before it died may still sit in the socket: take
        # them first, so that only the job it died in is charged.
        worker.link.drain()
        self.lost(worker)

    def lost(self, worker: Worker) -> None:
        """A worker is gone: settle its death (`jorbmp._pool_deaths`), replace it."""
        if worker not in self.workers:
            return  # already handled
        del self.workers[worker]
        if worker.recycling:
            self.spawner.outgoing -= 1  # (it was replaced already, or is as jobs wait)
        self.slots.gone(worker)
        self.spawner.lost(worker.ready)
        worker.detach(self.loop)
        worker.reap(0.1)
        code = worker.process.exitcode
        worker.process.close()
        batches = list(worker.batches)
        worker.batches.clear()
        if self.closing:
            return
        reason = worker.kill_reason or f"worker died (exit code {code})"
        if self.sink.halting() and batches and killed_by_stop(code, self.forkserver):
            # Killed by the stop signal itself: it did nothing wrong, nothing is charged.
            self.sink.unrun([job for batch in batches for job in batch])
            return
        log.debug("state %r: %s (pid %s)", self.state, reason, worker.pid)
        charged = settle(self.sink, worker, batches, reason, code) if batches else False
        if worker.recycling:
            # Died in its last batches: charged as any death, but its replacement
            # starts as jobs wait for it (it may have already), not as a second one.
            self.sink.freed()
            return
        self.spawner.replace(worker.ready, charged, reason)

    def close(self, abandon: bool) -> None:
        """The pool closes: its workers are killed (``abandon``) or sent away, and
        nothing they do from now on is settled; reaped in `wait_closed`."""
        self.closing = True
        self.closed_at = time.monotonic()
        for worker in self.workers:
            if abandon:
                worker.kill()
            else:
                worker.slot[SLOT_CLOSING] = 1.0  # the EOF that follows is no death
            worker.detach(self.loop)
        for worker in self.leaving:
            worker.detach(self.loop)  # (reaped in `wait_closed`)

    def wait_closed(self) -> None:
        """Reap the workers `close` sent away; kill any still there after `EXIT_WAIT`."""
        deadline = self.closed_at + EXIT_WAIT
        for worker in [*self.workers, *self.leaving]:
            worker.reap(max(0.0, deadline - time.monotonic()))
            worker.process.close()
        self.workers.clear()
        self.leaving.clear()
