"""``State.timeout`` on Dask: counted from the exec's start, hung execs keep their slot.

- The worker reports each exec's start and end (`jorbmp._dask_watch.EXEC_TOPIC`), so
  a task queued on a busy worker is never charged: the timeout counts from the start.
- An exec that holds the GIL (a pure-Python loop that never releases it, a C call
  holding it) freezes its worker, whose start report may then never leave. So a task
  whose start has not been reported `START_GRACE` seconds after its timeout, counted
  from its submission, is looked up: the scheduler says which worker holds it, and
  when that worker does not answer within `PROBE_TIMEOUT` the oldest such task there
  is charged, its timeout counted from its submission. (A worker that answers is
  busy with something else: our task waits in its queue, and is not charged.) Only
  when nothing but this pool's tasks is processing on that worker: an exec of another
  state, run or client may be the one holding it, and ours, which never started, waits
  uncharged. While the lookups find nothing to charge, they come ever less often
  (the interval doubles, up to `LOOKUP_MAX_SECONDS`).
- A timed-out task is abandoned (cancelled), but Dask cannot interrupt the thread
  still running the exec: the task keeps its slot until the worker reports the
  exec's end or the worker leaves, and a worker still running it
  ``restart_hung_after`` seconds later is restarted (through its nanny; without one
  the slot stays held).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import TYPE_CHECKING

from ._dask_watch import note_restart
from ._execute import describe

if TYPE_CHECKING:
    from ._dask_pool import DaskPool, Task

__all__ = ["Hung", "Timeouts"]

# Seconds past its timeout, counted from its submission, after which a task whose start
# was not reported is looked up (a start report normally arrives in milliseconds).
START_GRACE = 2.0
# Seconds a worker has to answer that lookup before it counts as frozen (by the GIL).
PROBE_TIMEOUT = 2.0
# Seconds the scheduler has to answer a restart or a lookup.
SCHEDULER_TIMEOUT = 20.0
# Seconds between lookups at least (one asks for every worker's tasks: not every tick),
# doubling up to LOOKUP_MAX_SECONDS while they find nothing to charge.
LOOKUP_SECONDS = 2.0
LOOKUP_MAX_SECONDS = 30.0


class Hung:
    """A timed-out exec that may still run in its Dask worker's thread: it keeps its
    slot until it ends, or its worker is gone."""

    __slots__ = ("restarting", "since", "worker")

    def __init__(self, worker: str, since: float) -> None:
        self.worker = worker
        self.since = since
        self.restarting = False


class Timeouts:
    """The timeouts of one `DaskPool`'s tasks, and its hung execs."""

    def __init__(self, pool: DaskPool) -> None:
        self.pool = pool
        self.hung: dict[str, Hung] = {}  # by key, at most concurrency
        self.probe: concurrent.futures.Future[None] | None = None  # a lookup in flight
        self.looked_at = -LOOKUP_SECONDS
        self.look_every = LOOKUP_SECONDS  # see `_back_off`

    def __repr__(self) -> str:
        return f"<Timeouts hung={len(self.hung)}>"

    def exec_event(self, what: str, key: str, worker: str) -> None:
        """In the coordinator's loop: a worker's report about the exec of ``key``."""
        pool = self.pool
        task = pool.tasks.get(key)
        if what == "start":
            if task is not None:  # its timeout counts from now (the latest start)
                task.started = pool.loop.time()
                task.worker = worker
                task.ended = False
        elif what == "end":
            if task is not None:
                task.ended = True  # its result is on the way
            elif self.hung.pop(key, None) is not None:
                pool.log.debug("state %r: timed-out Dask task %s ended", pool.state, key)
                pool.sink.freed()

    def worker_gone(self, worker: str) -> None:
        """A Dask worker left (died, restarted, retired): its hung execs went with it."""
        gone = [key for key, hung in self.hung.items() if hung.worker == worker]
        for key in gone:
            del self.hung[key]
        if gone and not self.pool.closing:
            self.pool.sink.freed()

    def check(self, now: float) -> None:
        """Abandon the tasks past their timeout; restart workers hung past their limit."""
        pool, timeout = self.pool, self.pool.timeout
        if timeout is None:
            return
        unreported: list[str] = []
        for key, task in list(pool.tasks.items()):
            # From the exec's start on the worker, not from submission: a task queued
            # behind another (on a busy worker) has not used any of its time.
            started = task.started
            if started is None:
                if task.frozen:
                    self._expire(key, task, now)
                elif now - task.submitted > timeout + START_GRACE:
                    unreported.append(key)
            elif now - started > timeout:
                self._expire(key, task, now)
        idle = self.probe is None or self.probe.done()
        if not unreported:
            self.look_every = LOOKUP_SECONDS
        elif idle and now - self.looked_at >= self.look_every:
            self.looked_at = now
            self.probe = pool.connection.run(self._lookup(unreported))
        restart = pool.config.restart_hung_after
        if restart is not None:
            for hung in self.hung.values():
                if not hung.restarting and now - hung.since >= restart and hung.worker:
                    self._restart(hung)

    def _expire(self, key: str, task: Task, now: float) -> None:
        pool = self.pool
        del pool.tasks[key]
        pool.deaths.abandon(key, task)
        if not task.ended:
            self.hung[key] = Hung(task.worker, now)
        reason = f"timed out after {pool.timeout:g}s (Dask task abandoned)"
        pool.deaths.charge(task.jobs, reason, [task.slot_seconds(now)])

    async def _lookup(self, keys: list[str]) -> None:
        """In the client's loop: which workers hold ``keys``, and which of them are frozen."""
        client = self.pool.connection.client
        try:
            processing = await asyncio.wait_for(client.scheduler.processing(), SCHEDULER_TIMEOUT)
        except Exception as exc:  # the ping tells a lost scheduler
            self.pool.log.debug("state %r: Dask lookup failed: %s", self.pool.state, describe(exc))
            return
        wanted = set(keys)
        prefix = self.pool.name + "-"
        # Only workers processing nothing but ours: anything else there may be what
        # holds the GIL (another state's exec, another run's, another client's).
        where = {
            str(k): w
            for w, held in processing.items()
            if all(str(k).startswith(prefix) for k in held)
            for k in held
            if str(k) in wanted
        }
        frozen: set[str] = set()
        for worker in set(where.values()):
            try:
                # os.getpid pickles by name: any worker can run it.
                await asyncio.wait_for(client._run(os.getpid, workers=[worker]), PROBE_TIMEOUT)
            except asyncio.TimeoutError:
                frozen.add(worker)
            except Exception:  # gone, or refusing: its removal tells the rest
                continue
        if frozen:
            self.pool.tell(self._frozen, {k: w for k, w in where.items() if w in frozen})
        else:
            self.pool.tell(self._back_off)

    def _back_off(self) -> None:
        """In the coordinator's loop: a lookup found nothing to charge (our tasks wait
        behind something else): the next comes later, down to one per
        `LOOKUP_MAX_SECONDS` (each asks the scheduler for every worker's tasks)."""
        self.look_every = min(LOOKUP_MAX_SECONDS, self.look_every * 2)

    def _frozen(self, where: dict[str, str]) -> None:
        """In the coordinator's loop: the tasks ``where`` sit on workers that did not
        answer. On each such worker, the oldest of ours with no start reported is taken
        as the one holding the GIL, unless a hung exec of ours is known there, or one
        that reported its start and not its end (its own timeout tells)."""
        pool = self.pool
        self.look_every = LOOKUP_SECONDS
        busy = {hung.worker for hung in self.hung.values()}
        busy |= {t.worker for t in pool.tasks.values() if t.started is not None and not t.ended}
        oldest: dict[str, Task] = {}
        for key, worker in where.items():
            task = pool.tasks.get(key)
            if task is None or task.started is not None or worker in busy:
                continue
            if worker not in oldest or task.submitted < oldest[worker].submitted:
                oldest[worker] = task
        for worker, task in oldest.items():
            pool.log.warning(
                "state %r: Dask worker %s does not answer and never reported the start of "
                "an exec (holding the GIL?): counting its timeout from its submission",
                pool.state,
                worker,
            )
            task.worker, task.frozen = worker, True

    def _restart(self, hung: Hung) -> None:
        """Restart the Dask worker whose thread a timed-out exec still holds (a thread
        cannot be interrupted); its removal frees the slot. Without a nanny it cannot
        be: the slot stays held until the exec returns."""
        pool = self.pool
        hung.restarting = True
        worker = hung.worker
        pool.log.warning(
            "state %r: a timed-out exec still runs on Dask worker %s after %gs: restarting "
            "that worker",
            pool.state,
            worker,
            pool.config.restart_hung_after,
        )
        note_restart(worker)  # what any pool of ours loses with it is put back uncharged

        async def restart() -> None:
            try:
                result = await pool.connection.client._restart_workers(
                    workers=[worker], timeout=SCHEDULER_TIMEOUT, raise_for_error=False
                )
                status = result.get(worker, "?") if isinstance(result, dict) else result
                if status not in ("OK", "removed"):
                    raise RuntimeError(f"restart: {status}")
            except Exception as exc:
                pool.log.warning(
                    "state %r: cannot restart Dask worker %s (%s): the timed-out exec keeps "
                    "its slot until it returns",
                    pool.state,
                    worker,
                    describe(exc),
                )

        pool.connection.run_quietly(restart())
