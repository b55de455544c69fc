"""The coordinator: the scheduling loop that moves jobs through states.

::

    Run.jobs ──> per-state FIFO queue (Lane.queue)
                   │  Lane.pump(): batches sized to the queue, at most one per free slot
                   ▼
                 rate gate (RateGate.take/acquire, rate-limited states only: one job per token due)
                   │
                   ▼
                 Backend.submit ──> worker processes | asyncio tasks | threads | inline
                   │
                   ▼  Sink.done(jobs, results)
                 Coordinator.finish_batch: plain outcomes in one loop; any other through
                   │  finish: decode + validate, then context, errors, kicks and next
                   │          state applied together (or not at all)
                   ├──> back into a Lane's queue, or a terminal state
                   ▼
                 Serializer.jobs_changed ─(housekeeping tick)──> checkpoint flush
                   (CheckpointGuard: a write without space pauses dispatch, see there)
                 status counters ─────────(housekeeping tick)──> StatusListener

Everything here runs on one event loop thread, so transitions need no locks. Work
is event-driven: a finished batch triggers its transitions and then one pump of
every lane that gained jobs or slots. The housekeeping tick (every `TICK_SECONDS`)
only does what is periodic: status, checkpoint flushes, timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from . import _floats
from ._backends import Backend
from ._checkpoint_guard import DEFAULT_PATIENCE, CheckpointGuard
from ._delays import DelayQueue
from ._lane import Lane
from ._load import LoadMeter
from ._mailbox import ListenerMailbox
from ._memory import MemoryGovernor
from ._run_status import RunStatus
from ._stopping import Stopping
from ._transitions import Transitions
from .checkpoint.base import Serializer
from .errors import CheckpointSpaceError
from .report import RunReport
from .run import Job, Run, utcnow
from .state import State
from .status import StatusCount, StatusListener

log = logging.getLogger("jorbmp")

# Period of the housekeeping tick; also the coalescing period of status updates
# (so listeners get at most ~10 a second) and the resolution of timeouts.
TICK_SECONDS = 0.1


class Coordinator(Transitions, Stopping):
    """Executes one run once: owns its lanes, transitions, status and checkpoint flushes
    (its transitions in `Transitions`, its stops and pauses in `Stopping`)."""

    def __init__(
        self,
        run: Run[Any, Any],
        states: list[State],
        make_backend: Callable[[State, Lane], Backend],
        serializer: Serializer,
        listener: StatusListener,
        grace: float,
        memory: MemoryGovernor | None = None,
        checkpoint_patience: float = DEFAULT_PATIENCE,
    ) -> None:
        self.run = run
        self.serializer = serializer
        # Writes go through the guard: a full disk pauses dispatch (`paused`) until a
        # write succeeds again, or stops the run after ``checkpoint_patience`` seconds.
        self.guard = CheckpointGuard(
            serializer, checkpoint_patience, self.checkpoint_changed, self.checkpoint_given_up
        )
        self.paused = False
        self.unwritten: CheckpointSpaceError | None = None  # a final write that must wait
        self.listener = listener
        # Updates reach the listener on its own thread: a slow or blocked listener
        # never holds up the loop (see `jorbmp._mailbox`).
        self.mailbox = ListenerMailbox(listener)
        self.grace = grace
        # ``Processor(memory_limit=...)``: sampled each tick (None: no limit, no cost).
        self.memory = memory
        self.make_backend = make_backend
        self.lanes: dict[str, Lane] = {s.trigger_state: Lane(self, s) for s in states}
        job_type = run.job_type if run.job_type is not None else Any
        self.decode = msgspec.msgpack.Decoder(job_type).decode
        self.decode_many = msgspec.msgpack.Decoder(list[job_type]).decode  # type: ignore[valid-type]
        self.job_type_name = getattr(run.job_type, "__name__", "the job type")
        # Whether outcomes must be searched for NaN and infinities, which this run's
        # checkpoint cannot store (see `jorbmp._floats`): why, when they must.
        self.nonfinite_reason: str | None = (
            None
            if _floats.stores_nonfinite(serializer)
            else f"which a {type(serializer).__name__} checkpoint cannot store"
        )
        self.active = 0  # jobs in non-terminal states; the run is complete at 0
        self.stopping = False
        self.signalled = False  # set by the processor's signal handler, synchronously
        self.abandoning = False
        self.changed = True
        self.pending: dict[Lane, None] = {}  # lanes to pump next (an ordered set)
        self.pump_scheduled = False
        self.delays = DelayQueue(self.release)  # jobs waiting out a retry delay
        self.debug = log.isEnabledFor(logging.DEBUG)
        # The serializer's change hook, or None when it has none (NilSerializer).
        self.jobs_changed: Callable[[list[Job[Any]]], None] | None = (
            None
            if type(serializer).jobs_changed is Serializer.jobs_changed
            and type(serializer).job_changed is Serializer.job_changed
            else serializer.jobs_changed
        )
        self.now = utcnow()  # the time of the batch being applied (see Lane.done)
        self.started = asyncio.get_running_loop().time()
        self.tick: asyncio.TimerHandle | None = None
        self.tick_due = 0.0  # loop time the housekeeping tick is due at
        # How far behind the loop is, and how much bigger batches should be for it.
        self.load = LoadMeter()
        self.final_report: RunReport | None = None
        # Status updates, samples, the timeline and the report (`jorbmp._run_status`).
        self.status = RunStatus(self.lanes, self.guard, self.mailbox, self.load, self.started)
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    # -- the loop -------------------------------------------------------------------

    async def execute(self) -> str:
        """Run until every job is terminal (returns "complete") or a stop ends it
        ("stopped"); raises what made the run fail.

        Once the run is over and its checkpoint final, waits a bounded time for the
        listener to take the last update and close: awaited, so the loop goes on (an
        application's tasks; a second Ctrl-C, which ends the wait)."""
        try:
            return await self._execute()
        except asyncio.CancelledError:
            # A cancelled exec_async abandons the run, so it ends promptly: told here,
            # not by Task.cancelling() (3.11+ only, and still counting a cancellation
            # that the task swallowed long ago).
            self.mailbox.give_up("cancelled")
            raise
        finally:
            await self.mailbox.wait_closed()

    async def _execute(self) -> str:
        loop = asyncio.get_running_loop()
        lanes = self.lanes
        wall = time.time()
        for job in self.run.jobs.values():
            lane = lanes[job.state]
            lane.count += 1
            if not lane.terminal:
                if job.not_before is not None and job.not_before > wall:
                    self.delays.add(lane, job)  # a retry delay from before a stop
                else:
                    lane.queue.append(job)
        self.active = sum(lane.count for lane in lanes.values() if not lane.terminal)
        self.guard.begin(self.run)
        try:
            if self.active == 0:
                # (A full disk: the final write waits for space, as a run's end does.)
                unwritten = self.guard.final_flush(self.run, wait=True)
                if unwritten is not None:
                    await self.guard.wait_final(
                        self.run, unwritten, lambda: self.stopping or self.signalled
                    )
                self.mailbox.put(self.status.snapshot(final=True), pinned=True)
                self.close_listener(None)  # exactly one update: it is the first and last
                self.final_report = self.status.report(self.run, "complete")
                return "complete"
            try:
                for lane in lanes.values():
                    if not lane.terminal:
                        lane.backend = backend = self.make_backend(lane.state, lane)
                        if lane.limit.controller is not None:
                            lane.adopt_backend_limit()
                        backend.start()
                self.status.begin(loop.time())  # the first update, exact
                self.changed = False
                for lane in lanes.values():
                    lane.pump()
                self.schedule_tick(loop)
                return await self.done
            finally:
                if self.tick is not None:
                    self.tick.cancel()
                self.shutdown()
                if self.unwritten is not None:  # a complete run's end did not fit
                    await self.guard.wait_final(
                        self.run, self.unwritten, lambda: self.stopping or self.signalled
                    )
        finally:
            try:
                self.serializer.end()
            finally:
                self.detach()

    def detach(self) -> None:
        """Let go of the run and the backends, once the run is over.

        Lanes, backends and the coordinator refer to each other: cycles that only the
        cyclic garbage collector frees, and it may not run for a long time. Without
        this, a finished run's jobs would stay in memory after the caller drops the
        run (and make every later fork of this process slower).
        """
        for lane in self.lanes.values():
            lane.queue.clear()
            lane.backend = None
        self.pending.clear()
        self.delays.close()
        del self.run, self.make_backend

    def ended(self) -> str:
        """How the run ended: "complete", "stopped", or "failed" (an error, or the
        awaiting task was cancelled, which cancels `done` too)."""
        done = self.done
        if not done.done() or done.cancelled() or done.exception() is not None:
            return "failed"
        return done.result()

    def shutdown(self) -> None:
        """Release everything, write the final checkpoint and the final status.

        Worker processes exit meanwhile: once its backend is closed, nothing a worker
        does can change the run, so the final writes need not wait for them.
        """
        outcome = self.ended()
        abandon = self.abandoning or outcome == "failed"
        for lane in self.lanes.values():
            if lane.gate_task is not None:
                lane.gate_task.cancel()
        self.delays.close()
        backends = [lane.backend for lane in self.lanes.values() if lane.backend is not None]
        try:
            try:
                self.status.sample_processes()  # CPU since the last sample, for the final update
            finally:
                for backend in backends:
                    backend.close(abandon)
        finally:
            try:
                self.final_writes(outcome)
            finally:
                for backend in backends:
                    backend.wait_closed()

    def final_writes(self, outcome: str) -> None:
        """The report, the final checkpoint and the final status, each whatever the
        ones before did."""
        try:
            self.store_report(outcome)
            self.unwritten = self.guard.final_flush(self.run, wait=outcome == "complete")
        finally:
            # Settled: whatever was executing finished, or was abandoned and stays
            # in its prior state, so the last update counts it as waiting there.
            self.close_listener(self.status.snapshot(final=True))

    def close_listener(self, last: list[StatusCount] | None) -> None:
        """Post ``last`` and have the listener closed after it (`execute` waits)."""
        self.mailbox.close(last)

    def schedule_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tick_due = loop.time() + TICK_SECONDS
        self.tick = loop.call_later(TICK_SECONDS, self.housekeeping)

    def housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            self.load.tick(now - self.tick_due)
            lanes = self.lanes.values()
            self.delays.charge(now, lanes)  # (a run held up by retry delays)
            live = [(lane, lane.backend) for lane in lanes if lane.backend is not None]
            for _, backend in live:
                backend.check_timeouts(now)
            # Controllers judge a state's slots as the pump leaves them: a result that
            # came back in this loop iteration has freed a slot that the pump, due
            # next, fills (with 100 ms execs the 100 ms tick locked onto that instant
            # and saw no saturated window for seconds: the limit stayed put).
            if self.pending:
                self.pump_pending()
            for lane, _ in live:
                lane.adapt(now)
            if self.memory is not None:
                self.memory.sample()
            changed, self.changed = self.changed, False
            self.status.tick(now, changed)  # (an update if anything changed)
            self.guard.flush(self.run)
        except Exception as exc:
            self.fail(exc)
            return
        self.schedule_tick(loop)

    def store_report(self, outcome: str) -> None:
        """Keep the report for the processor and in the run (so in the checkpoint)."""
        try:
            self.final_report = self.status.report(self.run, outcome)
            self.run.report = msgspec.to_builtins(self.final_report)
            self.serializer.run_changed()
        except Exception:  # a report is never worth losing the final checkpoint
            log.exception("could not build the run report")

    def settle(self, lane: Lane) -> None:
        """After any event: schedule a pump of the lanes that gained jobs or slots, then
        check for the end."""
        self.pending[lane] = None
        if not self.pump_scheduled:
            # Pump on the next loop iteration, not now: results from other workers
            # that are ready at the same time join the queues first, so batches fill
            # up and each message carries more jobs.
            self.pump_scheduled = True
            asyncio.get_running_loop().call_soon(self.pump_pending)
        if self.done.done():
            return
        if self.active == 0 and not self.paused:  # (paused: its end is not on disk yet)
            self.done.set_result("complete")
        elif self.stopping and self.executing() == 0:
            self.done.set_result("stopped")

    def pump_pending(self) -> None:
        self.pump_scheduled = False
        pending = self.pending
        try:
            while pending:
                lane = next(iter(pending))
                del pending[lane]
                lane.pump()
        except Exception as exc:
            self.fail(exc)
