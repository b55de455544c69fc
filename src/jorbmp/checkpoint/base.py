"""The `Serializer` interface, the run's on-disk schema, and the helpers formats share.

The processor calls `begin` once, `jobs_changed` after each batch of transitions (it
must be cheap: formats batch the real work), `flush` from its housekeeping tick and once
with ``final=True``, then `end`. Formats know the model (`Run`, `Job`), never the
processor.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import struct
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from .. import _fds
from ..errors import CheckpointError, CheckpointSpaceError
from ..run import Job, Run
from ._space import describe, is_space_error, space_error
from .overview import Overview, overview_of

__all__ = ["FORMAT_VERSION", "NilSerializer", "RunRecord", "Serializer"]

log = logging.getLogger("jorbmp")

FORMAT_VERSION = 1

# The first bytes of each format, for telling a file's format without its types.
JOURNAL_MAGIC = b"\x89jorbmp journal\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
_SERIALIZER_OF = {
    "json": "JsonSerializer",
    "journal": "JournalSerializer",
    "sqlite": "SqliteSerializer",
}


def format_of(head: bytes) -> str | None:
    """ "json", "journal" or "sqlite" for a file starting with ``head``; None if none."""
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(JOURNAL_MAGIC):
        return "journal"
    if head.lstrip()[:1] == b"{":
        return "json"
    return None


def format_hint(head: bytes) -> str:
    """For an error about a file of the wrong format: which serializer reads it."""
    fmt = format_of(head)
    return f" (it looks like a {fmt} checkpoint: use {_SERIALIZER_OF[fmt]})" if fmt else ""


OC = TypeVar("OC")
JC = TypeVar("JC")


class RunRecord(msgspec.Struct, Generic[OC, JC]):
    """A whole run as stored: the schema of every snapshot. ``jobs`` must stay last."""

    format: int
    name: str
    next_id: int
    overall: OC
    report: dict[str, Any] | None = None
    jobs: list[Job[JC]] = msgspec.field(default_factory=list)


def record_of(run: Run[Any, Any], jobs: list[Job[Any]] | None = None) -> RunRecord[Any, Any]:
    return RunRecord(
        FORMAT_VERSION,
        run.name,
        run.next_id,
        run.overall,
        run.report,
        jobs if jobs is not None else list(run.jobs.values()),
    )


class _Format(msgspec.Struct):
    format: int


def check_format(path: Path, found: object, expected: int) -> None:
    """``CheckpointError`` naming both versions when a file's format is not ``expected``
    (checked before anything else of the file, whose layout may have changed); None:
    the file says nothing readable about its format."""
    if found is not None and found != expected:
        newer = (
            " (written by a newer jorbmp?)" if isinstance(found, int) and found > expected else ""
        )
        raise CheckpointError(
            f"{path}: checkpoint format {found} is not supported{newer} "
            f"(this jorbmp reads format {expected})"
        )


def format_in(data: bytes) -> int | None:
    """The ``format`` of a JSON record, whatever else it holds (None if it has none)."""
    try:
        return msgspec.json.decode(data, type=_Format).format
    except msgspec.DecodeError:
        return None


def run_of(record: RunRecord[Any, Any], job_type: Any, path: Path) -> Run[Any, Any]:
    """Rebuild a Run from its record; ``CheckpointError`` if the record is inconsistent."""
    check_format(path, record.format, FORMAT_VERSION)
    run: Run[Any, Any] = Run(record.name, record.overall, job_type)
    for job in record.jobs:
        if job.id in run.jobs:
            raise CheckpointError(f"{path}: job id {job.id!r} appears twice")
        run.jobs[job.id] = job
    run.next_id = record.next_id
    run.report = record.report
    return run


def temp_path(path: Path) -> Path:
    """Where this process builds a new version of ``path`` before renaming it into place
    (`write_atomic`, SQLite's first write); `remove_temp_files` knows the pattern."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_temp_files(path: Path) -> list[str]:
    """Remove what interrupted writes of ``path`` left beside it: `temp_path` files of
    any pid, and the -wal, -shm and -journal files SQLite keeps beside one. Returns
    their names.

    Call it right after taking the checkpoint's lock: every writer of these files holds
    the lock while they exist, so none of them belongs to a live writer then.
    """
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"\d+(?:-wal|-shm|-journal)?")
    removed: list[str] = []
    try:
        entries = os.listdir(path.parent)
    except OSError:  # no directory yet (nothing to remove), or one we cannot list
        return removed
    for name in entries:
        if pattern.fullmatch(name):
            try:
                os.unlink(path.parent / name)
            except FileNotFoundError:
                continue
            except OSError as exc:  # litter is no reason to refuse to run
                log.warning("%s: cannot remove %s: %s", path, name, exc)
                continue
            log.info("%s: removed %s, left by an interrupted write", path, name)
            removed.append(name)
    return removed


def write_atomic(path: Path, chunks: Sequence[bytes | memoryview]) -> None:
    """Replace ``path`` with ``chunks``: never a half-written file, owner-only permissions.

    Write a temporary file beside it, fsync, rename over the old one, fsync the
    directory. A crash at any point leaves either the old file or the new one (and a
    temporary file, which the next writer removes: `remove_temp_files`).

    A lack of space or quota before the rename raises `CheckpointSpaceError`: the file
    is then exactly as it was, and the temporary file is gone.
    """
    tmp = temp_path(path)
    try:
        make_parents(path)
        try:
            old: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            old = None
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                if old is not None:
                    keep_owner(f.fileno(), old)
                f.writelines(chunks)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if is_space_error(exc):
            raise space_error(path, exc) from exc
        raise
    fsync_dir(path.parent)


def keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the new file at ``fd`` the mode, owner and group of the file it replaces
    (``old``), so that a replacement (a `redrive` run by root, or by a member of the
    file's group) leaves the file usable by whoever could use it before. Ownership is
    given where the OS allows (root, or a group this user belongs to)."""
    os.fchmod(fd, old.st_mode & 0o7777)
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, old.st_gid)
        os.fchmod(fd, old.st_mode & 0o7777)  # chown may clear set-id bits


def make_parents(path: Path) -> None:
    """Create the missing directories above ``path``, each made durable (its parent
    fsynced), so that a file made durable in them is not lost with them in a crash."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.is_dir():
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made meanwhile by someone else, who makes it durable
        fsync_dir(directory.parent)


# What fsync of a directory raises where the OS or the file system does not do it.
_NO_DIR_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}


def fsync_dir(directory: Path) -> None:
    """Make a rename (or a new entry) in ``directory`` durable. Where the OS cannot
    fsync a directory this does nothing; any other error (EIO, ENOSPC) is raised, as
    the rename is then not known to be durable."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        return  # a directory this user may write but not read: it cannot be fsynced
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(dir_fd)


# Why a lock file cannot be made: the checkpoint's directory is read-only, not this
# user's to write, or has no room (an inode, a block) for the lock file itself.
_UNWRITABLE_DIR = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}

# How long `CheckpointLock.acquire` keeps trying a lock that is taken before refusing:
# `serialize` (a `redrive`) holds it for the moment of a write, a processor for a
# whole run. (Probes do not take it; those of jorbmp 0.1 took it for microseconds.)
ACQUIRE_PATIENCE = 0.5
_RETRY_SLEEP = 0.001  # the first pause between tries; it doubles, up to 50 ms

# Open-file-description locks (Linux): a lock that another process can *test* without
# taking it (F_OFD_GETLK), and that closing some other descriptor of the file does not
# drop, unlike classic POSIX locks. A processor holds one on the lock file's first byte
# beside the flock that older versions of jorbmp take and respect; a reader of an SQLite
# checkpoint takes SQLite's own locks so (`_sqlite_read`).
OFD_LOCKS = hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")
# struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padded
# to the alignment of off_t.
_FLOCK = struct.Struct("hhqqi0q")


def ofd_lock(fd: int, kind: int, start: int = 0, length: int = 1, test: bool = False) -> int:
    """Take (or, with ``test``, ask about) an OFD lock of ``kind`` (``F_UNLCK``: let go)
    on ``length`` bytes of ``fd`` from ``start`` (length 0: to the end of the file, and
    beyond), never waiting (``OSError`` EAGAIN or EACCES: someone holds a conflicting
    lock); returns the type of the conflicting lock when testing (``F_UNLCK``: none)."""
    arg = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)
    result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK if test else fcntl.F_OFD_SETLK, arg)
    return int(_FLOCK.unpack(result)[0])


def _open_lock_file(path: Path, flags: int) -> int:
    """Open an existing lock file: never through a symlink (whose target someone else
    chose: root would truncate it), never blocking (a FIFO), and only a regular file
    (else ``CheckpointError``)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(
                f"{path}: the checkpoint's lock file is a symlink; jorbmp does not follow it "
                "(remove it: the lock is made again)"
            ) from None
        if exc.errno == errno.EISDIR:
            raise CheckpointError(f"{path}: the checkpoint's lock file is a directory") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: the checkpoint's lock file is not a regular file")
    return fd


class CheckpointLock:
    """An exclusive lock on a checkpoint, held while a processor executes it (and while
    `serialize` writes it).

    ``flock`` plus an OFD lock on ``<path>.lock``: the operating system drops both when
    the holder dies, so a resume after a crash is never refused; `held` tests the OFD
    lock without taking anything.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``CheckpointError`` naming the checkpoint and the pid of
        the processor that holds it (see `ACQUIRE_PATIENCE`), or naming the checkpoint
        and why its directory cannot be written (read-only, no permission, no space)."""
        try:
            make_parents(self.path)
            fd = self._open()
        except OSError as exc:
            if exc.errno not in _UNWRITABLE_DIR:
                raise
            checkpoint = self.path.with_suffix("")
            raise CheckpointError(
                f"{checkpoint}: cannot write the checkpoint's directory {checkpoint.parent} "
                f"({describe(exc)}): nothing was executed"
            ) from exc
        deadline = time.monotonic() + ACQUIRE_PATIENCE
        pause = _RETRY_SLEEP
        while True:
            try:
                if self._try(fd):
                    break
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise CheckpointError(
                        f"{self.path.with_suffix('')}: checkpoint is in use by another "
                        f"running processor (pid {holder})"
                    )
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
            except BaseException:
                os.close(fd)
                raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            # The pid only informs a refused processor: a full disk is no reason not to
            # run (the checkpoint's writes wait for space: `jorbmp._checkpoint_guard`).
            if not is_space_error(exc):
                os.close(fd)  # (drops the locks just taken)
                raise
        except BaseException:
            os.close(fd)
            raise
        _fds.register(fd)
        self.fd = fd

    def _open(self) -> int:
        """The lock file, opened for writing. A new one gets the checkpoint's owner,
        group and permissions (whoever may write a group-shared checkpoint may lock
        it; one that root makes for a `redrive` stays usable by the owner); owner-only
        when there is no checkpoint yet."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            try:
                fd = _open_lock_file(self.path, os.O_RDWR)
            except PermissionError:
                raise CheckpointError(
                    f"{self.path}: cannot open the checkpoint's lock file for writing "
                    "(it belongs to another user?)"
                ) from None
            if os.geteuid() != 0 or os.fstat(fd).st_uid != 0:
                return fd
            # Root's, beside a checkpoint that is not (made by an earlier root run):
            # hand it over, below.
        try:
            checkpoint = os.stat(self.path.with_suffix(""))
            keep_owner(fd, checkpoint)
            os.fchmod(fd, (checkpoint.st_mode & 0o666) | 0o600)  # (its owner may lock it)
        except FileNotFoundError:
            pass  # no checkpoint yet: owner-only
        except OSError as exc:  # the lock works all the same
            log.warning("%s: cannot give the lock file the checkpoint's owner: %s", self.path, exc)
        return fd

    @staticmethod
    def _try(fd: int) -> bool:
        """Both locks taken (True), or neither (False: someone holds one)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not OFD_LOCKS:
            return True
        try:
            ofd_lock(fd, fcntl.F_WRLCK)
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    @staticmethod
    def held(path: Path) -> bool:
        """True when a live processor holds the lock on the checkpoint at ``path``.

        With OFD locks it tests the lock without taking it, so a probe (``python -m
        jorbmp status``, a `deserialize`) never makes a starting processor wait or fail;
        elsewhere it takes a shared flock for a moment, and a processor starting
        meanwhile retries (`ACQUIRE_PATIENCE`). A lock file that cannot be opened (no
        permission) is reported as not held: readers go on and read consistently."""
        lock = path.with_name(path.name + ".lock")
        try:
            fd = _open_lock_file(lock, os.O_RDONLY)
        except (OSError, CheckpointError):  # none, not ours to read, or not a lock file
            return False
        try:
            if OFD_LOCKS:
                return ofd_lock(fd, fcntl.F_RDLCK, test=True) != fcntl.F_UNLCK
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            _fds.unregister(self.fd)
            os.close(self.fd)  # closing drops both locks
            self.fd = None


def file_state(*paths: Path) -> tuple[tuple[int, int, int, int] | None, ...]:
    """What tells whether someone changed these files: device, inode, size and
    modification time of each (None for a missing one)."""
    states: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            states.append(None)
        else:
            states.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(states)


FileStates = tuple[tuple[int, int, int, int] | None, ...]


class _Base:
    """A checkpoint file as this process last read or wrote it: its `file_state`, and
    the run it then held exactly, if known."""

    __slots__ = ("files", "jobs", "run")

    def __init__(self, run: Run[Any, Any] | None, files: FileStates) -> None:
        self.run = None if run is None else weakref.ref(run)
        self.jobs = 0 if run is None else len(run.jobs)  # the run's first jobs are the file's
        self.files = files


# Per checkpoint path (resolved), the file as this process last saw it: so that `begin`
# can tell that someone changed it since it was loaded (another processor, a redrive),
# whichever serializer object loaded it, and a format can write less when it holds the
# run being resumed.
_bases: dict[Path, _Base] = {}
# Per run (its id, while it lives), the state of each file it was loaded from or
# written to: a run loaded before a change is stale even if this process has read the
# changed file since (into another Run object).
_run_files: dict[int, dict[Path, FileStates]] = {}


def _files_of(run: Run[Any, Any]) -> dict[Path, FileStates]:
    files = _run_files.get(id(run))
    if files is None:
        files = _run_files[id(run)] = {}
        weakref.finalize(run, _run_files.pop, id(run), None)
    return files


class Serializer:
    """Base of the checkpoint formats. Subclasses implement `_read` and `_write_run`
    (or `serialize` itself) and may override the processor hooks to write incrementally.

    Load-then-execute is safe: `deserialize` notes the file's identity (device, inode,
    size, modification time) before it reads, and `begin`, under the lock, refuses
    (``CheckpointError``) a file that is no longer the one this process last read or
    wrote, or that appeared since a `deserialize` found none. So a `redrive` between
    the load and `exec` is never overwritten, and of two copies of a program that start
    the same run together, one runs and the other is refused.
    """

    path: Path

    def deserialize(self) -> Run[Any, Any]:
        """Load the run: ``FileNotFoundError`` if there is none, ``CheckpointError`` if
        it is corrupt or does not fit the types.

        A file of 0 bytes (with no SQLite log beside it) counts as none, with a
        warning: jorbmp never leaves one (its writes appear whole), so it is someone
        else's, such as an ``sqlite3`` shell run before the first write."""
        self._known_good = None
        try:
            files = self._state()  # before reading: a change meanwhile shows at `begin`
        except OSError:
            self._check_present()  # (says what is wrong)
            raise
        try:
            self._check_present()
            run = self._read()
        except FileNotFoundError:
            self._note_base(None, files)
            raise
        self._note_base(run, files)
        self._known_good = files
        return run

    def _check_present(self) -> FileStates:
        """The files' `_state`, checked first by every reader: ``FileNotFoundError`` for no
        file, or one of 0 bytes (and no SQLite log with something in it), with a warning
        (see `deserialize`); ``CheckpointError`` for a path that is no regular file (a
        device, a FIFO, a directory: never read, nor replaced by a checkpoint) or that
        cannot be looked at (a symlink loop, no permission)."""
        try:
            st = os.stat(self.path)
            files = self._state()
        except FileNotFoundError:
            return self._state()
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot look at the checkpoint: {exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{self.path}: not a regular file (a directory, device or FIFO), so not a "
                "checkpoint; it is left as it is"
            )
        if files[0] is not None and all(f is None or f[2] == 0 for f in files):
            log.warning(
                "%s: the file is empty and no jorbmp wrote it: treated as no checkpoint",
                self.path,
            )
            raise FileNotFoundError(errno.ENOENT, "empty checkpoint file", str(self.path))
        return files

    def _read(self) -> Run[Any, Any]:
        """Read the file (`deserialize` without the bookkeeping)."""
        raise NotImplementedError

    def serialize(self, run: Run[Any, Any]) -> None:
        """Write the whole run now, replacing the checkpoint.

        It takes the checkpoint's lock for the write (unless this serializer holds it,
        executing the run): ``CheckpointError`` naming the pid of the live processor that
        holds it, and nothing written. Refuses to replace a checkpoint that cannot be
        read (see `check_overwritable`)."""
        with self.locked():
            self.check_overwritable()
            try:
                self._write_run(run)
            except CheckpointSpaceError:
                raise  # nothing written (`write_atomic`): the file is as it was
            except BaseException:
                # Maybe written, maybe not (a failed fsync after the rename): what is
                # there is this run's doing or as it was, not a stranger's change.
                self._wrote(run, complete=False)
                raise
            self._wrote(run)

    def _write_run(self, run: Run[Any, Any]) -> None:
        """Replace the file with ``run`` (the lock held, the old file checked)."""
        raise NotImplementedError

    def overview(self) -> Overview:
        """Per-state counts and the most common errors (``python -m jorbmp status``), as
        `deserialize` would find them. Formats override it to read less than every job
        (``FileNotFoundError``, ``CheckpointError`` as for `deserialize`). It changes
        nothing of what `begin` checks: it is a look, not a load."""
        self._check_present()
        return overview_of(self._read())

    # Writes of this serializer that reached the disk whole: how a processor that saw
    # one fail for lack of space (`CheckpointSpaceError`) learns that one succeeded
    # since (an incremental format's write completes on its writer thread, later).
    writes = 0
    # The file's state when this serializer last read or wrote it whole: it is then
    # known to be valid (while it has not changed since).
    _known_good: FileStates | None = None
    _lock: CheckpointLock | None = None

    def _setup(self, path: str | os.PathLike[str], overall_type: Any, job_type: Any) -> Any:
        """What every file format's constructor does; returns the job type to decode
        (``Any``, plain data, when none is given).

        The path is resolved once, here: through a symlink, the data file, SQLite's
        log and the lock are all beside the link's target, and a write replaces the
        target, not the link; so a processor on the link and one on the real path
        exclude each other."""
        self.path = Path(os.path.realpath(path))
        self.overall_type = overall_type if overall_type is not None else Any
        self.job_type = job_type
        self._lock = CheckpointLock(self.path)
        return job_type if job_type is not None else Any

    def _acquire(self) -> None:
        """Take the checkpoint's lock, then remove the temporary files of writes that
        were interrupted (a crash, a kill): with the lock held, no live writer owns one."""
        assert self._lock is not None
        self._lock.acquire()
        try:
            remove_temp_files(self.path)
        except BaseException:
            self._release()
            raise

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the checkpoint's lock in this block (see `serialize`), or keep holding it
        if this serializer does already."""
        lock = self._lock
        if lock is None or lock.fd is not None:
            yield
            return
        self._acquire()
        try:
            yield
        finally:
            lock.release()

    def _claim(self, run: Run[Any, Any]) -> int | None:
        """What `begin` does first in every format: take the lock (see `_acquire`),
        check that the file is as this process last saw it (see the class docstring)
        and that it may be overwritten. Returns `_base_jobs` (read under the lock,
        before anything else reads the file)."""
        self._acquire()
        try:
            self._check_unchanged(run)
            base = self._base_jobs(run)
            if base is None:  # (a file known to hold the run can be read)
                self.check_overwritable()
        except BaseException:
            self._release()
            raise
        return base

    def _check_unchanged(self, run: Run[Any, Any]) -> None:
        now = self._state()
        if now[0] is None:
            return  # nothing to overwrite (it never was, or was deleted to start over)
        # A run loaded from (or written to) the file needs the file as it was then;
        # another run, the file as this process last saw it, if it looked at all (a
        # run built without looking is meant to replace what is there).
        seen = _run_files.get(id(run), {}).get(self.path)
        base = _bases.get(self.path)
        if seen is None and base is not None:
            seen = base.files
        if seen is None or seen == now:
            return
        self._known_good = None
        self.check_overwritable()  # an unreadable file: say that first
        seen_how = "found no checkpoint" if seen[0] is None else "last read or wrote it"
        raise CheckpointError(
            f"{self.path}: the checkpoint changed since this process {seen_how} (another "
            "processor executed it, or a redrive or an edit changed it): executing the "
            "run loaded before would overwrite that; load it again with deserialize()"
        )

    def _release(self) -> None:
        """Let go of the checkpoint's lock, if this serializer holds it."""
        if self._lock is not None:
            self._lock.release()

    def check_overwritable(self) -> None:
        """Refuse (``CheckpointError``) to replace a checkpoint that cannot be read: the
        file is left byte-for-byte as it is, for a person to look at."""
        known = self._known_good
        if known is not None and known == self._state():
            return
        try:
            self.deserialize()
        except FileNotFoundError:
            pass
        except CheckpointError as exc:
            raise CheckpointError(
                f"refusing to overwrite a checkpoint that cannot be read: {exc}"
            ) from None

    # What the file holds, for a format that can then write less (see `_Base`).

    def _files(self) -> tuple[Path, ...]:
        """The files whose state tells whether someone changed the checkpoint."""
        return (self.path,)

    def _state(self) -> FileStates:
        """`file_state` of `_files`: what `begin` compares with what it was at the load."""
        return file_state(*self._files())

    def _note_base(self, run: Run[Any, Any] | None, files: FileStates | None = None) -> None:
        """The file holds exactly ``run`` (None: nothing known of what it holds), in the
        state ``files`` (`file_state` of `_files`; by default, as they are now)."""
        files = self._state() if files is None else files
        _bases[self.path] = _Base(run, files)
        if run is not None:
            _files_of(run)[self.path] = files

    def _wrote(self, run: Run[Any, Any], complete: bool = True) -> None:
        """This serializer has just written ``run`` to the file, holding the lock; if
        not ``complete`` (a write failed), the file holds some of it: what is there is
        still this run's doing, but not known to be all of it, nor readable."""
        if complete:
            self._note_base(run)
            self._known_good = self._state()
            return
        files = self._state()
        _bases[self.path] = _Base(None, files)
        _files_of(run)[self.path] = files
        self._known_good = None

    def _base_jobs(self, run: Run[Any, Any]) -> int | None:
        """How many of ``run``'s jobs (the first ones) the file holds as they were when
        this process last read or wrote it, if the file holds ``run`` and no one changed
        it since; None otherwise."""
        base = _bases.get(self.path)
        if base is None or base.run is None or base.run() is not run:
            return None
        if base.files != self._state():
            return None
        return base.jobs if len(run.jobs) >= base.jobs else None

    # Processor hooks, all called from the coordinator's thread.

    def begin(self, run: Run[Any, Any]) -> None:
        """The processor starts executing ``run``: lock the checkpoint and make sure the
        file can be written (formats may write it now or defer to the first flush)."""

    def job_changed(self, job: Job[Any]) -> None:
        """A job was added or changed. Must be cheap: the real work happens in `flush`."""

    def jobs_changed(self, jobs: Sequence[Job[Any]]) -> None:
        """Jobs were added or changed (the coordinator reports them a batch at a time).
        By default, `job_changed` for each; formats override it to do less per job."""
        for job in jobs:
            self.job_changed(job)

    def run_changed(self) -> None:
        """The run's own fields (its report) changed: include them in the next flush."""

    def flush(self, run: Run[Any, Any], final: bool = False) -> None:
        """Write what changed if the format's interval has passed (always when ``final``)."""

    def end(self) -> None:
        """The processor is done with the run (also after errors): release the lock."""


class NilSerializer(Serializer):
    """Writes nothing; `deserialize` raises ``FileNotFoundError``."""

    def deserialize(self) -> Run[Any, Any]:
        raise FileNotFoundError("NilSerializer stores no checkpoint")

    def serialize(self, run: Run[Any, Any]) -> None:
        pass
