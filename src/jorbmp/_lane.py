"""A lane: one state's FIFO queue, its backend and its rate gate.

The lane hands queued jobs to its backend's free slots (`pump`), and is the backend's
`Sink`: finished batches come back through `done`, jobs that never ran through `unrun`.
Everything here runs on the coordinator's event loop thread.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING, Any

from ._backends import Backend
from ._limit import StateLimit
from ._pool_budget import PoolBudget
from ._protocol import Results
from .ratelimit import RateGate, make_gate
from .run import Job, utcnow
from .state import State
from .status import StateMetrics

if TYPE_CHECKING:
    from ._coordinator import Coordinator

__all__ = ["Lane"]

# A rate-limited state's batch holds the jobs one wake-up of its gate lets through, as
# many as run in about this long at the state's mean exec time: a batch runs its jobs
# one after the other, and the last must start close to its grant (the gate's window
# allows 10 ms), yet tiny jobs must not cost one message each.
GATE_BATCH_SECONDS = 0.001


class Lane:
    """One state's queue, backend and rate gate; also the backend's `Sink`."""

    __slots__ = (
        "backend",
        "coord",
        "count",
        "cpu",
        "gate",
        "gate_task",
        "gate_tokens",
        "isolated",
        "limit",
        "metrics",
        "name",
        "queue",
        "state",
        "terminal",
    )

    def __init__(self, coord: Coordinator, state: State) -> None:
        self.coord = coord
        self.state = state
        self.name = state.trigger_state
        self.terminal = state.terminal
        self.queue: deque[Job[Any]] = deque()
        self.count = 0  # jobs in this state: queued, executing or waiting on retry_after
        self.backend: Backend | None = None
        # The state's part of the run's CPU budget, when its pool has one: told how
        # many jobs wait (`pump`, `adapt`) so that cores go where the work is.
        self.cpu: PoolBudget | None = None
        self.gate: RateGate | None = (
            None if self.terminal else make_gate(self.name, state.rate_limit)
        )
        self.gate_task: asyncio.Task[None] | None = None
        self.gate_tokens = 0  # tokens the gate gave that no job has used yet (see pump)
        # Ids of jobs suspected of killing a worker outside an exec: while there are
        # any, batches hold one job, so that the culprit alone is charged.
        self.isolated: set[str] = set()
        self.metrics = StateMetrics()
        # Execs at once: the state's concurrency, or its adaptive controller's choice.
        self.limit = StateLimit(state.concurrency, asyncio.get_running_loop().time())
        if self.gate is not None:
            self.metrics.rate_limit = self.gate.rate  # shown in the status

    def __repr__(self) -> str:
        return f"<Lane {self.name!r} count={self.count} queued={len(self.queue)} {self.backend!r}>"

    def kind(self) -> str:
        """Where this state's execs run, for the report: its kind, or its backend's label."""
        if self.terminal:
            return ""
        label = self.backend.label if self.backend is not None else None
        return label or self.state.resolved_kind()

    def pump(self) -> None:
        """Hand queued jobs to free slots, oldest first."""
        queue, backend = self.queue, self.backend
        if self.cpu is not None:
            self._tell_budget(self.cpu)
        if not queue or backend is None or self.coord.held():
            return
        if self.gate is not None:
            self._pump_gated(backend)
        else:
            limit = 1 if self.isolated else self.batch_limit(backend)
            spread = 2 * self.limit.current
            free = backend.free()
            while queue and free > 0:
                # Guided: shrink towards one job as the queue drains, so every slot gets
                # a share of the tail instead of one slot finishing a big last batch alone.
                n = min(limit, max(1, len(queue) // spread))
                # (A slot lost meanwhile, to a worker's death, sends the jobs back to
                # the queue: `free` still falls, so this loop ends.)
                backend.submit([queue.popleft() for _ in range(n)])
                free -= 1
        if self.cpu is not None:
            self._tell_budget(self.cpu)
        if queue:
            # Jobs left waiting: a pool that starts workers as the queue needs them
            # starts more (up to its concurrency).
            backend.demand(len(queue))

    def adopt_backend_limit(self) -> None:
        """An adaptive state's new backend starts at the controller's limit; one that
        cannot adapt (inline: one exec at a time) makes the limit its own, fixed."""
        backend = self.backend
        assert backend is not None
        if backend.adapts:
            backend.set_limit(self.limit.current)
        else:
            self.limit = StateLimit(backend.limit, asyncio.get_running_loop().time())

    def _tell_budget(self, cpu: PoolBudget) -> None:
        """The CPU budget's view of this state's demand: its queue and mean exec time.
        None while stopping, nor while its rate limit holds the queue back (a state
        waiting for its next token kept a core from the others ~85% of the time)."""
        held = self.gate_task is not None and not self.gate_tokens
        cpu.demand(0 if self.coord.held() or held else len(self.queue), self.metrics.mean_seconds())

    def adapt(self, now: float) -> None:
        """Let an adaptive state's controller see its metrics and move its limit (each
        housekeeping tick)."""
        backend = self.backend
        if self.cpu is not None:
            self._tell_budget(self.cpu)
            self.cpu.wake_hungry()
        if backend is None or self.limit.controller is None:
            return
        # Saturated: jobs wait and every slot the limit allows is up and taken. Not
        # while slots are still starting (a probe would be judged before its workers
        # could run), nor while a rate limit holds jobs back (slots are free then: a
        # wait for the next token with every slot busy is the limit's doing), nor while
        # a CPU budget's cores, held by other states, hold it below its limit. (The
        # coordinator pumps first: a slot freed by a result in this loop iteration is
        # filled before this looks.)
        saturated = (
            bool(self.queue)
            and backend.free() == 0
            and not backend.starting()
            and not self.coord.held()
            and not backend.held_back()
        )
        # Throughput is the execs that succeeded: an attempt that timed out, raised or
        # was rate limited counts its time, not as work done. Counting it, a service
        # overloaded into timeouts "finished" more attempts the more it was sent: a
        # semaphore of 4 behind a 0.25 s timeout took the limit to 64, at 15 of 40/s.
        metrics = self.metrics
        done = metrics.processed - metrics.errors
        if self.limit.update(now, done, metrics.total_seconds, saturated):
            backend.set_limit(self.limit.current)
            self.coord.settle(self)  # a raised limit frees slots now

    def batch_limit(self, backend: Backend) -> int:
        """Jobs per batch that take about the backend's ``batch_seconds`` at this
        state's mean exec time.

        Tiny jobs travel in big batches (the cost per message is what limits them);
        slow jobs travel alone, so results flow on and a worker death or a timeout
        sends few jobs back; while the coordinator falls behind, batches hold the
        load's scale times as much (`jorbmp._load`). One job until the first exec has
        been timed.
        """
        max_batch, mean = backend.max_batch, self.metrics.mean_seconds()
        if max_batch == 1 or mean is None:
            return 1
        if backend.job_bytes:  # and not too many bytes
            max_batch = min(max_batch, int(backend.batch_bytes / backend.job_bytes))
        seconds = backend.batch_seconds
        if backend.scale_with_load:
            seconds *= self.coord.load.scale
        return max(1, min(max_batch, int(seconds / max(mean, 1e-7))))

    def _pump_gated(self, backend: Backend) -> None:
        """Hand out as many queued jobs as the gate has tokens for now, then, while
        jobs and free slots remain, wait for the next token in a task (`_gated`)."""
        if self.gate_task is not None:
            return  # it waits for a token, and then fills every free slot
        self._dispatch_gated(backend)
        if self.queue and backend.free():
            self.gate_task = asyncio.get_running_loop().create_task(self._gated())

    def _dispatch_gated(self, backend: Backend) -> None:
        """Submit as many jobs as there are tokens now: those held (`gate_tokens`) and
        those the gate gives without waiting, up to what the free slots take.

        They are spread over the free slots, in batches of at most `batch_limit`; jobs
        that run in under `GATE_BATCH_SECONDS` together share one batch (one message).
        """
        gate, queue = self.gate, self.queue
        assert gate is not None
        free = backend.free()
        if not queue or not free:
            return
        limit = 1 if self.isolated else self.batch_limit(backend)
        want = min(len(queue), free * limit)
        if self.gate_tokens < want:
            self.gate_tokens += gate.take(want - self.gate_tokens)
        # Each token is spent at once on a job (a token kept for later would start its
        # job later than granted, out of the gate's window). Only a slot lost between
        # `free` and `submit` (a worker died) leaves tokens for the next free slot.
        metrics, close = self.metrics, 1  # close: jobs that run in GATE_BATCH_SECONDS
        if metrics.total_seconds > 0:
            close = int(GATE_BATCH_SECONDS * metrics.processed / metrics.total_seconds)
        while self.gate_tokens and queue and (free := backend.free()):
            spread = -(-self.gate_tokens // free)  # over every free slot
            n = min(limit, len(queue), self.gate_tokens, max(spread, close))
            self.gate_tokens -= n
            backend.submit([queue.popleft() for _ in range(n)])

    async def _gated(self) -> None:
        """Wait for a token while jobs and free slots remain; each wake-up hands out
        every token the gate has by then (a late timer owes several)."""
        gate, backend = self.gate, self.backend
        assert gate is not None and backend is not None
        try:
            loop = asyncio.get_running_loop()
            while self.queue and not self.coord.held() and backend.free():
                if not self.gate_tokens:
                    waited_from = loop.time()
                    await gate.acquire()
                    self.metrics.rate_wait += loop.time() - waited_from
                    self.gate_tokens = 1
                # While the gate waited, a worker may have died (no free slot now) and
                # the queue may have changed: `_dispatch_gated` checks both again.
                if self.coord.held():
                    break
                self._dispatch_gated(backend)
        except Exception as exc:  # a task's exception would only be logged, much later
            self.coord.fail(exc)
        finally:
            self.gate_task = None

    # Sink: called by the backend, usually from an event loop callback, where an
    # exception would only be logged: a bug here must end the run, not hang it.

    def done(self, jobs: list[Job[Any]], results: Results) -> None:
        try:
            if self.isolated:
                for job in jobs:
                    self.isolated.discard(job.id)
            coord = self.coord
            # One timestamp per batch: datetime.now() per job would cost more than
            # the rest of a no-op transition.
            coord.now = utcnow()
            coord.changed = True
            self.metrics.record(results.seconds)
            coord.finish_batch(self, jobs, results)
            coord.settle(self)
        except Exception as exc:
            self.coord.fail(exc)

    def unrun(self, jobs: list[Job[Any]], isolate: list[Job[Any]] | None = None) -> None:
        self.queue.extendleft(reversed(jobs))
        if isolate:
            self.isolated.update(job.id for job in isolate)
        self.freed()

    def freed(self) -> None:
        try:
            self.coord.settle(self)
        except Exception as exc:
            self.coord.fail(exc)

    def fatal(self, exc: BaseException) -> None:
        self.coord.fail(exc)

    def halting(self) -> bool:
        return self.coord.stopping or self.coord.signalled

    def queued(self) -> int:
        return len(self.queue)

    def rate_slots(self) -> int:
        gate, mean = self.gate, self.metrics.mean_seconds()
        if gate is None:
            return 0
        if mean is None:
            return self.limit.current  # not timed yet: keep what the limit allows
        return math.ceil(gate.rate() * mean)

    def recycled(self) -> None:
        self.metrics.recycled += 1

    def batch_scale(self) -> int:
        return self.coord.load.scale
