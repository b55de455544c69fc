"""`SqliteSerializer`: the run in an SQLite database, one row per job, queryable with SQL.

Schema (``PRAGMA application_id`` marks the file as a jorbmp checkpoint)::

    run   (id = 0, format, name, overall JSON, next_id)                 one row
    jobs  (id TEXT PRIMARY KEY, state, context JSON, state_errors JSON,
           parent, retries, kicks, last_update RFC 3339 UTC,
           not_before REAL seconds since the epoch, or NULL)           one row per job

(``not_before`` came later: a database without it is read as if it were NULL
everywhere, and gains the column when it is next opened for writing.)

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

import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from ..run import Job, Run
from ._incremental import IncrementalSerializer
from ._sqlite_read import APPLICATION_ID, SQLITE_FORMAT, RunReader, SnapshotReader, columns
from .base import FileStates, file_state, fsync_dir, make_parents, temp_path
from .overview import Overview

__all__ = ["SqliteSerializer"]

log = logging.getLogger("jorbmp")

# Seconds a write waits for a lock held by someone else's connection (a user's
# long read transaction in the sqlite3 shell), before failing the run.
BUSY_TIMEOUT = 30.0
# Page cache of the writer's connection (KiB): upserts land all over the primary key's
# b-tree, so a cache that holds a big run's pages saves re-reading them. Memory is
# only used as pages are touched.
CACHE_KIB = 64 * 1024
# Page size of new databases: bigger pages than SQLite's 4 KiB make the primary key's
# b-tree shallower, upserts ~10% cheaper; reads of a few rows barely notice.
PAGE_SIZE = 16384
# Rows per INSERT statement (twice as many short rows, see _SHORT_ROW), within
# SQLite's limit on parameters per statement (32,766 since 3.32, 999 before). Each
# statement makes the writer thread take Python's GIL back twice, and it often waits
# milliseconds for it behind the busy coordinator thread: few, long statements keep
# the writer up with a fast run. Not longer: preparing one costs more per row than
# running it (sqlite3 keeps the few distinct ones, per connection).
ROWS_PER_STATEMENT = 2000 if sqlite3.sqlite_version_info >= (3, 32) else 999 // 9
_CHUNK = 2 * ROWS_PER_STATEMENT  # jobs the first write stores at a time
# Jobs a step of the rewrite pass rewrites besides the changed ones: a few tens of
# milliseconds of work per step, so that a step still commits about an interval
# after the transitions it holds.
REWRITE_JOBS_PER_STEP = 2 * _CHUNK

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS run (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        format INTEGER NOT NULL,
        name TEXT NOT NULL,
        overall TEXT NOT NULL,
        next_id INTEGER NOT NULL,
        report TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        context TEXT NOT NULL,
        state_errors TEXT NOT NULL,
        parent TEXT,
        retries INTEGER NOT NULL,
        kicks INTEGER NOT NULL,
        last_update TEXT NOT NULL,
        not_before REAL
    )""",
)
_PUT_RUN = (
    "INSERT OR REPLACE INTO run (id, format, name, overall, next_id, report) "
    "VALUES (0, ?, ?, ?, ?, ?)"
)
_COLUMNS = "id, state, context, state_errors, parent, retries, kicks, last_update, not_before"
# A row's parameters. Python's sqlite3 binds str, int and float directly but takes a
# slow path for None (an adapter lookup that formats and drops an AttributeError), so
# a job without a parent binds the integer 0 there, which no id (text) equals, and one
# without a not_before binds NaN, which SQLite stores as NULL (it has no NaN). Most
# jobs have no errors, parent, retries, kicks nor not_before: a short row binds only
# the rest (about a quarter cheaper to write).
_ROW = "?, ?, ?, ?, NULLIF(?, 0), ?, ?, ?, ?"
_SHORT_ROW = "?, ?, ?, '{}', NULL, 0, 0, ?, NULL"
_WIDTH = 9  # parameters per row
_SHORT_WIDTH = 4
_NO_PARENT = 0
_NO_ERRORS = "{}"
_NO_TIME = float("nan")

# Rows for `_insert`, flattened: (short rows, full rows).
_Rows = tuple[list[Any], list[Any]]


@functools.cache
def _insert_sql(rows: int, upsert: bool, short: bool) -> str:
    """Insert ``rows`` jobs in one statement; ``upsert``: replace the rows of jobs that
    are there already (keeping their place). Binding all parameters, then one step for
    all rows, takes Python's GIL once per statement; executemany takes and drops it per
    row, and then stalls behind the coordinator thread each time."""
    values = ", ".join([f"({_SHORT_ROW if short else _ROW})"] * rows)
    sql = f"INSERT INTO jobs ({_COLUMNS}) VALUES {values}"
    if upsert:
        sql += """ ON CONFLICT (id) DO UPDATE SET
        state = excluded.state, context = excluded.context,
        state_errors = excluded.state_errors, parent = excluded.parent,
        retries = excluded.retries, kicks = excluded.kicks,
        last_update = excluded.last_update, not_before = excluded.not_before"""
    return sql


def _insert(conn: sqlite3.Connection, rows: _Rows, upsert: bool = True) -> None:
    """Insert ``rows``, the short ones first (new jobs keep their order: while a run
    executes, those are kicked jobs, with a parent, so all full rows): full statements,
    then the rest in power-of-two statements, so that only a few distinct statements
    are ever prepared (sqlite3 caches them). Without ``upsert`` the table must not hold
    these jobs (it is cheaper: no conflict handling)."""
    for values, short in ((rows[0], True), (rows[1], False)):
        width = _SHORT_WIDTH if short else _WIDTH
        most = 2 * ROWS_PER_STATEMENT if short else ROWS_PER_STATEMENT
        count = len(values) // width
        done = 0
        while done < count:
            n = min(most, 1 << ((count - done).bit_length() - 1))
            conn.execute(_insert_sql(n, upsert, short), values[done * width : (done + n) * width])
            done += n


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database that an earlier version wrote up to this schema: add the columns
    it lacks (nullable, so its rows stay as they were)."""
    names = columns(conn)
    if names and "not_before" not in names:
        conn.execute("ALTER TABLE jobs ADD COLUMN not_before REAL")


_Head = tuple[int, str, str, int, str | None]


def _companions(path: Path) -> tuple[Path, ...]:
    """The files SQLite keeps beside a database."""
    return tuple(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))


def _rename_durably(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
        self._conn: sqlite3.Connection | None = None  # the writer thread's own
        self._need_full = False  # the next write must store the whole run
        self._first: _FirstWrite | None = None  # the first write, while it is not done
        self._rewrite: _Rewrite | None = None  # the rewrite pass, while it is not done
        # The first write's connection, its transaction open, between its steps.
        self._filling: sqlite3.Connection | None = None
        self._tmp: Path | None = None  # the new database being built
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
        parent, retries, kicks or not_before, full rows for the others (all of them
        unless ``split``), each in the order of ``jobs``. ``CheckpointError`` for a
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
            if (
                split
                and not errors
                and parent is None
                and not job.retries
                and not job.kicks
                and not_before is None
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

    def _connect(self, path: Path, new: bool = False) -> sqlite3.Connection:
        """Open the database at ``path`` for writing. ``new``: a database being built
        beside the path, created here, owner-only, which no one sees before it is
        complete and fsynced (`_rename_durably`): it needs no journal on disk and no
        fsyncs of its own, until `_wal` sets WAL mode when it is built. Otherwise the
        database exists: it is never created in place (SQLite would create a missing
        one, through whatever link stands at its name), only ever renamed there."""
        if new:
            make_parents(path)
            for leftover in (path, *_companions(path)):  # (not through a link left there)
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            os.close(os.open(path, flags, 0o600))
        # SQLite gives the -wal and -shm files the database file's permissions.
        conn = sqlite3.connect(
            f"{path.as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT, isolation_level=None
        )
        try:
            if new:  # only an empty database, before WAL mode, can take a page size
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                conn.execute("PRAGMA journal_mode = MEMORY")
                conn.execute("PRAGMA synchronous = OFF")
            else:
                self._wal(conn, path)
                _migrate(conn)
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _wal(conn: sqlite3.Connection, path: Path) -> None:
        """WAL mode (stored in the file), each commit fsynced."""
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            log.warning("%s: SQLite refused WAL mode (using %s)", path, mode)
        conn.execute("PRAGMA synchronous = FULL")

    @staticmethod
    def _transaction(conn: sqlite3.Connection, body: Callable[[], None]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            body()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _head(self, run: Run[Any, Any]) -> _Head:
        from .._floats import nonfinite_in_head, refuse

        refuse(self.path, self, nonfinite_in_head(run))  # JSON has no NaN nor infinity
        report = None if run.report is None else self._encode(run.report).decode()
        return (SQLITE_FORMAT, run.name, self._encode(run.overall).decode(), run.next_id, report)

    def _start_all(self) -> sqlite3.Connection:
        """Open the transaction that stores the whole run (its job rows deleted), for
        `_insert` and then `_commit_all`. A new database is built beside the path, and
        renamed into place when it is complete; an existing one is rewritten in place.
        A file of 0 bytes (with no -wal holding anything) is no database, as for
        `deserialize`: someone's ``sqlite3`` shell made it. It is replaced the same way,
        never written in place, so that a kill before the first commit leaves it as it
        was, not a database without a run that no one may overwrite."""
        path = self.path
        db, wal = self._state()
        if self._conn is None and (db is None or (db[2] == 0 and wal is None)):
            tmp = temp_path(path)  # (`_acquire` removed any that a crash left)
            for leftover in _companions(path):
                # Orphans of a deleted database (or an empty -wal of a 0-byte file),
                # which SQLite would otherwise apply to the new one.
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            self._tmp = tmp
            conn = self._connect(tmp, new=True)
        else:
            if self._conn is None:
                self._conn = self._connect(path)
            conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("DELETE FROM jobs")
        except BaseException:
            self._abort_all(conn)
            raise
        return conn

    def _commit_all(self, conn: sqlite3.Connection, head: _Head, rows: _Rows) -> None:
        """Upsert ``rows`` and the run's row, and commit the transaction of `_start_all`;
        make a new database durable, then visible."""
        try:
            _insert(conn, rows)
            conn.execute(_PUT_RUN, head)
            conn.execute("COMMIT")
            if self._tmp is not None:
                self._wal(conn, self.path)
                conn.close()  # the WAL is folded in and gone
                _rename_durably(self._tmp, self.path)
                self._tmp = None
        except BaseException:
            self._abort_all(conn)
            raise

    def _abort_all(self, conn: sqlite3.Connection) -> None:
        """Roll back the transaction of `_start_all` (delete a new database)."""
        tmp, self._tmp = self._tmp, None
        if tmp is None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return
        try:
            conn.close()
        finally:
            for leftover in (tmp, *_companions(tmp)):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _write_run(self, run: Run[Any, Any]) -> None:
        """The whole run, in one transaction."""
        head = self._head(run)  # (what can refuse the run goes first: nothing to undo)
        try:
            conn = self._start_all()
            try:
                for rows in self._in_order(list(run.jobs.values())):
                    _insert(conn, rows, upsert=False)
            except BaseException:
                self._abort_all(conn)
                raise
            self._commit_all(conn, head, ([], []))
        finally:
            self._close()

    def _store_first(self, chunks: list[_Rows], commit: tuple[_Head, _Rows] | None) -> None:
        """Writer thread: one step of the first write of an execution: insert ``chunks``
        in the transaction that the first step opens. The last one (``commit``) upserts
        the jobs that changed since they were stored, and commits."""
        conn = self._filling
        if conn is None:
            conn = self._start_all()
        self._filling = None  # until this step succeeds: a failed one is rolled back
        try:
            for rows in chunks:
                _insert(conn, rows, upsert=False)
        except BaseException:
            self._abort_all(conn)
            raise
        if commit is None:
            self._filling = conn
            return
        self._commit_all(conn, *commit)
        self._need_full = False

    def _store(self, rows: _Rows, next_id: int, report: str | None) -> None:
        """Writer thread: store one batch of changed jobs, in one transaction."""
        if self._conn is None:
            self._conn = self._connect(self.path)
        conn = self._conn

        def body() -> None:
            _insert(conn, rows)
            conn.execute("UPDATE run SET next_id = ?, report = ?", (next_id, report))

        self._transaction(conn, body)

    def _store_rewrite(self, rewrite: _Rewrite, chunks: list[_Rows], head: _Head, end: int) -> None:
        """Writer thread: one step of the rewrite pass, in one transaction: upsert
        ``chunks`` (in order) and the run's row; then ``rewrite.jobs[:end]`` are done."""
        if self._conn is None:
            self._conn = self._connect(self.path)
        conn = self._conn

        def body() -> None:
            for rows in chunks:
                _insert(conn, rows)
            conn.execute(_PUT_RUN, head)

        self._transaction(conn, body)
        rewrite.stored = end
        rewrite.added = []
        if end == len(rewrite.jobs):
            self._need_full = False

    def _close(self) -> None:
        """Writer thread: abandon an unfinished first write; close the connection (the
        last one also folds the WAL back in)."""
        if self._filling is not None:
            conn, self._filling = self._filling, None
            self._abort_all(conn)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

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
        self._filling = None
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
        if first is None or (first.started and self._filling is None):  # or a step failed
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
                self.flush(run, final=True)
        finally:
            try:
                written = self._stop_writer(self._close)
                # The file now holds the run exactly, if every write succeeded: a later
                # execution of it in this process can start with the rewrite pass.
                complete = written and not self._need_full and not self._dirty
                if run is not None:
                    self._wrote(run, complete)
            finally:
                self._release()
