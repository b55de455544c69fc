"""The write side of `SqliteSerializer`: the schema, the row statements, and
`SqliteWriter`, which owns the writer thread's connections (see `jorbmp.checkpoint.sqlite`
for what each step of a write holds, and why).

Everything in `SqliteWriter` runs on the serializer's writer thread, or while it is
idle; the coordinator thread only encodes rows (`SqliteSerializer._rows`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._space import is_space_error
from ._sqlite_read import APPLICATION_ID, columns
from .base import FileStates, fsync_dir, make_parents, temp_path

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
ROWS_PER_STATEMENT = 2000 if sqlite3.sqlite_version_info >= (3, 32) else 999 // 10
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
        not_before REAL,
        traceback TEXT
    )""",
)
_PUT_RUN = (
    "INSERT OR REPLACE INTO run (id, format, name, overall, next_id, report) "
    "VALUES (0, ?, ?, ?, ?, ?)"
)
_COLUMNS = (
    "id, state, context, state_errors, parent, retries, kicks, last_update, not_before, traceback"
)
# A row's parameters. Python's sqlite3 binds str, int and float directly but takes a
# slow path for None (an adapter lookup that formats and drops an AttributeError), so
# a job without a parent binds the integer 0 there, which no id (text) equals, and one
# without a not_before binds NaN, which SQLite stores as NULL (it has no NaN), one
# without a traceback the empty text. Most jobs have no errors, parent, retries,
# kicks, not_before nor traceback: a short row binds only the rest (about a quarter
# cheaper to write).
_ROW = "?, ?, ?, ?, NULLIF(?, 0), ?, ?, ?, ?, NULLIF(?, '')"
_SHORT_ROW = "?, ?, ?, '{}', NULL, 0, 0, ?, NULL, NULL"
_WIDTH = 10  # parameters per row
_SHORT_WIDTH = 4
_NO_PARENT = 0
_NO_ERRORS = "{}"
_NO_TIME = float("nan")
_NO_TRACEBACK = ""

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
        last_update = excluded.last_update, not_before = excluded.not_before,
        traceback = excluded.traceback"""
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
    if names and "traceback" not in names:
        conn.execute("ALTER TABLE jobs ADD COLUMN traceback TEXT")


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


class SqliteWriter:
    """The writer thread's connections to the database at ``path``: the one that
    stores steps, and the first write's, whose transaction stays open between steps.

    ``state`` gives the files' state as the serializer sees it (a 0-byte database, an
    -wal holding something), to choose between building a new database beside the
    path and rewriting the one there in place.
    """

    def __init__(self, path: Path, state: Callable[[], FileStates]) -> None:
        self.path = path
        self._state = state
        self.conn: sqlite3.Connection | None = None
        # The first write's connection, its transaction open, between its steps.
        self.filling: sqlite3.Connection | None = None
        self.tmp: Path | None = None  # the new database being built

    def connect(self, path: Path, new: bool = False) -> sqlite3.Connection:
        """Open the database at ``path`` for writing. ``new``: a database being built
        beside the path, created here, owner-only, which no one sees before it is
        complete and fsynced (`_rename_durably`): it needs no journal on disk and no
        fsyncs of its own, until `wal` sets WAL mode when it is built. Otherwise the
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
                self.wal(conn, path)
                _migrate(conn)
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def wal(conn: sqlite3.Connection, path: Path) -> None:
        """WAL mode (stored in the file), each commit fsynced."""
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            log.warning("%s: SQLite refused WAL mode (using %s)", path, mode)
        conn.execute("PRAGMA synchronous = FULL")

    @staticmethod
    def transaction(conn: sqlite3.Connection, body: Callable[[], None]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            body()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _open(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = self.connect(self.path)
        return self.conn

    def start_all(self) -> sqlite3.Connection:
        """Open the transaction that stores the whole run (its job rows deleted), for
        `_insert` and then `commit_all`. A new database is built beside the path, and
        renamed into place when it is complete; an existing one is rewritten in place.
        A file of 0 bytes (with no -wal holding anything) is no database, as for
        `deserialize`: someone's ``sqlite3`` shell made it. It is replaced the same way,
        never written in place, so that a kill before the first commit leaves it as it
        was, not a database without a run that no one may overwrite."""
        path = self.path
        db, wal = self._state()
        if self.conn is None and (db is None or (db[2] == 0 and wal is None)):
            tmp = temp_path(path)  # (`_acquire` removed any that a crash left)
            for leftover in _companions(path):
                # Orphans of a deleted database (or an empty -wal of a 0-byte file),
                # which SQLite would otherwise apply to the new one.
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            self.tmp = tmp
            conn = self.connect(tmp, new=True)
        else:
            conn = self._open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("DELETE FROM jobs")
        except BaseException:
            self.abort_all(conn)
            raise
        return conn

    def commit_all(self, conn: sqlite3.Connection, head: _Head, rows: _Rows) -> None:
        """Upsert ``rows`` and the run's row, and commit the transaction of `start_all`;
        make a new database durable, then visible."""
        try:
            _insert(conn, rows)
            conn.execute(_PUT_RUN, head)
            conn.execute("COMMIT")
            if self.tmp is not None:
                self.wal(conn, self.path)
                conn.close()  # the WAL is folded in and gone
                _rename_durably(self.tmp, self.path)
                self.tmp = None
        except BaseException:
            self.abort_all(conn)
            raise

    def abort_all(self, conn: sqlite3.Connection) -> None:
        """Roll back the transaction of `start_all` (delete a new database)."""
        tmp, self.tmp = self.tmp, None
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

    def write_run(self, head: _Head, chunks: list[_Rows]) -> None:
        """The whole run (``chunks`` in order), in one transaction; then close."""
        try:
            conn = self.start_all()
            try:
                for rows in chunks:
                    _insert(conn, rows, upsert=False)
            except BaseException:
                self.abort_all(conn)
                raise
            self.commit_all(conn, head, ([], []))
        finally:
            self.close()

    def store_first(self, chunks: list[_Rows], commit: tuple[_Head, _Rows] | None) -> bool:
        """One step of the first write of an execution: insert ``chunks`` in the
        transaction that the first step opens. The last one (``commit``) upserts the
        jobs that changed since they were stored, and commits: True then."""
        conn = self.filling
        if conn is None:
            conn = self.start_all()
        self.filling = None  # until this step succeeds: a failed one is rolled back
        try:
            for rows in chunks:
                _insert(conn, rows, upsert=False)
        except BaseException:
            self.abort_all(conn)
            raise
        if commit is None:
            self.filling = conn
            return False
        self.commit_all(conn, *commit)
        return True

    def store(self, rows: _Rows, next_id: int, report: str | None) -> None:
        """Store one batch of changed jobs, in one transaction."""
        self._upsert([rows], "UPDATE run SET next_id = ?, report = ?", (next_id, report))

    def store_all(self, chunks: list[_Rows], head: _Head) -> None:
        """Upsert ``chunks`` (in order) and the run's row, in one transaction."""
        self._upsert(chunks, _PUT_RUN, head)

    def _upsert(self, chunks: list[_Rows], run_sql: str, run_row: tuple[Any, ...]) -> None:
        """Upsert ``chunks`` and update the run's row with ``run_sql``, in one transaction."""
        conn = self._open()

        def body() -> None:
            for rows in chunks:
                _insert(conn, rows)
            conn.execute(run_sql, run_row)

        try:
            self.transaction(conn, body)
        except sqlite3.Error as exc:
            if is_space_error(exc):
                self.shrink_log(conn)
            raise

    @staticmethod
    def shrink_log(conn: sqlite3.Connection) -> None:
        """After a transaction that found no space: fold the -wal file into the database
        and cut it to 0 bytes, giving its space back for the retry. (SQLite keeps a WAL
        at its largest size, up to ~1000 pages: 16 MiB here, a good part of a small
        disk.) Best effort: a database that must grow for it may not fit either."""
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Abandon an unfinished first write; close the connection (the last one also
        folds the WAL back in)."""
        if self.filling is not None:
            conn, self.filling = self.filling, None
            self.abort_all(conn)
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.close()
