"""`SqliteSerializer`: the run in an SQLite database, one row per job, queryable with SQL.

Schema (``PRAGMA application_id`` marks the file as a jorbmp checkpoint)::

    run   (id = 0, format, name, overall JSON, next_id)                 one row
    jobs  (id TEXT PRIMARY KEY, state, context JSON, state_errors JSON,
           parent, retries, kicks, last_update RFC 3339 UTC)            one row per job

Contexts are JSON text (msgspec), so a run can be inspected while it executes::

    sqlite3 run.db "select id, json_extract(context, '$.path') from jobs where state='failed'"

Jobs load back in insertion order (``rowid``); an upsert keeps a job's row (and its
place). There is no index besides the primary key, so writes stay cheap; add one
(``create index jobs_state on jobs (state)``) if you query a big run by state often.

While a processor executes the run, a writer thread does the writing, so the
coordinator only encodes rows:

- `begin` locks and checks the file; the first flush (the next housekeeping tick)
  stores the whole run in one transaction. A new database is built beside the path
  and renamed into place, so it appears complete or not at all; an existing one is
  rewritten in place. Until then the file holds what it held before (nothing, or
  the run as loaded): a valid past of this run.
- `job_changed` notes the job (O(1)). Every ``interval`` seconds `flush` encodes the
  changed jobs as rows and the writer upserts them in one transaction (WAL mode,
  ``synchronous=FULL``: each commit is fsynced). While it is busy, changed jobs
  collect (and coalesce) for the next one. The final flush waits for the disk.

After a crash, a reload has every committed batch; SQLite rolls back a torn one.
Loading opens the file read-only and never changes it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sqlite3
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from ..errors import CheckpointError
from ..run import Job, Run
from ._incremental import IncrementalSerializer
from .base import CheckpointLock, format_hint, fsync_dir

__all__ = ["SqliteSerializer"]

log = logging.getLogger("jorbmp")

OC = TypeVar("OC")

APPLICATION_ID = 0x6A6F7262  # "jorb"
SQLITE_FORMAT = 1
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
# Rows per INSERT statement: big, so that the GIL is taken once per thousands of rows,
# within SQLite's limit on parameters per statement (32,766 since 3.32, 999 before).
ROWS_PER_STATEMENT = 4000 if sqlite3.sqlite_version_info >= (3, 32) else 999 // 8

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
        last_update TEXT NOT NULL
    )""",
)
_PUT_RUN = (
    "INSERT OR REPLACE INTO run (id, format, name, overall, next_id, report) "
    "VALUES (0, ?, ?, ?, ?, ?)"
)
_COLUMNS = "id, state, context, state_errors, parent, retries, kicks, last_update"
_WIDTH = 8  # parameters per row


@functools.cache
def _upsert_sql(rows: int) -> str:
    """Upsert ``rows`` jobs in one statement. Binding all parameters, then one step for
    all rows, takes Python's GIL once per statement; executemany takes and drops it per
    row, and then stalls behind the coordinator thread each time."""
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"""INSERT INTO jobs ({_COLUMNS}) VALUES {values}
    ON CONFLICT (id) DO UPDATE SET
        state = excluded.state, context = excluded.context,
        state_errors = excluded.state_errors, parent = excluded.parent,
        retries = excluded.retries, kicks = excluded.kicks,
        last_update = excluded.last_update"""


def _upsert(conn: sqlite3.Connection, values: list[Any]) -> None:
    """Upsert the rows in ``values`` (flat): full statements, then the rest in
    power-of-two statements, so that only a few distinct statements are ever prepared
    (sqlite3 caches them)."""
    rows = len(values) // _WIDTH
    done = 0
    while done < rows:
        n = min(ROWS_PER_STATEMENT, 1 << ((rows - done).bit_length() - 1))
        conn.execute(_upsert_sql(n), values[done * _WIDTH : (done + n) * _WIDTH])
        done += n


# Rows come back as JSON documents, so one typed msgspec decode checks a whole job
# and names the field that does not fit (``$.context.count``). No errors reads back as
# null, as a job that never had any holds them.
_GET_RUN = """SELECT json_object('format', format, 'name', name, 'next_id', next_id,
    'overall', json(overall), 'report', json(report)) FROM run"""
_GET_JOBS = """SELECT id, json_object('id', id, 'context', json(context), 'state', state,
    'state_errors', CASE state_errors WHEN '{}' THEN NULL ELSE json(state_errors) END,
    'parent', parent, 'last_update', last_update, 'retries', retries, 'kicks', kicks)
    FROM jobs ORDER BY rowid"""

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


class _RunRow(msgspec.Struct, Generic[OC]):
    format: int
    name: str
    next_id: int
    overall: OC
    report: dict[str, Any] | None = None


def _sniff(path: Path) -> str:
    """A hint about what a file that is not an SQLite database is."""
    try:
        with open(path, "rb") as f:
            return format_hint(f.read(32))
    except OSError:
        return ""


class SqliteSerializer(IncrementalSerializer):
    """The run in an SQLite database (WAL): one row per job, contexts as JSON text.

    Each flush (at most every ``interval`` seconds) upserts the jobs that changed in
    one transaction, from a background thread; query the file with any SQLite client
    meanwhile (``json_extract(context, '$.field')``).
    """

    _thread_name = "jorbmp-sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        overall_type: Any = None,
        job_type: Any = None,
        *,
        interval: float = 0.2,
    ) -> None:
        job: Any = self._setup(path, overall_type, job_type)
        self.interval = interval
        self._encode = msgspec.json.Encoder().encode
        self._run_decoder = msgspec.json.Decoder(_RunRow[self.overall_type])  # type: ignore[name-defined]
        self._job_decoder = msgspec.json.Decoder(Job[job])
        self._reset_batches()
        self._conn: sqlite3.Connection | None = None  # the writer thread's own
        self._need_full = False  # the next write must store the whole run
        self._run: Run[Any, Any] | None = None  # while executing

    def __repr__(self) -> str:
        state = f" dirty={len(self._dirty)}" if self._active else ""
        return f"SqliteSerializer({str(self.path)!r}){state}"

    # -- reading --------------------------------------------------------------------

    def deserialize(self) -> Run[Any, Any]:
        path = self.path
        if not path.exists():  # connecting would create it
            raise FileNotFoundError(errno.ENOENT, "no SQLite checkpoint", str(path))
        # Read-only: loading never changes the file, whatever it holds. A reader of a
        # WAL database creates -wal and -shm files it cannot remove (read-only): when
        # no one writes it (no -wal file, no processor holding the lock), read it as
        # immutable, which needs neither.
        quiet = not (
            path.with_name(path.name + "-wal").exists()
            or path.with_name(path.name + "-journal").exists()
            or (self._lock.fd is None and CheckpointLock.held(path))  # ours: no writes yet
        )
        uri = f"{path.resolve().as_uri()}?mode=ro{'&immutable=1' if quiet else ''}"
        try:
            conn = sqlite3.connect(uri, uri=True)
        except sqlite3.Error as exc:
            raise CheckpointError(f"{path}: cannot open the SQLite checkpoint: {exc}") from None
        try:
            with contextlib.closing(conn):
                run = self._load(conn)
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(
                f"{path}: not a readable jorbmp SQLite checkpoint: {exc}{_sniff(path)}"
            ) from None
        self._known_good = True
        return run

    def _load(self, conn: sqlite3.Connection) -> Run[Any, Any]:
        path = self.path
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        if app_id != APPLICATION_ID:
            if path.stat().st_size == 0:
                raise CheckpointError(f"{path}: checkpoint file is empty")
            raise CheckpointError(
                f"{path}: not a jorbmp SQLite checkpoint (application_id {app_id:#x}, "
                f"expected {APPLICATION_ID:#x})"
            )
        formats = conn.execute("SELECT format FROM run").fetchall()
        if len(formats) != 1:
            raise CheckpointError(f"{path}: table run has {len(formats)} rows, expected 1")
        if formats[0][0] != SQLITE_FORMAT:
            raise CheckpointError(
                f"{path}: checkpoint format {formats[0][0]} is not supported "
                f"(this jorbmp reads format {SQLITE_FORMAT})"
            )
        try:
            head = self._run_decoder.decode(conn.execute(_GET_RUN).fetchone()[0])
        except msgspec.ValidationError as exc:
            raise CheckpointError(f"{path}: the run does not fit the types: {exc}") from None
        run: Run[Any, Any] = Run(head.name, head.overall, self.job_type)
        run.next_id = head.next_id
        run.report = head.report
        jobs = run.jobs
        decode = self._job_decoder.decode
        for job_id, text in conn.execute(_GET_JOBS):
            try:
                jobs[job_id] = decode(text)
            except msgspec.ValidationError as exc:
                raise CheckpointError(
                    f"{path}: job {job_id!r} does not fit the types: {exc}"
                ) from None
        return run

    # -- writing --------------------------------------------------------------------

    def _values(self, jobs: list[Job[Any]]) -> list[Any]:
        """The rows of ``jobs``, flattened, as `_upsert` binds them."""
        enc = self._encode
        values: list[Any] = []
        extend = values.extend
        for job in jobs:
            errors = job._state_errors
            extend((
                job.id,
                job.state,
                enc(job.context).decode(),
                enc(errors).decode() if errors else "{}",
                job.parent,
                job.retries,
                job.kicks,
                enc(job.last_update)[1:-1].decode(),  # RFC 3339, without the quotes
            ))  # fmt: skip
        return values

    def _connect(self, path: Path, new: bool = False) -> sqlite3.Connection:
        """Open the database at ``path`` for writing, creating it owner-only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        # SQLite gives the -wal and -shm files the database file's permissions.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            if new:  # only an empty database, before WAL mode, can take a page size
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                log.warning("%s: SQLite refused WAL mode (using %s)", path, mode)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn

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
        report = None if run.report is None else self._encode(run.report).decode()
        return (SQLITE_FORMAT, run.name, self._encode(run.overall).decode(), run.next_id, report)

    @staticmethod
    def _fill(conn: sqlite3.Connection, head: _Head, values: list[Any]) -> None:
        """Make the database hold exactly this run, in one transaction."""

        def body() -> None:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("DELETE FROM jobs")
            conn.execute(_PUT_RUN, head)
            _upsert(conn, values)

        SqliteSerializer._transaction(conn, body)

    def _write_all(self, head: _Head, values: list[Any], keep: bool) -> None:
        """Store the whole run. A new database is built beside the path and renamed into
        place, so that it appears complete or not at all; an existing one is rewritten in
        one transaction. ``keep``: keep the connection for later batches (writer thread)."""
        path = self.path
        if self._conn is None and not path.exists():
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            for leftover in (tmp, *_companions(tmp), *_companions(path)):
                # Ours from a crash (tmp), or orphans of a deleted database, which SQLite
                # would otherwise apply to the new one.
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            try:
                with contextlib.closing(self._connect(tmp, new=True)) as conn:
                    self._fill(conn, head, values)
                # Closed: the WAL is folded in and gone. Make it durable, then visible.
                _rename_durably(tmp, path)
            except BaseException:
                for leftover in (tmp, *_companions(tmp)):
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
                raise
            if keep:
                self._conn = self._connect(path)
        elif keep:
            if self._conn is None:
                self._conn = self._connect(path)
            self._fill(self._conn, head, values)
        else:
            with contextlib.closing(self._connect(path)) as conn:
                self._fill(conn, head, values)

    def serialize(self, run: Run[Any, Any]) -> None:
        """Write the whole run now, in one transaction (not while a processor executes
        the run with this serializer)."""
        if self._active:
            raise RuntimeError(f"{self!r}: a processor is executing a run with it")
        self.check_overwritable()
        self._write_all(self._head(run), self._values(list(run.jobs.values())), keep=False)
        self._known_good = True

    def _store_all(self, head: _Head, values: list[Any]) -> None:
        """Writer thread: the first write of an execution, the whole run."""
        self._write_all(head, values, keep=True)
        self._need_full = False

    def _store(self, values: list[Any], next_id: int, report: str | None) -> None:
        """Writer thread: store one batch of changed jobs, in one transaction."""
        if self._conn is None:
            self._conn = self._connect(self.path)
        conn = self._conn

        def body() -> None:
            _upsert(conn, values)
            conn.execute("UPDATE run SET next_id = ?, report = ?", (next_id, report))

        self._transaction(conn, body)

    def _close(self) -> None:
        """Writer thread: close its connection (the last one also folds the WAL back in)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    # -- processor hooks ------------------------------------------------------------

    def begin(self, run: Run[Any, Any]) -> None:
        self._lock.acquire()
        try:
            self.check_overwritable()
        except BaseException:
            self._lock.release()
            raise
        # The whole run is written by the writer thread at the first flush (the next
        # housekeeping tick), not here: the processor starts meanwhile, and the first
        # write already has what changed since. Until it commits, the file holds what it
        # held before (nothing, or the run as loaded), which is a valid past of this run.
        self._known_good = True
        self._reset_batches()
        self._need_full = True
        self._run = run
        self._active = True

    @property
    def _urgent(self) -> bool:
        return self._need_full

    def _prepare(self, run: Run[Any, Any], jobs: dict[str, Job[Any]]) -> Callable[[], None]:
        if self._need_full:
            values = self._values(list(run.jobs.values()))
            return partial(self._store_all, self._head(run), values)
        head = self._head(run)
        return partial(self._store, self._values(list(jobs.values())), head[3], head[4])

    def end(self) -> None:
        try:
            if self._active and self._need_full and self._run is not None:
                # Nothing flushed yet (a run with nothing to execute): write it now.
                self.flush(self._run, final=True)
        finally:
            self._run = None
            try:
                self._stop_writer(self._close)
            finally:
                self._lock.release()
