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
                 status counters ─────────(housekeeping tick)──> StatusListener

Everything here runs on one event loop thread, so transitions need no locks. Work
is event-driven: a finished batch triggers its transitions and then one pump of
every lane that gained jobs or slots. The housekeeping tick (every `TICK_SECONDS`)
only does what is periodic: status, checkpoint flushes, timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec

from . import _floats
from ._backends import Backend
from ._delays import DelayQueue
from ._lane import Lane
from ._mailbox import ListenerMailbox
from ._protocol import FAILED_ATTEMPT, RATE_LIMITED, Outcome, Results
from .checkpoint.base import Serializer
from .report import RunReport, build_report
from .run import Job, Run, utcnow
from .state import State
from .status import SAMPLE_SECONDS, StatusCount, StatusListener

log = logging.getLogger("jorbmp")

# Period of the housekeeping tick; also the coalescing period of status updates
# (so listeners get at most ~10 a second) and the resolution of timeouts.
TICK_SECONDS = 0.1
# Errors kept per job and state; a job retried forever must not grow without bound.
# The first error is always kept (it is often the telling one), then the latest.
MAX_ERRORS_PER_STATE = 100
# str(n) for the kick counts most parents stay under: formatting the number was a
# good part of building a kicked job's id.
_SMALL = 256
_DIGITS = tuple(str(n) for n in range(_SMALL))


class Coordinator:
    """Executes one run once: owns its lanes, transitions, status and checkpoint flushes."""

    def __init__(
        self,
        run: Run[Any, Any],
        states: list[State],
        make_backend: Callable[[State, Lane], Backend],
        serializer: Serializer,
        listener: StatusListener,
        grace: float,
    ) -> None:
        self.run = run
        self.serializer = serializer
        self.listener = listener
        # Updates reach the listener on its own thread: a slow or blocked listener
        # never holds up the loop (see `jorbmp._mailbox`).
        self.mailbox = ListenerMailbox(listener)
        self.grace = grace
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
        self.sample_time = self.started  # loop time of the last psutil sample
        self.tick: asyncio.TimerHandle | None = None
        self.final_report: RunReport | None = None
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
        self.serializer.begin(self.run)
        try:
            if self.active == 0:
                self.serializer.flush(self.run, final=True)
                self.mailbox.put(self.snapshot(final=True), pinned=True)
                self.close_listener(None)  # exactly one update: it is the first and last
                self.final_report = self.report("complete")
                return "complete"
            try:
                for lane in lanes.values():
                    if not lane.terminal:
                        lane.backend = self.make_backend(lane.state, lane)
                        lane.backend.start()
                self.mailbox.put(self.snapshot(), pinned=True)  # the first update, exact
                self.changed = False
                self.sample_processes(baseline=True)
                for lane in lanes.values():
                    lane.pump()
                self.tick = loop.call_later(TICK_SECONDS, self.housekeeping)
                return await self.done
            finally:
                if self.tick is not None:
                    self.tick.cancel()
                self.shutdown()
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
                self.sample_processes()  # CPU since the last sample, for the final update
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
            self.serializer.flush(self.run, final=True)
        finally:
            # Settled: whatever was executing finished, or was abandoned and stays
            # in its prior state, so the last update counts it as waiting there.
            self.close_listener(self.snapshot(final=True))

    def close_listener(self, last: list[StatusCount] | None) -> None:
        """Post ``last`` and have the listener closed after it (`execute` waits)."""
        self.mailbox.close(last)

    def housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            for lane in self.lanes.values():
                if lane.backend is not None:
                    lane.backend.check_timeouts(now)
            if now - self.sample_time >= SAMPLE_SECONDS:
                self.sample_processes()
                self.changed = True  # CPU and rates moved even if no job did
            if self.changed:
                self.changed = False
                self.mailbox.put(self.snapshot())
            self.serializer.flush(self.run)
        except Exception as exc:
            self.fail(exc)
            return
        self.tick = loop.call_later(TICK_SECONDS, self.housekeeping)

    def sample_processes(self, baseline: bool = False) -> None:
        """Sample the CPU and memory of every state's processes; with ``baseline`` (at
        the start), only those whose CPU time since the start needs a baseline."""
        now = asyncio.get_running_loop().time()
        seconds, self.sample_time = now - self.sample_time, now
        for lane in self.lanes.values():
            backend = lane.backend
            if backend is not None and not (baseline and backend.started_pids):
                lane.metrics.sample(backend.pids(), seconds, backend.started_pids)

    def snapshot(self, final: bool = False) -> list[StatusCount]:
        """The status of every state; ``final``: the run is over and nothing executes
        (backends may still count abandoned execs as running)."""
        now = asyncio.get_running_loop().time()
        elapsed = now - self.started
        return [
            lane.metrics.snapshot(
                lane.name,
                lane.terminal,
                lane.count,
                lane.backend.executing() if lane.backend is not None and not final else 0,
                now,
                lane.state.concurrency * elapsed,
            )
            for lane in self.lanes.values()
        ]

    def store_report(self, outcome: str) -> None:
        """Keep the report for the processor and in the run (so in the checkpoint)."""
        try:
            self.final_report = self.report(outcome)
            self.run.report = msgspec.to_builtins(self.final_report)
            self.serializer.run_changed()
        except Exception:  # a report is never worth losing the final checkpoint
            log.exception("could not build the run report")

    def report(self, outcome: str) -> RunReport:
        """The end-of-run report: per-state figures, the bottleneck and a hint."""
        wall = asyncio.get_running_loop().time() - self.started
        rows: list[tuple[StatusCount, int, str]] = [
            (count, lane.state.concurrency, lane.kind())
            for count, lane in zip(self.snapshot(final=True), self.lanes.values(), strict=True)
        ]
        cpu = [lane.metrics.cpu_seconds for lane in self.lanes.values()]
        return build_report(self.run.name, outcome, wall, rows, cpu)

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
        if self.active == 0:
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

    def executing(self) -> int:
        return sum(lane.backend.executing() for lane in self.lanes.values() if lane.backend)

    # -- stopping -------------------------------------------------------------------

    def is_stopping(self) -> bool:
        return self.stopping

    def request_stop(self) -> None:
        """Stop dispatching; let in-flight execs finish within the grace period."""
        if self.stopping or self.done.done():
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

    # -- transitions ----------------------------------------------------------------

    def finish_batch(self, lane: Lane, jobs: list[Job[Any]], results: Results) -> None:
        """Apply a batch of outcomes from ``lane``, in order.

        This loop is the coordinator's cost per transition, so plain outcomes (a
        valid context, a known next state and maybe kicks, no error; see `Results`)
        are applied inline when the lane has no rate limiter and debug logging is off;
        everything else goes through `finish`. Both do the same to a job. Every job of
        the batch changed (each got at least a new ``last_update``): the serializer
        hears of them all at once, at the end.
        """
        try:
            self._finish_batch(lane, jobs, results)
        finally:
            if self.jobs_changed is not None:
                self.jobs_changed(jobs)

    def _finish_batch(self, lane: Lane, jobs: list[Job[Any]], results: Results) -> None:
        lanes = self.lanes
        found = [lanes.get(name) for name in results.next_states]
        contexts: list[Any] | None = None
        kick_contexts: list[Any] = []
        if lane.gate is None and not self.debug and None not in found:
            # A context that does not decode: `finish` decodes each on its own, to fail
            # only the bad ones.
            with contextlib.suppress(msgspec.ValidationError):
                if results.kick_counts:
                    kick_contexts = self.decode_many(results.kick_contexts)
                contexts = self.decode_many(results.contexts)
            # NaN or infinities the checkpoint cannot store: one search of the batch's
            # bytes, and `finish` tells the jobs apart.
            if (
                contexts is not None
                and self.nonfinite_reason is not None
                and (
                    self.nonfinite(results.contexts)
                    or (results.kick_counts and self.nonfinite(results.kick_contexts))
                )
            ):
                contexts = None
        if contexts is None:
            for job, o in zip(jobs, results.outcomes(), strict=True):
                self.finish(lane, job, o)
            return
        targets = cast("list[Lane]", found)
        names = [target.name for target in targets]  # the lanes' own strings, shared by jobs
        next_context, next_other = iter(contexts).__next__, iter(results.others).__next__
        kick_states, kicked = results.kick_states, 0  # kicked: kicks applied so far
        # Per target: how many jobs go there, and its queue's append (None for a
        # terminal state). Counts and pending lanes are settled once, after the loop.
        moved = [0] * len(targets)
        appends = [None if t.terminal else t.queue.append for t in targets]
        now = self.now
        counts = results.kick_counts or [0] * len(jobs)
        for job, k, n in zip(jobs, results.plain, counts, strict=True):
            if k < 0:
                self.finish(lane, job, next_other())
                continue
            if n:  # before the job moves, as in `finish`
                end = kicked + n
                kick_lanes = [targets[i] for i in kick_states[kicked:end]]
                self.kick(job, kick_lanes, kick_contexts[kicked:end])
                kicked = end
            job.context = next_context()
            if job.retries:  # a read is cheaper than a write, and it is 0 but after errors
                job.retries = 0
            job.last_update = now
            job.state = names[k]
            moved[k] += 1
            if (append := appends[k]) is not None:
                append(job)
        for target, n in zip(targets, moved, strict=True):
            if n:
                if target is not lane:
                    lane.count -= n
                    target.count += n
                if target.terminal:
                    self.active -= n
                else:
                    self.pending[target] = None

    def finish(self, lane: Lane, job: Job[Any], o: Outcome) -> None:
        """Apply one exec's outcome to its job: all of it, or (on a problem) none of it."""
        if o.code or o.error is not None:
            lane.metrics.errors += 1
        if o.code == FAILED_ATTEMPT:
            if o.trace is not None and self.debug:
                log.debug("job %s: exec of state %r raised\n%s", job.id, lane.name, o.trace)
            self.failed_attempt(lane, job, o.error or "failed")
            return
        rate_limited = o.code == RATE_LIMITED
        if rate_limited and not o.next_state:
            # RateLimitError raised: nothing returned to apply.
            self.record_error(job, lane.name, o.error or "RateLimitError")
            self.rate_limited(lane, job, o.retry_after)
            return
        checked = self.check(lane, o, rate_limited)
        if isinstance(checked, str):
            self.failed_attempt(lane, job, f"exec of state {lane.name!r} {checked}")
            return
        context, target, kick_lanes, kick_contexts = checked
        # Validated: from here on nothing can fail, so the transition is atomic.
        job.context = context
        if o.error is not None:
            self.record_error(job, lane.name, o.error)
        if kick_lanes:
            self.kick(job, kick_lanes, kick_contexts)
        if rate_limited:
            self.rate_limited(lane, job, o.retry_after)
            return
        if lane.gate is not None:
            lane.gate.success()
        job.retries = 0
        self.move(job, lane, target)

    def check(
        self, lane: Lane, o: Outcome, rate_limited: bool
    ) -> tuple[Any, Lane, list[Lane], list[Any]] | str:
        """Decode and validate an outcome: (context, target lane, kick lanes, kick
        contexts), or what is wrong with it (also: a context holding a NaN or an
        infinity that the run's checkpoint cannot store)."""
        try:
            context = self.decode(o.context)
        except msgspec.ValidationError as exc:
            return f"returned a context that is not a valid {self.job_type_name}: {exc}"
        target = lane if rate_limited else self.lanes.get(o.next_state)
        if target is None:
            return f"returned unknown next state {o.next_state!r}"
        kick_lanes: list[Lane] = []
        for state in o.kick_states or ():
            kick_lane = self.lanes.get(state)
            if kick_lane is None:
                return f"kicked a job into unknown state {state!r}"
            kick_lanes.append(kick_lane)
        kick_contexts: list[Any] = []
        if kick_lanes:
            try:
                kick_contexts = self.decode_many(o.kick_contexts)
            except msgspec.ValidationError as exc:
                return (
                    f"kicked a job with a context that is not a valid {self.job_type_name}: {exc}"
                )
        if self.nonfinite_reason is not None:
            found = _floats.nonfinite_in(o.context)
            if found is not None:
                return (
                    "returned a context holding a non-finite float "
                    f"({_floats.describe(found)}), {self.nonfinite_reason}"
                )
            if kick_lanes:
                found = _floats.nonfinite_in(o.kick_contexts)
                if found is not None:
                    path, value = found  # $[i].field: kick i
                    i, _, rest = path[2:].partition("]")
                    return (
                        "kicked a job with a context holding a non-finite float "
                        f"({value!r} at ${rest} of kick {i}), {self.nonfinite_reason}"
                    )
        return context, target, kick_lanes, kick_contexts

    @staticmethod
    def nonfinite(data: msgspec.Raw) -> bool:
        """Whether the msgpack ``data`` holds a NaN or an infinity (precisely: a cheap
        search first, a walk of the decoded data only when it finds something)."""
        return _floats.nonfinite_in(data) is not None

    def rate_limited(self, lane: Lane, job: Job[Any], retry_after: float | None) -> None:
        """A RateLimitError: back the limiter off and retry, without a failed attempt."""
        if lane.gate is not None:
            lane.gate.backoff(retry_after)  # (an AIMD limiter holds its rate until then)
        if retry_after:
            self.retry_later(lane, job, retry_after)
        else:
            self.move(job, lane, lane)

    def failed_attempt(self, lane: Lane, job: Job[Any], error: str) -> None:
        """Record a failed attempt: retry in the same state after the state's retry
        delay, or after max_retries move on."""
        self.record_error(job, lane.name, error)
        job.retries += 1
        limit = lane.state.max_retries
        if limit is not None and job.retries > limit:
            job.retries = 0
            if self.debug:
                log.debug("job %s: %d failed attempts in %r", job.id, limit + 1, lane.name)
            self.move(job, lane, self.lanes[lane.state.error_state])
            return
        delay = lane.state.retry_seconds(job.retries)
        if delay > 0:
            self.retry_later(lane, job, delay)
        else:
            self.move(job, lane, lane)

    def move(self, job: Job[Any], src: Lane, dst: Lane) -> None:
        """Put a job in ``dst`` (the back of its queue if it has work to do)."""
        job.last_update = self.now
        if dst is not src:
            if self.debug:
                log.debug("job %s: %s -> %s", job.id, src.name, dst.name)
            src.count -= 1
            dst.count += 1
            job.state = dst.name
            if dst.terminal:
                self.active -= 1
        if not dst.terminal:
            dst.queue.append(job)
            self.pending[dst] = None

    def kick(self, parent: Job[Any], lanes: list[Lane], contexts: list[Any]) -> None:
        """Create the jobs kicked by ``parent``, one per lane and context; each id counts
        every kick the parent ever made."""
        add, now, parent_id = self.run.jobs.setdefault, self.now, parent.id
        prefix = parent_id + "->"
        n = parent.kicks
        children = []
        for lane, context in zip(lanes, contexts, strict=True):
            job_id = prefix + (_DIGITS[n] if 0 <= n < _SMALL else str(n))
            child: Job[Any] = Job(
                id=job_id, context=context, state=lane.name, parent=parent_id, last_update=now
            )
            while add(job_id, child) is not child:
                # Taken: never replace an existing job, whatever happened before.
                n += 1
                child.id = job_id = prefix + str(n)
            n += 1
            children.append(child)
            if self.debug:
                log.debug("job %s: kicked %s into %r", parent_id, job_id, lane.name)
        parent.kicks = n
        if lanes.count(lanes[0]) == len(lanes):  # the usual: all into one state, at once
            self.arrive(lanes[0], children)
        else:
            for lane, child in zip(lanes, children, strict=True):
                self.arrive(lane, [child])
        if self.jobs_changed is not None:
            self.jobs_changed(children)

    def arrive(self, lane: Lane, jobs: list[Job[Any]]) -> None:
        """Count new jobs in ``lane``, and queue them if it has work to do."""
        lane.count += len(jobs)
        if not lane.terminal:
            self.active += len(jobs)
            lane.queue.extend(jobs)
            self.pending[lane] = None

    def retry_later(self, lane: Lane, job: Job[Any], delay: float) -> None:
        """Keep a job in its state but out of the queue for ``delay`` seconds (a retry
        delay, a Retry-After); the time is noted on the job, for the checkpoint."""
        job.last_update = self.now
        job.not_before = time.time() + delay
        self.delays.add(lane, job)

    def release(self, lane: Lane, job: Job[Any]) -> None:
        job.not_before = None
        if self.stopping:
            return  # it keeps its place in the checkpoint's eyes: a job in its state
        lane.queue.append(job)
        self.settle(lane)

    @staticmethod
    def record_error(job: Job[Any], state: str, text: str) -> None:
        errors = job.state_errors.setdefault(state, [])
        if len(errors) >= MAX_ERRORS_PER_STATE:
            del errors[1]
        errors.append(text)
