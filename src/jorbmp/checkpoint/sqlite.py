"""`SqliteSerializer`: the run in an SQLite database, one row per job, queryable with SQL.

Schema (``PRAGMA application_id`` marks the file as a jorbmp checkpoint)::

    run   (id = 0, format, name, overall JSON, next_id)                 one row
    jobs  (id TEXT PRIMARY KEY, state, context JSON, state_errors JSON,
           parent, retries, kicks, last_update RFC 3339 UTC,
           not_before REAL seconds since the epoch, or NULL,
           traceback TEXT of the last attempt if it raised, or NULL)   one row per job

(``not_before`` and ``traceback`` came later: a database without one is read as if
it were NULL everywhere, and gains the column when it is next opened for writing.)

Contexts are JSON text (msgspec), so a run can be inspected while it executes, best
read-only (``mode=ro``: a plain ``sqlite3 run.db`` creates an empty file where there is
none yet, and may write)::

    sqlite3 "file:run.db?mode=ro" \
        "select id, json_extract(context, '$.path') from jobs where state='failed'"

(Such a reader leaves an empty -wal and a -shm file beside a database that no one
was writing, which it cannot remove; the next jorbmp write does.)

Jobs load back in insertion order (``rowid``); an upsert keeps a job's row (and its
place). There is no index besides the primary key, so writes stay cheap; add one
(``create index jobs_state on jobs (state)``) if you query a big run by state often.

While a processor executes the run, a writer thread does the writing, so the
coordinator only encodes rows. Every flush (at most every ``interval`` seconds) hands
the writer one step, and exactly one transaction (WAL mode, ``synchronous=FULL``: each
commit is fsynced) holds, per step:

- Usually: the jobs that changed since the previous step (each batch of transitions
  whole: a job, its kicks and the jobs it changed), upserted, and the run's
  ``next_id`` and report. While the writer is busy, changed jobs collect (and
  coalesce) for the next step. The final flush waits for the disk.
- When the file already holds the run as the execution began (this process loaded or
  wrote it, and the file has not changed since: `Serializer._base_jobs`), the first
  steps are as usual, plus a *rewrite pass* that stores every job once more, so that
  what was changed in the Run object itself before the execution (``redrive``, an
  edited context) reaches the file: the first step also stores the jobs added since
  the file was written; the pass waits for jobs to change (`FIRST_WAIT_PER_JOB` each,
  as a run that goes through its jobs quickly changes them anyway), then each step
  also rewrites at most `REWRITE_JOBS_PER_STEP` of the jobs that have not changed yet,
  and the final step all that are left. Every step commits: a kill loses at most the
  transitions of one ``interval``, whatever the size of the run.
- Otherwise (a new file, or one that holds something else), nothing valid for this
  run is in the file until the whole run is: the *first write* stores the whole run
  (its job rows replaced) in one transaction spanning the steps of about an
  ``interval``. It trails the processor: each step stores the run's jobs, in order,
  as far as they have changed, so that jobs the run goes through quickly are written
  once; the step after an ``interval`` (or the final one) stores the rest and the jobs
  that changed since, and commits. A kill before that loses what was done meanwhile
  (an ``interval`` and the time the write takes). A new database is built beside the
  path (without journal or fsyncs, as no one sees it), made durable and renamed into
  place, so it appears complete or not at all; an existing one is rewritten in place.
  A 0-byte file (no database: a ``sqlite3`` shell run before the first write made it)
  is replaced like a missing one, never written in place. Until then the file holds
  what it held before (nothing, or something this run replaces).

After a crash, a reload has every committed step; SQLite rolls back a torn one.

Reading (`deserialize`, `overview`) never writes, and reads one consistent snapshot,
even while a writer is at work: see `jorbmp.checkpoint._sqlite_read`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from ..errors import CheckpointSpaceError
from ..run import Job, Run
from ._incremental import IncrementalSerializer
from ._sqlite_read import APPLICATION_ID, SQLITE_FORMAT, RunReader, SnapshotReader
from ._sqlite_write import (
    _CHUNK,
    _NO_ERRORS,
    _NO_PARENT,
    _NO_TIME,
    _NO_TRACEBACK,
    _SHORT_WIDTH,
    _WIDTH,
    REWRITE_JOBS_PER_STEP,
    SqliteWriter,
    _Head,
    _Rows,
)
from .base import FileStates, file_state
from .overview import Overview

__all__ = ["APPLICATION_ID", "SqliteSerializer"]

log = logging.getLogger("jorbmp")


class _Rewrite:
    """How far the rewrite pass of an execution is (see the module docstring). The
    coordinator thread prepares its steps; the writer thread sets ``stored`` and
    ``added`` as they commit, which the coordinator reads only while the writer is idle
    (so a step that failed is simply made again)."""

    def __init__(self, jobs: list[Job[Any]], added: list[Job[Any]], deadline: float) -> None:
        self.jobs = jobs  # the run's jobs that the file held when it began, in order
        self.added = added  # the jobs added to the run since, not stored yet
        self.deadline = deadline  # when it stops waiting for jobs to change
        self.stored = 0  # jobs[:stored] are in the file as they are now, or have changed
        self.changed: set[str] = set()  # ids of the jobs that changed since it began


class _FirstWrite:
    """How far the first write of an execution is (coordinator thread)."""

    def __init__(self, jobs: list[Job[Any]], deadline: float) -> None:
        self.jobs = jobs  # the run's when it began, stored in this order
        self.deadline = deadline  # when it stops waiting for jobs to change
        self.started = False  # a step went to the writer
        self.done = 0  # jobs[:done] went to the writer
        self.seen = 0  # jobs[:seen] had changed at the flush before
        self.changed: dict[str, Job[Any]] = {}  # changed since it began, or was stored


class SqliteSerializer(IncrementalSerializer):
    """The run in an SQLite database (WAL): one row per job, contexts as JSON text.

    Each flush (at most every ``interval`` seconds) upserts the jobs that changed in
    one transaction, from a background thread; query the file with any SQLite client
    meanwhile (``json_extract(context, '$.field')``).
    """

    _thread_name = "jorbmp-sqlite"
    stores_nonfinite_floats = False  # JSON (see `jorbmp._floats`)

    def __init__(
        self,
        path: str | os.PathLike[str],
        overall_type: Any = None,
        job_type: Any = None,
        *,
        interval: float = 0.2,
    ) -> None:
        self._setup(path, overall_type, job_type)
        self.interval = interval
        self._encode = msgspec.json.Encoder().encode
        self._reader = RunReader(self.path, self.overall_type, self.job_type)
        self._reset_batches()
        self._db = SqliteWriter(self.path, self._state)  # the writer thread's
        self._need_full = False  # the next write must store the whole run
        self._first: _FirstWrite | None = None  # the first write, while it is not done
        self._rewrite: _Rewrite | None = None  # the rewrite pass, while it is not done
        self._run: Run[Any, Any] | None = None  # while executing

    def __repr__(self) -> str:
        state = f" dirty={len(self._dirty)}" if self._active else ""
        return f"SqliteSerializer({str(self.path)!r}){state}"

    # -- reading --------------------------------------------------------------------

    def _read(self) -> Run[Any, Any]:
        return SnapshotReader(self.path, self._lock).read(self._reader.load)

    def _files(self) -> tuple[Path, ...]:
        # A commit appends to the -wal file; closing the last connection folds it
        # into the database (whose modification time changes) and removes it.
        return (self.path, self.path.with_name(self.path.name + "-wal"))

    def _state(self) -> FileStates:
        # An empty -wal file holds nothing: a reader may leave one (it cannot remove it).
        db, wal = file_state(*self._files())
        return (db, None if wal is None or wal[2] == 0 else wal)

    def overview(self) -> Overview:
        """Counts and top errors by SQL, without loading the jobs: what ``overview_of(
        self.deserialize())`` gives, from one snapshot, read as `deserialize` reads (the
        same errors for a missing, empty or foreign file, or a newer format).

        It reads only what it shows (besides the run's row): a job whose context or
        other fields no longer decode is counted, where `deserialize` refuses the run.
        A serializer given a job type loads the run, since only that checks the types."""
        if self.job_type is not None:
            return super().overview()
        self._check_present()
        return SnapshotReader(self.path, self._lock).read(self._reader.overview)

    # -- writing --------------------------------------------------------------------

    def _rows(self, jobs: list[Job[Any]], split: bool = True) -> _Rows:
        """The rows of ``jobs``, for `_insert`: short rows for jobs without errors,
        parent, retries, kicks, not_before or traceback, full rows for the others (all
        of them unless ``split``), each in the order of ``jobs``. ``CheckpointError`` for a
        job holding a NaN or an infinity, which JSON cannot hold (see `jorbmp._floats`)."""
        enc = self._encode
        short: list[Any] = []
        full: list[Any] = []
        add_short = short.extend
        add_full = full.extend
        # Jobs changed within the same millisecond share one datetime (see utcnow).
        last_time: Any = None
        last_text = ""
        for job in jobs:
            when = job.last_update
            if when is not last_time:
                last_time, last_text = when, enc(when)[1:-1].decode()  # RFC 3339
            errors = job._state_errors
            parent = job.parent
            not_before = job.not_before
            trace = job.traceback
            if (
                split
                and not errors
                and parent is None
                and not job.retries
                and not job.kicks
                and not_before is None
                and trace is None
            ):
                add_short((job.id, job.state, enc(job.context).decode(), last_text))
                continue
            add_full((
                job.id,
                job.state,
                enc(job.context).decode(),
                enc(errors).decode() if errors else _NO_ERRORS,
                _NO_PARENT if parent is None else parent,
                job.retries,
                job.kicks,
                last_text,
                _NO_TIME if not_before is None else not_before,
                _NO_TRACEBACK if trace is None else trace,
            ))  # fmt: skip
        # msgspec writes NaN and infinities as null, which would not read back: refuse
        # them. Contexts without "null" (no None, either) hold none (~20 ns a job).
        texts = "".join(short[2::_SHORT_WIDTH]) + "".join(full[2::_WIDTH])
        if texts.find("null") >= 0:
            from .._floats import nonfinite_in_jobs, refuse

            refuse(self.path, self, nonfinite_in_jobs(jobs))
        return short, full

    def _in_order(self, jobs: list[Job[Any]]) -> list[_Rows]:
        """The rows of ``jobs`` for `_insert`, in chunks of rows of one kind, so that
        they are inserted in this order (the order they load back in)."""
        chunks = []
        for start in range(0, len(jobs), _CHUNK):
            chunk = jobs[start : start + _CHUNK]
            rows = self._rows(chunk)
            chunks.append(self._rows(chunk, split=False) if rows[0] and rows[1] else rows)
        return chunks

    def _head(self, run: Run[Any, Any]) -> _Head:
        from .._floats import nonfinite_in_head, refuse

        refuse(self.path, self, nonfinite_in_head(run))  # JSON has no NaN nor infinity
        report = None if run.report is None else self._encode(run.report).decode()
        return (SQLITE_FORMAT, run.name, self._encode(run.overall).decode(), run.next_id, report)

    def _write_run(self, run: Run[Any, Any]) -> None:
        """The whole run, in one transaction."""
        # (What can refuse the run goes first: nothing to undo.)
        head = self._head(run)
        self._db.write_run(head, self._in_order(list(run.jobs.values())))

    def _store_first(self, chunks: list[_Rows], commit: tuple[_Head, _Rows] | None) -> None:
        """Writer thread: one step of the first write (see `SqliteWriter.store_first`)."""
        if self._db.store_first(chunks, commit):
            self._need_full = False
            self.writes += 1

    def _store_rewrite(self, rewrite: _Rewrite, chunks: list[_Rows], head: _Head, end: int) -> None:
        """Writer thread: one step of the rewrite pass, in one transaction: upsert
        ``chunks`` (in order) and the run's row; then ``rewrite.jobs[:end]`` are done."""
        self._db.store_all(chunks, head)
        rewrite.stored = end
        rewrite.added = []
        if end == len(rewrite.jobs):
            self._need_full = False
        self.writes += 1

    def _store(self, rows: _Rows, next_id: int, report: str | None) -> None:
        """Writer thread: one batch of changed jobs, in one transaction."""
        self._db.store(rows, next_id, report)
        self.writes += 1

    # -- processor hooks ------------------------------------------------------------

    def begin(self, run: Run[Any, Any]) -> None:
        base = self._claim(run)
        # Nothing is written here: the processor starts meanwhile, and the writer thread
        # writes from the first flush on, either the first write or the steps of the
        # rewrite pass (see the module docstring). Until the first commit, the file
        # holds what it held before.
        self._reset_batches()
        self._need_full = True
        self._first = None
        self._rewrite = None
        if base is not None:
            jobs = list(run.jobs.values())
            self._rewrite = _Rewrite(jobs[:base], jobs[base:], self._patient_deadline(run))
        self._run = run
        self._active = True

    @property
    def _urgent(self) -> bool:
        if not self._need_full:
            return False
        rewrite = self._rewrite
        if rewrite is None or self._final:
            return True  # the first write: a step at every flush until it commits
        # A step of the rewrite pass beyond the changed jobs, at most every interval:
        # the jobs added before the execution at once, the others once waiting is over.
        # (Read while the writer is idle, as `_prepare` is.)
        now = time.monotonic()
        return now - self._last_flush >= self.interval and (
            bool(rewrite.added) or now >= rewrite.deadline
        )

    def _prepare(self, run: Run[Any, Any], jobs: dict[str, Job[Any]]) -> Callable[[], None]:
        if self._need_full:
            if self._rewrite is not None:
                return self._prepare_rewrite(run, jobs)
            return self._prepare_first(run, jobs)
        self._first = self._rewrite = None
        head = self._head(run)
        return partial(self._store, self._rows(list(jobs.values())), head[3], head[4])

    def _prepare_rewrite(self, run: Run[Any, Any], jobs: dict[str, Job[Any]]) -> Callable[[], None]:
        """The next step of the rewrite pass: the jobs that changed, the jobs added
        before the execution (until they are stored), and, once waiting is over, up to
        `REWRITE_JOBS_PER_STEP` of the jobs that have not changed (all that are left at
        the final flush). A step that failed is made again: the writer notes how far
        the pass is only when a step commits."""
        rewrite = self._rewrite
        assert rewrite is not None
        changed = rewrite.changed
        changed.update(jobs)
        start = rewrite.stored
        total = len(rewrite.jobs)
        if self._final:
            end = total
        elif time.monotonic() >= rewrite.deadline:
            end = min(total, start + REWRITE_JOBS_PER_STEP)
        else:
            end = start
        take = [job for job in rewrite.jobs[start:end] if job.id not in changed]
        added = [job for job in rewrite.added if job.id not in jobs]
        # Added jobs first and in order: they are new rows, which load back in the
        # order they were inserted (changed ones are upserts in place, or kicks).
        chunks = [*self._in_order(added), self._rows([*jobs.values(), *take])]
        return partial(self._store_rewrite, rewrite, chunks, self._head(run), end)

    def _prepare_first(self, run: Run[Any, Any], jobs: dict[str, Job[Any]]) -> Callable[[], None]:
        """The next step of the first write: the whole run, in one transaction, stored
        over several flushes.

        A job that has not changed yet in this execution is likely to change soon in a
        run that goes through its jobs quickly: storing it now would write it twice.
        So the first write trails the processor. Each flush stores the run's jobs, in
        order, up to the first that had not changed at the flush before (a job often
        changes again soon after: its next state), in whole chunks. It waits so at most
        an interval (nothing of this execution is durable meanwhile), or until the
        final flush, then stores the rest. The
        step that stores the last jobs also stores those that changed since they were
        stored (and new ones), and commits: the run as it is at this flush."""
        first = self._first
        if first is None or (first.started and self._db.filling is None):  # or a step failed
            first = self._first = _FirstWrite(list(run.jobs.values()), self._first_deadline())
        first.started = True
        changed = first.changed
        changed.update(jobs)
        order = first.jobs
        total = len(order)
        if self._final or time.monotonic() >= first.deadline:
            end = total
        else:
            end = first.done + (first.seen - first.done) // _CHUNK * _CHUNK
        take = order[first.done : end]
        pop = changed.pop
        for job in take:
            pop(job.id, None)
        first.done = end
        seen = max(first.seen, end)
        while seen < total and order[seen].id in changed:
            seen += 1
        first.seen = seen
        commit = None
        if end == total:
            commit = (self._head(run), self._rows(list(changed.values())))
        return partial(self._store_first, self._in_order(take), commit)

    def end(self) -> None:
        run, self._run = self._run, None
        try:
            if self._active and self._need_full and run is not None:
                # Nothing flushed yet (a run with nothing to execute): write it now.
                try:
                    self.flush(run, final=True)
                except CheckpointSpaceError as exc:
                    # The processor's own final write met it first, and said so.
                    log.info("%s", exc)
        finally:
            try:
                written = self._stop_writer(self._db.close)
                # The file now holds the run exactly, if every write succeeded: a later
                # execution of it in this process can start with the rewrite pass.
                complete = written and not self._need_full and not self._dirty
                if run is not None:
                    self._wrote(run, complete)
            finally:
                self._release()
