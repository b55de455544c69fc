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
  or over so much memory), which the pool does by letting it go (`retire`) once what
  it holds is back.

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
import logging
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
from ._pool_deaths import kill_blaming_nobody, kill_if_overdue, killed_by_stop, settle
from ._pool_recycle import Recycler
from ._pool_slots import MAX_DEPTH, Slots
from ._pool_spawner import Spawner
from ._pool_worker import Worker
from ._protocol import (
    FAILED_ATTEMPT,
    SLOT_CLOSING,
    Outcome,
    Results,
    Startup,
    WorkerSpec,
    is_logs,
)
from .run import Job

__all__ = ["MAX_BATCH", "MAX_DEPTH", "PIPELINE_SECONDS", "ProcessPool"]

log = logging.getLogger("jorbmp")

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
# Seconds to wait for a worker to exit on its own before it is killed.
EXIT_WAIT = 2.0
# An adaptive state's worker idle this long goes (a fixed state keeps its workers):
# a state whose jobs ran out leaves no idle worker behind, and one that gets more
# later forks again in a few milliseconds.
IDLE_RETIRE_SECONDS = 1.0


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
        self.adaptive = False  # an adaptive state's pool: idle workers are let go
        self.ctx = ctx
        self.sink = sink
        self.timeout = timeout
        # The live workers, in the order they started (a dict as an ordered set: a
        # death removes one in O(1)).
        self.workers: dict[Worker, None] = {}
        # Workers let go while idle (`retire`), until their exit is reaped.
        self.leaving: dict[Worker, None] = {}
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
        self.poller: _comms.Poller | None = None
        self.closing = False
        self.closed_at = 0.0  # monotonic time of `close`
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
        # work (`Slots`) and go once idle for IDLE_RETIRE_SECONDS, as any idle worker of
        # an adaptive pool: not at once, so that a probe back up soon after, or a
        # state whose workers take long to start, does not fork them all again.
        self.limit = limit
        self.adaptive = True
        self.spawner.concurrency = limit
        if self.cpu is not None:
            self.cpu.cap(limit)

    def starting(self) -> int:
        return self.spawner.unready + self.spawner.to_spawn

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

    def _launch(self, number: int) -> None:
        """Start worker ``number`` and watch its socket and its exit."""
        name = f"jorbmp-{self.spec.state}-{number}"
        worker, end = Worker.start(self.ctx, self.spec, name)
        worker.link = CoordinatorEnd(
            end,
            self.loop,
            lambda data: self._guard(self._message, worker, data),
            lambda: self._guard(self._link_closed, worker),
            lambda exc: self._guard(self._send_failed, worker, exc),
            self.poller,
        )
        self.workers[worker] = None
        self.loop.add_reader(worker.process.sentinel, self._guard, self._exited, worker)

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
            elif not worker.batches and self.cpu is not None and self._staying() > self._keep():
                # Inside a CPU budget: beyond its share and one spare, and idle now.
                self.retire(worker)
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

    def _recycle(self, worker: Worker) -> None:
        """``worker`` goes once what it holds is back (`jorbmp._pool_recycle`): it takes
        no more work, and its replacement may start now."""
        self.slots.withdraw(worker)
        worker.recycling = True
        self.spawner.outgoing += 1

    def _recycles(self, worker: Worker) -> bool:
        """A batch of ``worker``'s is all back: whether it is being recycled. One whose
        last batch is back goes now, replacing nobody (its replacement started as jobs
        waited for it)."""
        recycler = self.recycler
        assert recycler is not None
        if not worker.recycling and recycler.over_memory(worker):
            self._recycle(worker)
        if worker.recycling and not worker.batches:
            self.spawner.outgoing -= 1
            self.sink.recycled()
            self.retire(worker)
        return worker.recycling

    def _staying(self) -> int:
        """Live workers that are not being recycled."""
        return len(self.workers) - self.spawner.outgoing

    def _send_failed(self, worker: Worker, exc: OSError) -> None:
        # The worker may be alive but will never get its batch: replace it, blaming
        # nobody (its jobs go back to the queue).
        log.warning("state %r: cannot send to a worker (%s): replacing it", self.spec.state, exc)
        self.slots.withdraw(worker)
        kill_blaming_nobody(worker)

    def _link_closed(self, worker: Worker) -> None:
        # EOF: the worker is exiting. Its sentinel says when it is gone (and with what
        # exit code); waiting for that here would block the loop.
        if worker.exit_timer is None and worker in self.workers:
            self.slots.withdraw(worker)  # it takes no more work (`takes_work`)
            worker.exit_timer = self.loop.call_later(EXIT_WAIT, worker.kill)

    def _exited(self, worker: Worker) -> None:
        if worker.retired:
            self.leaving.pop(worker, None)
            worker.detach(self.loop)
            worker.reap(0.1)  # (it has exited: its sentinel said so)
            worker.process.close()
            return
        # Results the worker sent before it died may still sit in the socket: take
        # them first, so that only the job it died in is charged.
        worker.link.drain()
        self._lost(worker)

    def _lost(self, worker: Worker) -> None:
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
        log.debug("state %r: %s (pid %s)", self.spec.state, reason, worker.pid)
        charged = settle(self.sink, worker, batches, reason, code) if batches else False
        if worker.recycling:
            # Died in its last batches: charged as any death, but its replacement
            # starts as jobs wait for it (it may have already), not as a second one.
            self.sink.freed()
            return
        self.spawner.replace(worker.ready, charged, reason)

    def _keep(self) -> int:
        """Workers the state keeps: its limit, and in a budget at most its share of it
        plus one idle worker ready for the next slot it gets."""
        if self.cpu is None:
            return self.limit
        return min(self.limit, self.cpu.share() + 1)

    def check_timeouts(self, now: float) -> None:
        if self.cpu is not None:
            keep = self._keep()
            for worker in self.slots.idle():
                if self._staying() <= keep:
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
        if self.timeout is None:
            return
        for worker in self.workers:
            if kill_if_overdue(worker, now, self.timeout):
                self.slots.withdraw(worker)

    def close(self, abandon: bool) -> None:
        self.closing = True
        self.closed_at = time.monotonic()
        self.spawner.close()
        self.slots.close(list(self.workers))
        for worker in self.workers:
            if abandon:
                worker.kill()
            else:
                worker.slot[SLOT_CLOSING] = 1.0  # the EOF that follows is no death
            worker.detach(self.loop)
        for worker in self.leaving:
            worker.detach(self.loop)  # (reaped in `wait_closed`)
        if self.poller is not None:
            self.poller.close()

    def wait_closed(self) -> None:
        """Reap the workers `close` sent away; kill any still there after `EXIT_WAIT`."""
        deadline = self.closed_at + EXIT_WAIT
        for worker in [*self.workers, *self.leaving]:
            worker.reap(max(0.0, deadline - time.monotonic()))
            worker.process.close()
        self.workers.clear()
        self.leaving.clear()
