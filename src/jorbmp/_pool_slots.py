"""Slot accounting of a `jorbmp._pool.ProcessPool` (`Slots`): which workers can take
a batch now, and how many execs are running, kept as workers change so that a
dispatch or a result costs the same however many workers the pool has."""

from __future__ import annotations

from ._memory import PoolMemory
from ._pool_budget import PoolBudget
from ._pool_worker import Worker

__all__ = ["MAX_DEPTH", "Slots"]

# Batches a worker holds at most: the one it runs, and one queued behind it.
MAX_DEPTH = 2  # (`Slots.free` counts for this depth without a loop)


class Slots:
    """Which of a pool's workers can take a batch now, and how many are executing,
    kept up to date as workers change, so that a dispatch or a result costs the same
    however many workers the pool has (a walk over 256 workers per job was a fifth
    of the coordinator's time).

    Invariants, between any two events: a worker is in ``by_load[n]`` exactly when it
    takes work (`Worker.takes_work`) and holds ``n < MAX_DEPTH`` batches; ``busy`` is
    the number of the pool's live workers that hold any batch (each runs one exec at a
    time, so it is the number of execs running). The pool calls `offer` when a worker
    starts taking work, `withdraw` when it stops, `take` and then `put_back` to send
    one a batch, `returned` when a batch's results are all back, and `gone` when it
    loses a worker.

    With a CPU budget (``budget``), a worker that is busy holds one of its slots: `take`
    acquires it for an idle worker, and the change of ``busy`` back releases it, so the
    state's slots held are always ``busy``. A second batch needs no slot, but a state
    holding more than its share while another waits for one gets none
    (`CpuBudget.yields`): its slots come back as its workers finish what they run.

    With a memory limit (``memory``), likewise: an idle worker starts an exec only if
    the state's learned size fits (`PoolMemory.admits`), and gives it back as ``busy``
    falls.
    """

    __slots__ = ("budget", "busy", "by_load", "memory")

    def __init__(self, budget: PoolBudget | None = None, memory: PoolMemory | None = None) -> None:
        self.budget = budget
        self.memory = memory
        # Per load, the workers at it: dicts used as ordered sets (O(1) add, discard
        # and pop). The most recently listed worker is taken first: which one does
        # not matter, and popping the last entry is the cheap end.
        self.by_load: tuple[dict[Worker, None], ...] = tuple({} for _ in range(MAX_DEPTH))
        self.busy = 0

    def __repr__(self) -> str:
        loads = " ".join(f"load{n}={len(b)}" for n, b in enumerate(self.by_load))
        return f"<Slots {loads} busy={self.busy}>"

    def free(self, depth: int, limit: int) -> int:
        """Batches the listed workers can take, each holding at most ``depth``, with at
        most ``limit`` of them executing: an idle worker takes one only while fewer
        than ``limit`` are busy, a busy one its second only while at most ``limit``."""
        idle, loaded = self.by_load  # (MAX_DEPTH == 2; per dispatch: no loop here)
        room = limit - self.busy
        if room < 0:
            return 0
        starting, second = min(len(idle), room), len(loaded)
        if self.budget is not None:
            if starting:
                starting = min(starting, self.budget.admits())
            if second and self.budget.yields():
                second = 0
        if starting and self.memory is not None:
            starting = min(starting, self.memory.admits())
        return 2 * starting + second if depth == 2 else starting

    def take(self, depth: int, limit: int) -> Worker | None:
        """The least loaded worker that can take a batch within ``limit`` (an idle one
        if there is one and room for it), unlisted: the caller sends it a batch and
        then calls `put_back`."""
        idle, loaded = self.by_load
        memory = self.memory
        if (
            idle
            and self.busy < limit
            and (memory is None or memory.admits())
            and (self.budget is None or self.budget.acquire())
        ):
            worker = idle.popitem()[0]
            if memory is not None:
                memory.acquire(worker)
            return worker
        if (
            loaded
            and depth == 2
            and self.busy <= limit
            and (self.budget is None or not self.budget.yields())
        ):
            return loaded.popitem()[0]
        return None

    def idle(self) -> list[Worker]:
        """The workers that take work and hold none."""
        return list(self.by_load[0])

    def offer(self, worker: Worker) -> None:
        """``worker`` takes work (it just became ready): list it under its load."""
        n = len(worker.batches)
        if n < MAX_DEPTH and worker.takes_work():
            self.by_load[n][worker] = None

    def withdraw(self, worker: Worker) -> None:
        """``worker`` takes no more work (it is being killed, or gone)."""
        n = len(worker.batches)
        if n < MAX_DEPTH:
            self.by_load[n].pop(worker, None)

    def put_back(self, worker: Worker, before: int) -> None:
        """``worker``, taken when it held ``before`` batches, was sent one more (or, if
        its jobs could not be sent, none): list it again under its load."""
        if before == 0:
            if worker.batches:
                self.busy += 1
            else:  # nothing was sent: its slots go back
                self._release(worker)
        self.offer(worker)

    def returned(self, worker: Worker, before: int) -> None:
        """``worker`` held ``before`` batches and now holds one fewer."""
        if before < MAX_DEPTH:
            self.by_load[before].pop(worker, None)
        if before == 1:
            self.busy -= 1
            self._release(worker)
        self.offer(worker)

    def gone(self, worker: Worker) -> None:
        """``worker`` is no longer the pool's (call before its batches are cleared)."""
        self.withdraw(worker)
        if worker.batches:
            self.busy -= 1
            self._release(worker)

    def _release(self, worker: Worker) -> None:
        """``worker`` stopped executing: the budget's slot and its memory go back."""
        if self.budget is not None:
            self.budget.release()
        if self.memory is not None:
            self.memory.release(worker)

    def close(self, workers: list[Worker]) -> None:
        """The pool closes: the budget slots its busy ``workers`` hold go back (quietly:
        nothing is dispatched any more)."""
        if self.budget is not None:
            for worker in workers:
                if worker.batches:
                    self.budget.release(wake=False)
        self.budget = self.memory = None  # (what comes back now releases nothing twice)
