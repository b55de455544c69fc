"""`JsonSerializer`: one human-readable JSON snapshot of the whole run, replaced atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from itertools import compress
from operator import attrgetter
from typing import Any, TypeVar

import msgspec

from .._floats import nonfinite_in_head, nonfinite_in_jobs, refusal
from ..errors import CheckpointError, CheckpointSpaceError
from ..run import Job, Run
from .base import (
    FORMAT_VERSION,
    RunRecord,
    Serializer,
    check_format,
    format_in,
    record_of,
    run_of,
    write_atomic,
)
from .overview import JobHead, Overview, OverviewBuilder

__all__ = ["JsonSerializer"]

_R = TypeVar("_R")


class _RecordHead(msgspec.Struct):
    """A `RunRecord` without the overall context and with only the jobs' heads."""

    format: int
    name: str
    report: dict[str, Any] | None = None
    jobs: list[JobHead] = msgspec.field(default_factory=list)


_decode_head = msgspec.json.Decoder(_RecordHead).decode
_id, _state, _errors = attrgetter("id"), attrgetter("state"), attrgetter("state_errors")

# A snapshot write blocks the coordinator; the next one waits at least this many
# times as long as the last took, so writing costs at most ~10% of a big run's time.
WRITE_SPACING = 10.0


class JsonSerializer(Serializer):
    """The run as one JSON document, one job per line (easy to grep, diff and edit).

    While a processor runs, the file is rewritten at most every ``interval`` seconds
    when something changed, and always at the end or on stop. Each write goes to a
    temporary file that replaces the old one, so a reader (or a crash) only ever sees
    a complete snapshot. Cost per write grows with the run; `JournalSerializer` does not.

    JSON has no NaN or infinity: a run holding one is not written (`CheckpointError`),
    and an exec whose outcome holds one fails that attempt (see `jorbmp._floats`).
    """

    stores_nonfinite_floats = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        overall_type: Any = None,
        job_type: Any = None,
        *,
        interval: float = 1.0,
    ) -> None:
        job: Any = self._setup(path, overall_type, job_type)
        self.interval = interval
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(RunRecord[self.overall_type, job])  # type: ignore[name-defined]
        self._dirty = False
        self._last_write = 0.0
        self._write_seconds = 0.0  # how long the latest write took

    def __repr__(self) -> str:
        return f"JsonSerializer({str(self.path)!r})"

    def _decode(self, decode: Callable[[bytes], _R]) -> _R:
        """The file, decoded by ``decode``; ``CheckpointError`` if it cannot be."""
        data = self.path.read_bytes()  # FileNotFoundError propagates, as the contract says
        if data.isspace() or not data:  # (no copy, unlike strip)
            raise CheckpointError(f"{self.path}: checkpoint file is empty")
        try:
            return decode(data)
        except msgspec.DecodeError as exc:
            check_format(self.path, format_in(data), FORMAT_VERSION)  # a newer layout?
            raise CheckpointError(
                f"{self.path}: not a valid jorbmp JSON checkpoint: {exc}"
            ) from None

    def _read(self) -> Run[Any, Any]:
        return run_of(self._decode(self._decoder.decode), self.job_type, self.path)

    def overview(self) -> Overview:
        """What `deserialize` would find, counted from each job's id, state and errors
        only: msgspec skips the contexts without building them (1M jobs: a third of
        the time and memory of a load)."""
        self._check_present()
        record = self._decode(_decode_head)
        check_format(self.path, record.format, FORMAT_VERSION)
        jobs = record.jobs
        if len(set(map(_id, jobs))) != len(jobs):
            self._read()  # says which id appears twice
        builder = OverviewBuilder()
        builder.count(map(_state, jobs))  # C loops: few jobs have errors
        for job in compress(jobs, map(_errors, jobs)):
            builder.add_errors(job.id, job.state, job.state_errors or {})
        return builder.build(record.name, record.report)

    def _write_run(self, run: Run[Any, Any]) -> None:
        started = time.monotonic()
        enc = self._encoder.encode
        header = enc(record_of(run, []))
        assert header.endswith(b"[]}")
        jobs = [enc(job) for job in run.jobs.values()]
        body = b",\n".join(jobs)
        # msgspec writes NaN and infinities as null, which would not read back: refuse
        # them. A body without "null" (no None, either) holds none (~2 ms per 100k jobs).
        found = nonfinite_in_head(run)
        if found is None and body.rfind(b"null") >= 0:
            found = nonfinite_in_jobs(run.jobs.values())
        if found is not None:
            raise CheckpointError(refusal(self.path, self, *found))
        write_atomic(self.path, [header[:-2], b"\n", body, b"\n]}\n"])
        self.writes += 1
        self._dirty = False
        self._last_write = time.monotonic()
        self._write_seconds = self._last_write - started

    def begin(self, run: Run[Any, Any]) -> None:
        self._claim(run)
        try:
            self.serialize(run)  # under the lock just taken
        except CheckpointSpaceError:
            # The first write did not fit: the lock stays held and the next flush
            # writes the run (the processor waits for space meanwhile).
            self._dirty = True
            raise
        except BaseException:
            self._release()
            raise

    def job_changed(self, job: Job[Any]) -> None:
        self._dirty = True

    def jobs_changed(self, jobs: Sequence[Job[Any]]) -> None:
        self._dirty = True

    def run_changed(self) -> None:
        self._dirty = True

    def flush(self, run: Run[Any, Any], final: bool = False) -> None:
        # Writes happen on the coordinator's thread and grow with the run: space them
        # so that they take at most 1/WRITE_SPACING of the time (a 1M-job run takes
        # ~1 s to write), never more often than every `interval`.
        wait = max(self.interval, WRITE_SPACING * self._write_seconds)
        if self._dirty and (final or time.monotonic() - self._last_write >= wait):
            self.serialize(run)

    def end(self) -> None:
        self._release()
