"""The `Serializer` interface, the run's on-disk schema, and the helpers formats share.

The processor calls `begin` once, `jobs_changed` after each batch of transitions (it
must be cheap: formats batch the real work), `flush` from its housekeeping tick and once
with ``final=True``, then `end`. Formats know the model (`Run`, `Job`), never the
processor.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from .. import _fds
from ..errors import CheckpointError
from ..run import Job, Run
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


def run_of(record: RunRecord[Any, Any], job_type: Any, path: Path) -> Run[Any, Any]:
    """Rebuild a Run from its record; ``CheckpointError`` if the record is inconsistent."""
    if record.format != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {record.format} is not supported "
            f"(this jorbmp reads format {FORMAT_VERSION})"
        )
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
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every OS allows it)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# How long `CheckpointLock.acquire` keeps trying a lock that is taken before refusing.
# A reader that probes the lock (`CheckpointLock.held`: `python -m jorbmp status`, an
# SQLite `deserialize`) holds it for microseconds, or for a scheduler time slice if it
# is preempted in between on a busy machine; a processor holds it for a whole run. So
# a start that finds it taken retries for a while, and only a lock still taken after
# that is another processor's. (Probing without taking the lock is not possible with
# flock; a different kind of lock would not exclude processors of older versions.)
ACQUIRE_PATIENCE = 0.5
_RETRY_SLEEP = 0.001  # the first pause between tries; it doubles, up to 50 ms


class CheckpointLock:
    """An exclusive lock on a checkpoint, held while a processor executes it.

    ``flock`` on ``<path>.lock``: the operating system drops it when the holder dies,
    so a resume after a crash is never refused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``CheckpointError`` naming the checkpoint and the pid of
        the processor that holds it (see `ACQUIRE_PATIENCE`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + ACQUIRE_PATIENCE
        pause = _RETRY_SLEEP
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise CheckpointError(
                        f"{self.path.with_suffix('')}: checkpoint is in use by another "
                        f"running processor (pid {holder})"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _fds.register(fd)
        self.fd = fd

    @staticmethod
    def held(path: Path) -> bool:
        """True when a live processor holds the lock on the checkpoint at ``path``.

        It takes a shared lock for a moment to find out (flock has no other way to ask):
        probes do not exclude each other, and a processor starting meanwhile retries
        (`ACQUIRE_PATIENCE`)."""
        lock = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def release(self) -> None:
        if self.fd is not None:
            _fds.unregister(self.fd)
            os.close(self.fd)  # closing drops the flock
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


class _Base:
    """A run that a checkpoint file held exactly, as this process last read or wrote it."""

    __slots__ = ("files", "jobs", "run")

    def __init__(self, run: Run[Any, Any], files: tuple[Any, ...]) -> None:
        self.run = weakref.ref(run)
        self.jobs = len(run.jobs)  # the first `jobs` jobs of the run are those in the file
        self.files = files


# Per checkpoint path (resolved), the run it holds, as far as this process knows: so
# that a processor resuming a run that another serializer object loaded knows too.
_bases: dict[Path, _Base] = {}


class Serializer:
    """Base of the checkpoint formats. Subclasses implement `deserialize` and `_write_run`
    (or `serialize` itself) and may override the processor hooks to write incrementally."""

    def deserialize(self) -> Run[Any, Any]:
        """Load the run: ``FileNotFoundError`` if there is none, ``CheckpointError`` if
        it is corrupt or does not fit the types."""
        raise NotImplementedError

    def serialize(self, run: Run[Any, Any]) -> None:
        """Write the whole run now, replacing the checkpoint.

        It takes the checkpoint's lock for the write (unless this serializer holds it,
        executing the run): ``CheckpointError`` naming the pid of the live processor that
        holds it, and nothing written. Refuses to replace a checkpoint that cannot be
        read (see `check_overwritable`)."""
        with self.locked():
            self.check_overwritable()
            self._write_run(run)
        self._known_good = True

    def _write_run(self, run: Run[Any, Any]) -> None:
        """Replace the file with ``run`` (the lock held, the old file checked)."""
        raise NotImplementedError

    def overview(self) -> Overview:
        """Per-state counts and the most common errors (``python -m jorbmp status``), as
        `deserialize` would find them. Formats override it to read less than every job
        (``FileNotFoundError``, ``CheckpointError`` as for `deserialize`)."""
        return overview_of(self.deserialize())

    # Set when this serializer read or wrote the file itself: it is known to be valid.
    _known_good = False
    _lock: CheckpointLock | None = None

    def _setup(self, path: str | os.PathLike[str], overall_type: Any, job_type: Any) -> Any:
        """What every file format's constructor does; returns the job type to decode
        (``Any``, plain data, when none is given)."""
        self.path = Path(path)
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
        """What `begin` does first in every format: take the lock (see `_acquire`) and
        check that the file may be overwritten. Returns `_base_jobs` (read under the
        lock, before anything else reads the file)."""
        self._acquire()
        try:
            base = self._base_jobs(run)
            if base is None:  # (a file known to hold the run can be read)
                self.check_overwritable()
        except BaseException:
            self._release()
            raise
        return base

    def _release(self) -> None:
        """Let go of the checkpoint's lock, if this serializer holds it."""
        if self._lock is not None:
            self._lock.release()

    def check_overwritable(self) -> None:
        """Refuse (``CheckpointError``) to replace a checkpoint that cannot be read: the
        file is left byte-for-byte as it is, for a person to look at."""
        if self._known_good:
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

    def _note_base(self, run: Run[Any, Any] | None, files: tuple[Any, ...] | None = None) -> None:
        """The file holds exactly ``run`` (None: nothing known), in the state ``files``
        (`file_state` of `_files`; by default, as they are now)."""
        key = self.path.resolve()
        if run is None:
            _bases.pop(key, None)
        else:
            _bases[key] = _Base(run, file_state(*self._files()) if files is None else files)

    def _base_jobs(self, run: Run[Any, Any]) -> int | None:
        """How many of ``run``'s jobs (the first ones) the file holds as they were when
        this process last read or wrote it, if the file holds ``run`` and no one changed
        it since; None otherwise."""
        base = _bases.get(self.path.resolve())
        if base is None or base.run() is not run or base.files != file_state(*self._files()):
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
