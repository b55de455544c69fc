"""The worker-process pool of one process state (`ProcessPool`).

One pool per state, up to ``concurrency`` workers, each with its own socket (framing
in `jorbmp._comms`, conversation in `jorbmp._protocol`). The pool sends batches and
takes results; its parts, each in a module of its own:

- `jorbmp._pool_worker`: the handle on one worker process (start, kill, reap) and
  what it holds;
- `jorbmp._pool_slots`: which workers can take a batch and how many execs run, kept
  up to date as workers change: a dispatch costs the same with 256 workers as with 2;
- `jorbmp._pool_spawner`: when workers start: as the queue needs them
  (`ProcessPool.demand`), a few milliseconds of forking at a time, so that 10 jobs
  never fork 256 workers and the first workers get work while the others start; and
  replacements for the dead, spaced out while deaths get no job anywhere;
- `jorbmp._pool_deaths`: which job a dead worker is charged with, what goes back;
- `jorbmp._pool_recycle`: when a worker is replaced by a fresh one (after so many jobs,
  or over so much memory), which the pool does by letting it go once what it holds
  is back;
- `jorbmp._pool_exits`: how workers leave: let go (recycled, beyond a CPU budget's
  share, idle in an adaptive state), lost (a death settled and replaced), or closed.

The pool never blocks the coordinator on a busy worker and never hangs on a dead
one: the socket and the process sentinel are both watched by the event loop, so a
worker that exits, is killed or segfaults is noticed at once, its death is settled
(the job it was running is charged, with the time it held its slot; the rest of its
work goes back to the front of the queue) and a replacement starts.

While a state's jobs are short (mean under `PIPELINE_SECONDS`), each worker holds
a second batch queued behind the one it runs, so it never waits a round trip for
work; long jobs get one batch per worker, so a free worker can always take the
next job.
"""

from __future__ import annotations

import asyncio
import os
import time
from multiprocessing.context import BaseContext
from typing import Any

import msgspec

from . import _comms
from ._backends import Backend, Sink
from ._comms import CoordinatorEnd
from ._log_relay import LogReceiver, levels_now
from ._memory import PoolMemory
from ._pool_budget import PoolBudget
from ._pool_deaths import kill_if_overdue
from ._pool_exits import Exits
from ._pool_recycle import Recycler
from ._pool_slots import MAX_DEPTH, Slots
from ._pool_spawner import Spawner
from ._pool_worker import Worker
from ._protocol import (
    FAILED_ATTEMPT,
    Outcome,
    Results,
    Startup,
    WorkerSpec,
    is_logs,
)
from .run import Job

__all__ = ["MAX_BATCH", "MAX_DEPTH", "PIPELINE_SECONDS", "ProcessPool"]

# Largest batch of jobs sent to one worker in one message. Bigger batches amortise
# the cost of a message for tiny jobs; smaller ones return results sooner and send
# less work back when a worker dies. The coordinator sizes batches below this by
# the queue's depth and the state's mean exec time (see Lane.batch_limit).
MAX_BATCH = 256
# Mean exec time under which workers get a second batch queued behind the running
# one. Above it the round trip is negligible and queueing would only make a job
# wait behind another instead of going to the next free worker. Not lower: when the
# workers keep every core busy, the coordinator itself may wait a scheduler slice or
# two before it can answer, and at 5 ms (the previous value) 10 ms jobs lost 5-8% of
# their throughput to that wait.
PIPELINE_SECONDS = 0.05
# While workers hold a second batch (mean exec under PIPELINE_SECONDS), the pool's
# sockets are polled every POLL_SHARE of a mean exec, at most POLL_SECONDS, instead
# of waking the coordinator for each result (see `jorbmp._comms.Poller`): a worker's
# queued batch takes at least one mean exec, so it never runs dry for the wait, and
# each poll takes several results at once. Not longer: results, and the transitions
# and kicks they bring, wait up to that much more. Waits under MIN_POLL_SECONDS are
# not worth it (the event loop's timers are about that coarse), nor polls expected to
# find fewer than POLL_MIN_RESULTS results (few workers, or long execs): a poll that
# finds none costs a wake-up of its own (2 workers of 10 ms jobs on 2 busy cores lost
# ~3% of their throughput to such wake-ups).
POLL_SHARE = 1 / 8
POLL_SECONDS = 0.002
MIN_POLL_SECONDS = 0.001
POLL_MIN_RESULTS = 2.0


class ProcessPool(Backend):
    """``kind="process"``: up to ``concurrency`` worker processes, each fed batches over
    a socket, started as the state's queue needs them."""

    max_batch = MAX_BATCH
    scale_with_load = True
    started_pids = True

    def __init__(
        self,
        spec: WorkerSpec,
        concurrency: int,
        ctx: BaseContext,
        sink: Sink,
        timeout: float | None,
        cpu: PoolBudget | None = None,
        recycler: Recycler | None = None,
        memory: PoolMemory | None = None,
    ) -> None:
        # Forked and spawned workers are children of this process: they can tell when
        # it is gone. Under forkserver their parent is the server.
        parent = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else 0
        self.forkserver = ctx.get_start_method() == "forkserver"
        # Workers relay what their execs log to this process's logging (the levels
        # as they are now: `jorbmp._log_relay`).
        self.spec = msgspec.structs.replace(spec, parent_pid=parent, log_levels=levels_now())
        self.logs = LogReceiver(spec.state)
        self.concurrency = concurrency
        self.limit = concurrency  # execs at once now (`set_limit`)
        self.ctx = ctx
        self.sink = sink
        self.timeout = timeout
        # The live workers, in the order they started (a dict as an ordered set: a
        # death removes one in O(1)).
        self.workers: dict[Worker, None] = {}
        # The state's part of the run's CPU budget (None: outside any): an idle worker
        # starts an exec only with a slot of it (`Slots`).
        self.cpu = cpu
        # The state's part of the run's memory limit (None: no limit): likewise.
        self.memory = memory
        self.slots = Slots(cpu, memory)
        if memory is not None:
            memory.attach(self)
        self.recycler = recycler  # when workers are replaced (None: never)
        self.spawner = Spawner(
            spec.state, concurrency, sink, self.workers, self._launch, self._guard
        )
        self.exits = exits = Exits(
            spec.state,
            self.workers,
            self.slots,
            self.spawner,
            sink,
            recycler,
            cpu,
            self.forkserver,
        )
        # Bound once: called per batch (when recycling, or in a CPU budget).
        self._recycle = exits.recycle
        self._recycles = exits.recycles
        self._trim = exits.trim
        self.poller: _comms.Poller | None = None
        self.closing = False
        self.mean_seconds: float | None = None  # recent mean exec time
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_results = msgspec.msgpack.Decoder(Results).decode
        self._decode_startup = msgspec.msgpack.Decoder(Startup).decode

    def __repr__(self) -> str:
        ready = sum(w.ready for w in self.workers)
        return (
            f"<ProcessPool {self.spec.state!r} workers={len(self.workers)} ready={ready} "
            f"executing={self.executing()} depth={self._depth()} {self.slots!r} "
            f"{self.spawner!r}>"
        )

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if _comms.Poller.available():
            self.poller = _comms.Poller(self.loop, self._poll_delay, self._guard)
        self.spawner.start(self.loop)
        self.exits.start(self.loop)

    def demand(self, waiting: int) -> None:
        cpu = self.cpu
        if cpu is not None:
            # Inside a budget, a worker starts only for a slot the budget would give,
            # and only when none of the state's own waits idle for one: so at most
            # about `cpus` + one per state are alive, whatever each state's limit.
            if self.slots.by_load[0]:
                return
            waiting = min(waiting, cpu.admits())
        memory = self.memory
        if memory is not None and waiting:
            # Likewise with a memory limit: no worker (and its RSS) for an exec that
            # would not fit beside it.
            if self.slots.by_load[0]:
                return
            waiting = min(waiting, memory.admits(new_worker=True))
        self.spawner.demand(waiting)

    def held_back(self) -> bool:
        # Below its own limit, yet the budget gives the state no slot.
        if self.slots.busy >= self.limit:
            return False
        if self.memory is not None and not self.memory.admits():
            return True  # (a memory limit holds it back likewise)
        return self.cpu is not None and not self.cpu.admits()

    def set_limit(self, limit: int) -> None:
        # Workers start only up to the limit. Those above a lowered one take no more
        # work (`Slots`) and go once idle for IDLE_RETIRE_SECONDS (`Exits`), as any
        # idle worker of an adaptive pool: not at once, so that a probe back up soon
        # after, or a state whose workers take long to start, does not fork them all
        # again.
        self.limit = limit
        self.exits.adaptive = True
        self.spawner.concurrency = limit  # (also the workers `Exits.keep` keeps)
        if self.cpu is not None:
            self.cpu.cap(limit)

    def starting(self) -> int:
        return self.spawner.unready + self.spawner.to_spawn

    def _launch(self, number: int) -> None:
        """Start worker ``number`` and watch its socket and its exit."""
        name = f"jorbmp-{self.spec.state}-{number}"
        worker, end = Worker.start(self.ctx, self.spec, name)
        exits = self.exits
        worker.link = CoordinatorEnd(
            end,
            self.loop,
            lambda data: self._guard(self._message, worker, data),
            lambda: self._guard(exits.link_closed, worker),
            lambda exc: self._guard(exits.send_failed, worker, exc),
            self.poller,
        )
        self.workers[worker] = None
        self.loop.add_reader(worker.process.sentinel, self._guard, exits.exited, worker)

    def _guard(self, fn: Any, *args: Any) -> None:
        # Event-loop callbacks: the loop would only log an exception, so anything
        # unexpected must end the run here instead of leaving it waiting forever.
        try:
            fn(*args)
        except Exception as exc:
            self.sink.fatal(exc)

    def _poll_delay(self) -> float:
        """How long the workers' results may wait to be read (0: wake at once); see
        `POLL_SHARE`."""
        mean = self.mean_seconds
        if mean is None or mean >= PIPELINE_SECONDS or self.closing:
            return 0.0
        # Under load, batches (and so a worker's queued work) hold `scale` times more.
        scale = self.sink.batch_scale()
        delay = min(POLL_SECONDS * scale, mean * POLL_SHARE * scale)
        if delay < MIN_POLL_SECONDS or self.slots.busy * delay < POLL_MIN_RESULTS * mean:
            return 0.0
        return delay

    def _depth(self) -> int:
        mean = self.mean_seconds
        return 2 if mean is not None and mean < PIPELINE_SECONDS else 1

    def free(self) -> int:
        if self.closing:
            return 0
        # The same workers as `submit` takes: counting one it would refuse made the
        # pump ask again and again, never returning to the loop.
        return self.slots.free(self._depth(), self.limit)

    def executing(self) -> int:
        if self.closing:
            return 0  # what workers still hold was abandoned: it will never finish
        return self.slots.busy

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def submit(self, jobs: list[Job[Any]]) -> None:
        # The ready worker with the least work: an idle one if there is one.
        worker = self.slots.take(MAX_DEPTH, self.limit)
        if worker is None:  # a worker died since `free` said there was room
            self.sink.unrun(jobs)
            return
        allowance = self.recycler.allowance(worker) if self.recycler is not None else None
        if allowance is not None and len(jobs) > allowance:
            self.sink.unrun(jobs[allowance:])  # a batch never straddles the job count
            jobs = jobs[:allowance]
        before = len(worker.batches)
        if before and self.recycler is not None and self.recycler.over_memory(worker):
            self._recycle(worker)  # no second batch for it: it goes after its first
            self.slots.put_back(worker, before)  # (as taken: nothing was sent)
            self.sink.unrun(jobs)
            return
        try:
            self._send(worker, jobs)
        finally:
            self.slots.put_back(worker, before)  # listed again, under its new load

    def _send(self, worker: Worker, jobs: list[Job[Any]]) -> None:
        """Send ``jobs`` (or what fits in one message) to ``worker``, taken from the
        slots; the rest goes back to the queue."""
        data = self._encode([job.context for job in jobs])
        limit = min(self.batch_bytes, _comms.MAX_PAYLOAD)
        while len(jobs) > 1 and len(data) > limit:
            # Too many bytes for one message: send what fits, give back the rest.
            keep = max(1, min(len(jobs) - 1, int(len(jobs) * limit / len(data))))
            self.sink.unrun(jobs[keep:])
            jobs = jobs[:keep]
            data = self._encode([job.context for job in jobs])
        per_job = len(data) / len(jobs)
        self.job_bytes = per_job if not self.job_bytes else 0.8 * self.job_bytes + 0.2 * per_job
        if len(data) > _comms.MAX_PAYLOAD:
            error = (
                f"job context of {len(data)} bytes cannot be sent to a worker (the limit "
                f"of one message is {_comms.MAX_PAYLOAD} bytes)"
            )
            self.sink.done(jobs, Results.of([Outcome(FAILED_ATTEMPT, error=error)]))
            return
        if not worker.batches:
            worker.since = time.monotonic()
        worker.batches.append(jobs)
        if self.recycler is not None and self.recycler.sent(worker, len(jobs)):
            self._recycle(worker)
        worker.link.send(data)

    def _message(self, worker: Worker, data: bytes) -> None:
        if is_logs(data):  # what its execs logged, before their results
            self.logs.receive(
                data, worker.batches, worker.completed, worker.pid, worker.process.name
            )
            return
        if not worker.ready:
            startup = self._decode_startup(data)
            if startup.error is not None:
                self.sink.fatal(RuntimeError(f"state {self.spec.state!r}: {startup.error}"))
                return
            worker.ready = True
            worker.since = time.monotonic()  # (idle from now: see `check_timeouts`)
            self.spawner.ready()
            self.slots.offer(worker)
            self.sink.freed()
            return
        results = self._decode_results(data)
        worker.since = time.monotonic()
        n = len(results.plain)
        batch, start = worker.batches[0], worker.reported
        end = start + n
        if end >= len(batch):
            worker.batches.popleft()
            self.slots.returned(worker, len(worker.batches) + 1)
            if self.recycler is not None and self._recycles(worker):
                pass  # it goes once its last batch is back (and may just have)
            elif not worker.batches and self.cpu is not None:
                # Inside a CPU budget: idle now, it goes if beyond its share and one spare.
                self._trim(worker)
            worker.reported = 0
            worker.completed += 1
            jobs = batch if start == 0 else batch[start:]
        else:
            worker.reported = end
            jobs = batch[start:end]
        self.spawner.progress = True
        batch_mean = sum(results.seconds) / n
        mean = self.mean_seconds
        self.mean_seconds = batch_mean if mean is None else 0.8 * mean + 0.2 * batch_mean
        self.sink.done(jobs, results)

    def check_timeouts(self, now: float) -> None:
        self.exits.trim_idle()  # (idle workers beyond the state's share, or idle long)
        if self.timeout is None:
            return
        for worker in self.workers:
            if kill_if_overdue(worker, now, self.timeout):
                self.slots.withdraw(worker)

    def close(self, abandon: bool) -> None:
        self.closing = True
        self.spawner.close()
        self.slots.close(list(self.workers))
        self.exits.close(abandon)
        if self.poller is not None:
            self.poller.close()

    def wait_closed(self) -> None:
        self.exits.wait_closed()
