"""What the incremental formats (journal, SQLite) share: dirty jobs, batches, one writer.

::

    coordinator thread                           writer thread (one, started lazily)
    ──────────────────                           ───────────────────────────────────
    jobs_changed(jobs): dirty[job.id] = job  O(1) per job
    flush(): every `interval`, if the writer is idle,
             encode the dirty jobs ──── write ──>  append / commit / compact, fsync
    flush(final=True): wait, hand off the rest, wait again

Jobs are mutable and belong to the coordinator thread, so they are encoded there;
the writer only sees bytes (or rows) and does the I/O. At most one write is in
flight: while the writer is busy, changed jobs stay in the dirty set, where repeated
changes of a job coalesce, so a slow disk makes batches bigger, never a queue longer.
A write that fails makes its jobs dirty again; the error fails the run (as a failed
`JsonSerializer` write does), and the final flush tries once more. One that fails for
lack of space raises `CheckpointSpaceError`, for which the processor waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from operator import attrgetter
from pathlib import Path
from typing import Any

from ..run import Job, Run
from ._space import is_space_error, space_error
from .base import Serializer

__all__ = ["IncrementalSerializer"]

log = logging.getLogger("jorbmp")

_job_id = attrgetter("id")

# A first write that can wait (the file already holds the run as it began: see
# `SqliteSerializer`'s rewrite pass) waits for jobs to change before it rewrites them,
# at most this long per job in the run (at least an ``interval``): about twice what
# storing them can take on a busy machine. A run that goes through its jobs quickly
# then has each of them written once, not once as loaded and again as changed.
FIRST_WAIT_PER_JOB = 20e-6


class IncrementalSerializer(Serializer):
    """Base of formats that write only what changed, from a background writer thread.

    Subclasses set ``path`` and ``interval``, call `_reset_batches` in `begin`, implement
    `_prepare` and call `_stop_writer` in `end`.
    """

    path: Path
    interval: float
    _thread_name = "jorbmp-checkpoint"

    _dirty: dict[str, Job[Any]]
    _last_flush: float
    _writer: ThreadPoolExecutor | None = None
    _pending: Future[None] | None = None
    _pending_jobs: dict[str, Job[Any]]
    _active = False  # between begin and end
    _final = False  # the flush under way is the final one

    def _reset_batches(self) -> None:
        self._dirty = {}
        self._pending_jobs = {}
        self._pending = None
        self._last_flush = time.monotonic()

    @property
    def _urgent(self) -> bool:
        """Write at the next flush, whether jobs changed and the interval passed or not."""
        return False

    def _prepare(self, run: Run[Any, Any], jobs: dict[str, Job[Any]]) -> Callable[[], None]:
        """Coordinator thread: encode ``jobs`` (changed since the last write) and return
        what the writer thread must do to store them."""
        raise NotImplementedError

    def job_changed(self, job: Job[Any]) -> None:
        self._dirty[job.id] = job

    def jobs_changed(self, jobs: Sequence[Job[Any]]) -> None:
        # A loop in C, with no Python call per job.
        self._dirty.update(zip(map(_job_id, jobs), jobs, strict=True))

    _run_dirty = False

    def run_changed(self) -> None:
        self._run_dirty = True

    def _first_deadline(self) -> float:
        """When the first write of an execution that must store the whole run stops
        waiting for jobs to change. Nothing this execution does is in the file before
        that write is complete, so it waits no more than an ``interval``: a kill loses
        at most that, plus the time the write takes."""
        return time.monotonic() + self.interval

    def _patient_deadline(self, run: Run[Any, Any]) -> float:
        """When a first write that can wait (see `FIRST_WAIT_PER_JOB`) stops waiting."""
        return time.monotonic() + max(self.interval, FIRST_WAIT_PER_JOB * len(run.jobs))

    def serialize(self, run: Run[Any, Any]) -> None:
        """Write the whole run now (see `Serializer.serialize`); not while a processor
        executes a run with this serializer (``RuntimeError``): its writer owns the file."""
        if self._active:
            raise RuntimeError(f"{self!r}: a processor is executing a run with it")
        super().serialize(run)

    def flush(self, run: Run[Any, Any], final: bool = False) -> None:
        self._final = final
        if not self._active:
            return  # not executing (begin failed or was never called)
        if not self._settle(final):
            return  # the writer is busy: let the batch grow
        urgent = self._urgent or self._run_dirty
        if not self._dirty and not urgent:
            return
        now = time.monotonic()
        if not final and not urgent and now - self._last_flush < self.interval:
            return
        self._last_flush = now
        jobs, self._dirty = self._dirty, {}
        self._run_dirty = False  # the record written now carries the run's fields
        try:
            write = self._prepare(run, jobs)
        except BaseException:
            self._dirty = {**jobs, **self._dirty}
            raise
        if self._writer is None:
            # Started at the first write, after the processor forked its first workers.
            self._writer = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
        self._pending_jobs = jobs
        self._pending = self._writer.submit(write)
        if final:
            self._settle(final=True, retry=False)

    def _settle(self, final: bool, retry: bool = True) -> bool:
        """Collect the write in flight, waiting for it when ``final``; False if it is
        still running. A failed write's jobs become dirty again; its error is raised,
        except on a final flush that may still ``retry``."""
        pending = self._pending
        if pending is None:
            return True
        if not pending.done():
            if not final:
                return False
            wait_for([pending])
        self._pending = None
        jobs, self._pending_jobs = self._pending_jobs, {}
        failed = pending.exception()
        if failed is None:
            return True
        self._dirty = {**jobs, **self._dirty}
        space = is_space_error(failed)
        if space:
            # The write was undone (a journal's append cut back, an SQLite transaction
            # rolled back, a snapshot's temporary file removed): the file is as the last
            # write left it.
            failed = space_error(self.path, failed)
        if not (final and retry):
            raise failed
        # (The processor tells of a lack of space itself: `jorbmp._checkpoint_guard`.)
        level = logging.INFO if space else logging.ERROR
        log.log(level, "%s: checkpoint write failed (%s); retrying", self.path, failed)
        return True

    def _stop_writer(self, last: Callable[[], None] | None = None) -> bool:
        """Wait for the write in flight, run ``last`` on the writer thread (if it was
        started) and stop it; False if either failed. Errors are logged: this runs in
        `end`, after the final flush has reported them."""
        writer, self._writer = self._writer, None
        self._active = False
        if writer is None:
            return True
        ok = True
        try:
            if self._pending is not None:
                wait_for([self._pending])
                failed = self._pending.exception()
                if failed is not None:
                    ok = False
                    log.error("%s: checkpoint write failed: %s", self.path, failed)
                self._pending = None
            if last is not None:
                error = writer.submit(last).exception()
                if error is not None:
                    ok = False
                    log.error("%s: closing the checkpoint failed: %s", self.path, error)
        finally:
            writer.shutdown(wait=True)
        return ok
