"""Reading an SQLite checkpoint (`SqliteSerializer`): one consistent snapshot of a
database that a writer may be changing (`SnapshotReader`), and what it holds: the run
(`RunReader.load`) or its overview (`RunReader.overview`).

Reading (`deserialize`, `overview`, so ``python -m jorbmp status``) never writes, and
reads one snapshot: everything in one read transaction, so that a writer at work
(a processor, a redrive, someone's SQL) is seen before or after a commit, never in
between. What SQLite does, as checked on real files: a read-only connection to a WAL
database creates a -wal (empty) and a -shm file if there are none, needs to (fails
where it can neither create nor open the -shm: a directory the reader cannot write,
read-only media), and cannot remove them as it closes (the last connection removes
them only if it may write; a writer that closes while a reader is open leaves its -wal
too). An ``immutable=1`` connection creates nothing, but takes no locks and trusts the
file not to change: unguarded, a writer folding its WAL into the file under it gives
"database disk image is malformed", or counts of a state that never existed. So:

- Where no one writes (no -wal or -journal beside the database, no processor holding
  the lock), it reads as immutable, holding SQLite's own SHARED lock on the file
  meanwhile (an OFD lock), which keeps every SQLite from changing the file in place
  until it is done: a writer that starts meanwhile writes its -wal, which then stays
  (its close cannot fold it in); a new database renamed over it is another inode. The
  database, the -wal and the -journal are compared before and after; if they changed
  it reads again, and after `QUIET_TRIES` changes ordinarily. It leaves no file.
- Otherwise a writer is at work, and its -wal and -shm are there already: an ordinary
  read-only connection reads, which SQLite keeps consistent.
- Where an ordinary read cannot work (no -shm can be made or opened), immutable reads
  are the only ones possible, so it reads so, checked as above; a -wal that holds
  commits (which such a read would not see) or a -journal is an error instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from .. import _fds
from ..errors import CheckpointError
from ..run import Job, Run
from ._space import SQLITE_IOERR_SHMSIZE
from .base import (
    OFD_LOCKS,
    CheckpointLock,
    FileStates,
    check_format,
    file_state,
    format_hint,
    ofd_lock,
)
from .overview import Overview, OverviewBuilder

__all__ = [
    "APPLICATION_ID",
    "QUIET_TRIES",
    "SQLITE_FORMAT",
    "RunReader",
    "SnapshotReader",
    "columns",
]

OC = TypeVar("OC")
_T = TypeVar("_T")

# What marks a database as a jorbmp checkpoint (``PRAGMA application_id``), and the
# layout of its tables that this version reads and writes (the run's ``format``).
APPLICATION_ID = 0x6A6F7262  # "jorb"
SQLITE_FORMAT = 1

# Rows come back as JSON documents, so one typed msgspec decode checks a whole job
# and names the field that does not fit (``$.context.count``). No errors reads back as
# null, as a job that never had any holds them. ``not_before`` comes beside it, as a
# float: SQLite writes a REAL into JSON with 15 significant digits, which would not
# give the same float back. Either %s is NULL for a database without that column.
_GET_RUN = """SELECT json_object('format', format, 'name', name, 'next_id', next_id,
    'overall', json(overall), 'report', json(report)) FROM run"""
_GET_JOBS = """SELECT id, json_object('id', id, 'context', json(context), 'state', state,
    'state_errors', CASE state_errors WHEN '{}' THEN NULL ELSE json(state_errors) END,
    'parent', parent, 'last_update', last_update, 'retries', retries, 'kicks', kicks,
    'traceback', %s), %s FROM jobs ORDER BY rowid"""

# What `RunReader.overview` asks (see `SqliteSerializer.overview`).
#
# Jobs per state: GROUP BY sorts every row it counts (about a quarter of a second per
# million jobs, where a scan takes a twentieth), so the state most jobs are in, as a
# sample of them says, is left out of it and counted as the rest of the total: one
# scan, and a sort of the other jobs only. (The sample only makes it fast or slow.)
_SAMPLE_JOBS = 1000
_SAMPLE_STATES = """WITH RECURSIVE r (x) AS (
    SELECT :low UNION ALL SELECT x + :step FROM r WHERE x + :step <= :high
) SELECT state FROM jobs WHERE rowid IN r"""
_COUNT_OTHER_STATES = "SELECT state, count(*) FROM jobs WHERE state <> ? GROUP BY state"
# The jobs with errors, in the run's order, for `OverviewBuilder` to group their errors
# by kind (a fingerprint no SQL computes): one scan, and only the rows with errors
# decoded, checked as `deserialize` would check them.
_JOBS_WITH_ERRORS = """SELECT id, state, state_errors FROM jobs
    WHERE state_errors <> '{}' ORDER BY rowid"""
_decode_errors = msgspec.json.Decoder(dict[str, list[str]] | None).decode


def _count_states(conn: sqlite3.Connection, total: int) -> dict[str, int]:
    """Jobs per state (see `_SAMPLE_STATES`), in no particular order."""
    if not total:
        return {}
    low, high = conn.execute("SELECT min(rowid), max(rowid) FROM jobs").fetchone()
    step = max(1, (high - low) // _SAMPLE_JOBS)
    rows = conn.execute(_SAMPLE_STATES, {"low": low, "high": high, "step": step})
    sample = Counter(state for (state,) in rows)
    most = sample.most_common(1)[0][0]  # (the sample holds the first job)
    counts = dict(conn.execute(_COUNT_OTHER_STATES, (most,)).fetchall())
    counts[most] = total - sum(counts.values())
    return counts


def columns(conn: sqlite3.Connection) -> set[str]:
    """The names of the columns of the jobs table (none: there is no such table)."""
    return {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}


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


# -- reading consistently (see `SnapshotReader`) ------------------------------------

# SQLite's locks on a database file (os_unix.c), which every SQLite on the host takes:
# a reader read-locks the SHARED range (under a read lock on PENDING); a connection
# that writes the database file outside WAL mode, or the last connection of a WAL
# database folding the log in and deleting it as it closes, write-locks PENDING, then
# the SHARED range (EXCLUSIVE).
_PENDING_BYTE = 0x40000000
_SHARED_FIRST = _PENDING_BYTE + 2
_SHARED_SIZE = 510
# Immutable reads that found the file changed meanwhile, before an ordinary read.
QUIET_TRIES = 3
# The lock descriptors of immutable reads that could not be closed yet, per database
# (see `_release_shared`).
_parked: dict[Path, list[int]] = {}


_SQLITE_READONLY = 8  # result codes (sqlite3 names them from Python 3.11 on)
_SQLITE_CANTOPEN = 14


class _Changed(Exception):
    """The file changed while an immutable read read it."""


class _Busy(Exception):
    """A writer holds the database (PENDING or EXCLUSIVE)."""


class _NoIndex(Exception):
    """An ordinary read-only connection cannot read the database here: it needs a -shm
    file (the WAL's index) that this process can neither create nor open."""


def _cannot_share(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says SQLite could not open or create a file (the -shm or -wal of a
    reader) rather than that the database holds something wrong."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        # (SQLITE_IOERR_SHMSIZE: no room to grow the -shm file, on a full disk.)
        return code & 0xFF in (_SQLITE_CANTOPEN, _SQLITE_READONLY) or code == SQLITE_IOERR_SHMSIZE
    return str(exc) in ("unable to open database file", "attempt to write a readonly database")


def _lock_shared(fd: int) -> bool:
    """Take SQLite's SHARED lock on the database open at ``fd``, as OFD locks (which the
    close of another descriptor of the file does not drop, unlike SQLite's own); raise
    `_Busy` if a writer holds PENDING or EXCLUSIVE. False where the OS or the file
    system has no OFD locks."""
    if not OFD_LOCKS:
        return False
    try:
        ofd_lock(fd, fcntl.F_RDLCK, _PENDING_BYTE, 1)
        try:
            ofd_lock(fd, fcntl.F_RDLCK, _SHARED_FIRST, _SHARED_SIZE)
        finally:
            ofd_lock(fd, fcntl.F_UNLCK, _PENDING_BYTE, 1)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise _Busy from None
        return False  # (ENOLCK, EINVAL: a file system without them)
    return True


def _release_shared(path: Path, fd: int, quiet: bool) -> None:
    """Let go of `_lock_shared`'s descriptor. Closing a descriptor of a file drops every
    POSIX lock this process holds on it, SQLite connections' included (SQLite defers
    closing its own descriptors for that reason): so it is closed only while ``quiet``,
    no -wal (nor -journal) beside the database, which a WAL connection keeps from its
    first read to its close. Otherwise it is unlocked and parked until a later read
    finds the database quiet."""
    if quiet:
        for parked in [*_parked.pop(path, ()), fd]:
            _fds.unregister(parked)
            os.close(parked)
        return
    if OFD_LOCKS:
        with contextlib.suppress(OSError):
            ofd_lock(fd, fcntl.F_UNLCK, 0, 0)  # (length 0: to the end of the file)
    _parked.setdefault(path, []).append(fd)


def _open_for_lock(path: Path, before: FileStates) -> int:
    """A descriptor of the database for `_lock_shared`: a parked one of the same file if
    there is one (so that at most one stays parked per database, however many reads
    end while a writer is at work), else a new one."""
    parked = _parked.get(path)
    while parked:
        fd = parked.pop()
        st = os.fstat(fd)
        if before[0] is not None and (st.st_dev, st.st_ino) == before[0][:2]:
            return fd
        _fds.unregister(fd)  # another file now: no lock of this process is on it
        os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO: no blocking here)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the SQLite checkpoint: {exc}") from None
    _fds.register(fd)  # (a forked worker must not keep the lock)
    return fd


class SnapshotReader:
    """Reads one consistent snapshot of the SQLite database at ``path`` (see the module
    docstring), whose checkpoint lock is ``lock`` (held while it is this process's own:
    then no processor is writing)."""

    def __init__(self, path: Path, lock: CheckpointLock | None) -> None:
        self.path = path
        self._lock = lock

    def read(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """``body(conn)`` on one snapshot of the database: read-only, in one read
        transaction, never changing the files nor leaving one that was not there (see
        the module docstring): immutable under SQLite's SHARED lock, and checked, where
        no one writes (`_read_immutable`); ordinarily where a writer is at work
        (`_read_ordinary`); immutable, checked, as the only way where no -shm can be
        made, refusing a -wal or -journal that holds changes."""
        path = self.path
        changes = 0
        only_immutable = False  # an ordinary read cannot be made here
        cause = ""  # why not
        try:
            while True:
                before = self._watched()
                if before[0] is None:
                    raise FileNotFoundError(errno.ENOENT, "no SQLite checkpoint", str(path))
                if only_immutable:
                    if any(f is not None and f[2] > 0 for f in before[1:]):
                        raise CheckpointError(
                            f"{path}: cannot read the SQLite checkpoint here: its -wal or "
                            "-journal file holds changes, which SQLite reads only with a "
                            f"-shm file that this user cannot create or open ({cause}); "
                            "read it as its owner, or where it can be written"
                        )
                elif changes >= QUIET_TRIES or before[1] or before[2] or self._held():
                    try:
                        return self._read_ordinary(body)
                    except _NoIndex as exc:
                        cause = str(exc)
                        only_immutable = True
                        continue
                try:
                    return self._read_immutable(body, before)
                except (_Changed, _Busy):
                    changes += 1
                    if only_immutable:
                        if changes > 10 * QUIET_TRIES:
                            raise CheckpointError(
                                f"{path}: the SQLite checkpoint changed each time it was "
                                f"read ({changes} times), and this user cannot read it "
                                "as an ordinary reader would (no -shm file can be made)"
                            ) from None
                        time.sleep(0.001 * changes)
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(
                f"{path}: not a readable jorbmp SQLite checkpoint: {exc}{_sniff(path)}"
            ) from None

    def _watched(self) -> FileStates:
        """`file_state` of the database, its -wal and its -journal (an empty -wal too:
        a connection may have the database open in WAL mode)."""
        path = self.path
        return file_state(path, *(path.with_name(path.name + s) for s in ("-wal", "-journal")))

    def _held(self) -> bool:
        """Whether a processor (not the serializer that owns ``lock``) holds the
        checkpoint's lock."""
        lock = self._lock
        return lock is not None and lock.fd is None and CheckpointLock.held(self.path)

    def _connect_ro(self, flags: str) -> sqlite3.Connection:
        try:
            return sqlite3.connect(f"{self.path.as_uri()}?{flags}", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise CheckpointError(
                f"{self.path}: cannot open the SQLite checkpoint: {exc}"
            ) from None

    @staticmethod
    def _in_transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """``body`` in one read transaction: all it reads is one snapshot."""
        conn.execute("BEGIN")
        result = body(conn)
        conn.execute("COMMIT")
        return result

    def _read_ordinary(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """An ordinary read-only connection: SQLite's locks and the WAL's index (the -shm
        file) keep it consistent; `_NoIndex` where it cannot open or create the -shm."""
        conn = self._connect_ro("mode=ro")
        try:
            return self._in_transaction(conn, body)
        except sqlite3.OperationalError as exc:
            if _cannot_share(exc):
                raise _NoIndex(str(exc)) from None
            raise
        finally:
            conn.close()

    def _read_immutable(self, body: Callable[[sqlite3.Connection], _T], before: FileStates) -> _T:
        """An immutable read, under SQLite's SHARED lock, of the files as they were
        ``before``; `_Changed` if they changed meanwhile (an error it met then may come
        of the change: it is not raised), `_Busy` if a writer holds the database."""
        path = self.path
        fd = _open_for_lock(path, before)
        quiet = False  # no -wal nor -journal: no connection can hold a lock on the file
        try:
            locked = _lock_shared(fd)
            st = os.fstat(fd)
            if before[0] is None or (st.st_dev, st.st_ino) != before[0][:2]:
                raise _Changed
            error: BaseException | None = None
            conn = self._connect_ro("mode=ro&immutable=1")
            try:
                result = self._in_transaction(conn, body)
            except (sqlite3.DatabaseError, CheckpointError) as exc:
                error = exc
            finally:
                conn.close()
            after = self._watched()
            quiet = after[1] is None and after[2] is None
            if after != before or (not locked and self._held()):
                raise _Changed
            if error is not None:
                raise error
            return result
        finally:
            _release_shared(path, fd, quiet)


class RunReader:
    """What a snapshot of the database at ``path`` holds (a body for
    `SnapshotReader.read`), checked against the types: the whole run (`load`), or its
    overview (`overview`)."""

    def __init__(self, path: Path, overall_type: Any, job_type: Any) -> None:
        self.path = path
        self.job_type = job_type  # None: plain data
        self._run_decoder = msgspec.json.Decoder(_RunRow[overall_type])
        job: Any = job_type if job_type is not None else Any
        self._job_decoder = msgspec.json.Decoder(Job[job])

    def load(self, conn: sqlite3.Connection) -> Run[Any, Any]:
        """The run, every job decoded (``CheckpointError`` for one that does not fit)."""
        path = self.path
        head = self._head(conn)
        run: Run[Any, Any] = Run(head.name, head.overall, self.job_type)
        run.next_id = head.next_id
        run.report = head.report
        jobs = run.jobs
        decode = self._job_decoder.decode
        names = columns(conn)  # (a database of an earlier version may lack these)
        sql = _GET_JOBS % tuple(c if c in names else "NULL" for c in ("traceback", "not_before"))
        for job_id, text, not_before in conn.execute(sql):
            try:
                job = jobs[job_id] = decode(text)
            except msgspec.ValidationError as exc:
                raise CheckpointError(
                    f"{path}: job {job_id!r} does not fit the types: {exc}"
                ) from None
            except msgspec.DecodeError as exc:  # (hand-edited JSON text: a lone surrogate)
                raise CheckpointError(f"{path}: job {job_id!r} does not decode: {exc}") from None
            if not_before is not None:
                if type(not_before) is not float:  # a REAL column gives floats (or text)
                    raise CheckpointError(
                        f"{path}: job {job_id!r}: not_before is {not_before!r}, not a number"
                    )
                job.not_before = not_before
        return run

    def _head(self, conn: sqlite3.Connection) -> _RunRow[Any]:
        """The run's row, once the file is known to be a checkpoint of this format."""
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
        check_format(path, formats[0][0], SQLITE_FORMAT)
        try:
            head: _RunRow[Any] = self._run_decoder.decode(conn.execute(_GET_RUN).fetchone()[0])
        except msgspec.ValidationError as exc:
            raise CheckpointError(f"{path}: the run does not fit the types: {exc}") from None
        except msgspec.DecodeError as exc:
            raise CheckpointError(f"{path}: the run's row does not decode: {exc}") from None
        return head

    def overview(self, conn: sqlite3.Connection) -> Overview:
        """Counts by SQL, and the error groups of the jobs with errors, decoding of the
        rest only the run's row (see `SqliteSerializer.overview`)."""
        head = self._head(conn)
        (total,) = conn.execute("SELECT count(*) FROM jobs").fetchone()
        states = _count_states(conn, total)
        for state in states:
            if type(state) is not str:
                raise CheckpointError(f"{self.path}: a job's state is {state!r}, not text")
        builder = OverviewBuilder()
        builder.states.update(states)  # (a mapping: adds its counts)
        for job_id, state, errors in conn.execute(_JOBS_WITH_ERRORS):
            try:
                decoded = _decode_errors(errors)
            except msgspec.ValidationError:
                raise CheckpointError(
                    f"{self.path}: job {job_id!r} does not fit the types: its state_errors "
                    "are not an object of lists of texts"
                ) from None
            except msgspec.DecodeError as exc:
                raise CheckpointError(
                    f"{self.path}: job {job_id!r}: its state_errors are malformed JSON ({exc})"
                ) from None
            if decoded:
                builder.add_errors(job_id, state, decoded)
        return builder.build(head.name, head.report)
