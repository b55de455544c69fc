"""How outcomes become transitions: the part of the coordinator that applies what
execs returned to their jobs (next state, context, errors, kicks, retries).

A mixin of `Coordinator` rather than an object of its own: `finish_batch` is the cost
per transition of the whole engine, and reaching the coordinator's state through
``self`` keeps it one attribute lookup away. Everything here runs on the loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from . import _floats
from ._delays import DelayQueue
from ._protocol import FAILED_ATTEMPT, RATE_LIMITED, Outcome, Results
from .run import Job, Run

if TYPE_CHECKING:
    from ._lane import Lane

__all__ = ["MAX_ERRORS_PER_STATE", "Transitions"]

log = logging.getLogger("jorbmp")

# Errors kept per job and state; a job retried forever must not grow without bound.
# The first error is always kept (it is often the telling one), then the latest.
MAX_ERRORS_PER_STATE = 100
# str(n) for the kick counts most parents stay under: formatting the number was a
# good part of building a kicked job's id.
_SMALL = 256
_DIGITS = tuple(str(n) for n in range(_SMALL))


class Transitions:
    """Applies batches of outcomes to their jobs (see `Coordinator`, which owns the
    state named below)."""

    run: Run[Any, Any]
    lanes: dict[str, Lane]
    decode: Callable[[bytes], Any]
    decode_many: Callable[[bytes], list[Any]]
    job_type_name: str
    nonfinite_reason: str | None
    active: int
    stopping: bool
    debug: bool
    pending: dict[Lane, None]
    delays: DelayQueue
    jobs_changed: Callable[[list[Job[Any]]], None] | None
    now: Any

    def settle(self, lane: Lane) -> None:
        raise NotImplementedError

    def finish_batch(self, lane: Lane, jobs: list[Job[Any]], results: Results) -> None:
        """Apply a batch of outcomes from ``lane``, in order.

        This loop is the coordinator's cost per transition, so plain outcomes (a
        valid context, a known next state and maybe kicks, no error; see `Results`)
        are applied inline when the lane has no adaptive rate limiter and debug logging is off;
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
        gate = lane.gate
        # (An AIMD limiter hears of each success, in `finish`; other gates need not.)
        if (gate is None or gate.aimd is None) and not self.debug and None not in found:
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
            if job.traceback is not None:  # (also after a redrive, with no retries)
                job.traceback = None
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
            job.traceback = o.trace  # this last attempt's: None unless it raised
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
            job.traceback = None  # a failed attempt that did not raise
            self.failed_attempt(lane, job, f"exec of state {lane.name!r} {checked}")
            return
        context, target, kick_lanes, kick_contexts = checked
        # Validated: from here on nothing can fail, so the transition is atomic.
        job.context = context
        if job.traceback is not None and not rate_limited:  # (a RateLimitError leaves it)
            job.traceback = None
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
        delay, a Retry-After), timed by the loop's monotonic clock; the wall time is
        noted on the job, for the checkpoint (a resume)."""
        job.last_update = self.now
        job.not_before = time.time() + delay
        self.delays.add(lane, job, delay)

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
