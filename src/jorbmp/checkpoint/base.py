"""The `Serializer` interface, the run's on-disk schema, and the helpers formats share.

The processor calls `begin` once, `jobs_changed` after each batch of transitions (it
must be cheap: formats batch the real work), `flush` from its housekeeping tick and once
with ``final=True``, then `end`. Formats know the model (`Run`, `Job`), never the
processor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from .. import _fds
from ..errors import CheckpointError
from ..run import Job, Run

__all__ = ["FORMAT_VERSION", "NilSerializer", "RunRecord", "Serializer"]

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


def write_atomic(path: Path, chunks: list[bytes]) -> None:
    """Replace ``path`` with ``chunks``: never a half-written file, owner-only permissions.

    Write a temporary file beside it, fsync, rename over the old one, fsync the
    directory. A crash at any point leaves either the old file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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


class CheckpointLock:
    """An exclusive lock on a checkpoint, held while a processor executes it.

    ``flock`` on ``<path>.lock``: the operating system drops it when the holder dies,
    so a resume after a crash is never refused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.path.with_suffix('')}: checkpoint is in use by another running "
                f"processor (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _fds.register(fd)
        self.fd = fd

    @staticmethod
    def held(path: Path) -> bool:
        """True when a live processor holds the lock on the checkpoint at ``path``."""
        lock = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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


class Serializer:
    """Base of the checkpoint formats. Subclasses implement `deserialize` and `serialize`
    and may override the processor hooks to write incrementally."""

    def deserialize(self) -> Run[Any, Any]:
        """Load the run: ``FileNotFoundError`` if there is none, ``CheckpointError`` if
        it is corrupt or does not fit the types."""
        raise NotImplementedError

    def serialize(self, run: Run[Any, Any]) -> None:
        """Write the whole run now."""
        raise NotImplementedError

    # Set when this serializer read or wrote the file itself: it is known to be valid.
    _known_good = False

    def _setup(self, path: str | os.PathLike[str], overall_type: Any, job_type: Any) -> Any:
        """What every file format's constructor does; returns the job type to decode
        (``Any``, plain data, when none is given)."""
        self.path = Path(path)
        self.overall_type = overall_type if overall_type is not None else Any
        self.job_type = job_type
        self._lock = CheckpointLock(self.path)
        return job_type if job_type is not None else Any

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
