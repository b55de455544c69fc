"""`JournalSerializer`: an append-only journal of changed jobs, compacted into snapshots.

The checkpoint is one file::

    header    b"\\x89jorbmp journal\\n"  u32 version                       20 bytes
    frame     b"\\xa5JR\\x5a"  u32 length  u32 crc32  payload         a whole record
    frame     b"\\xa5JR\\x5b"  u32 length  u32 crc32  payload piece   a record goes on...
    frame     b"\\xa5JR\\x5a"  u32 length  u32 crc32  payload piece   ...and ends here
    ...

A record's payload (msgpack) is a `_Begin` (run name, overall context, next id, and
the extent of the snapshot: see below) or a `_Jobs` (a batch of whole jobs, each
replacing any earlier copy with its id, plus the run's next id). A record is one
frame, or, when its payload is bigger than a frame's u32 length can say
(`MAX_FRAME_BYTES`), several: every frame but the last is marked ``\\x5b``
(continued), and the record is its frames' payloads joined. Each frame's crc covers
its marker, its length and its payload. A file is always a *snapshot* (the
header, one `_Begin`, then every job in chunks of `SNAPSHOT_CHUNK_JOBS`), written to a
temporary file and renamed into place, followed by *journal* records appended as the
run executes: one record per flush, holding the jobs that changed since the previous
one. Replaying the records in order rebuilds the run. The `_Begin` says how many job
records its snapshot has and how many bytes they take (it cannot say at which byte
they end: its own size depends on that), so that a reader knows where the snapshot
ends. (Files of jorbmp versions before that lack the two fields; they load, and their
snapshot is known only up to its first record. Older versions read the new files,
ignoring the fields.)

Who does what while a processor executes:

- `begin` writes nothing. The first write of an execution is a snapshot of the whole
  run, made at the first flush once an ``interval`` has passed (or at the final flush,
  if that comes first): a kill before it loses at most that interval of work, plus
  the time the snapshot takes to reach the disk (it is encoded on the coordinator's
  thread, while nothing else happens, and written as fast as the disk goes). Until
  then the file holds what it held before (nothing, or the run as loaded), which is a
  valid past of this run.
- `jobs_changed` (coordinator thread, after every batch of transitions and kicks)
  notes the jobs in an ordered set of dirty jobs: O(1) per job, whatever the size of
  the run (and nothing before the first snapshot, which holds every job anyway).
- `flush` (coordinator thread, every housekeeping tick) encodes the dirty jobs into
  one record at most every ``interval`` seconds, and hands it to a single writer
  thread that appends it and fsyncs. While the writer is busy, `flush` hands it
  nothing new and jobs keep collecting in the dirty set, so a slow disk makes
  batches bigger instead of queueing memory. The final flush waits for the disk.
- When a record would make the journal part bigger than the snapshot part (and
  than `COMPACT_MIN_BYTES`), `flush` encodes a whole new snapshot instead; the writer
  writes it beside the file, fsyncs, renames it over the file and appends to the new
  file from then on. The file stays below about twice a snapshot, and compacting
  costs O(run) once per O(run) journal bytes: O(1) per transition. A compaction
  that does not fit (a full disk) appends the record instead, and the next one waits
  until the journal has grown by as much again. So does an execution's first
  snapshot, where the file is an intact journal of the run: it appends the jobs whose
  copy in the file differs from the run's (compared as encoded bytes), after cutting
  off a torn tail, so that a file taking more than half the disk still resumes.

Crash safety: every flush is one record, so a transition (a job, its kicks and the
jobs it changed) is in the file entirely or not at all; a record of several frames
counts only once its last frame is there. A crash while appending leaves a torn last
record (maybe some of its frames), which loading ignores with a warning (the next
execution starts with a fresh snapshot, or cuts it off before it appends). A
crash while compacting leaves either the old file or the new one, both complete.

What loading refuses, raising `CheckpointError` with the path and the byte offset (so
that `begin` refuses to overwrite the file, which stays as it is for a person to look
at), is anything a crash cannot leave:

- a file that ends, or a record that is damaged or cut short, *before the end of its
  snapshot* (a snapshot is never torn, being renamed into place whole): a truncated
  copy or a damaged disk, which loading would otherwise turn into a run without the
  lost jobs (the message says how many of the snapshot's bytes and records are
  intact); in files without the snapshot's extent, only a damaged or incomplete first
  record is known to be such;
- a record with no marker or a wrong crc *followed by intact records*: damage, since
  nothing is ever appended after a torn record.

A record whose declared length runs past the end of the file (or whose header does)
after the snapshot is a torn append, whatever its bytes hold: intact frames inside its
declared extent are part of its payload (a job's context may hold a journal's bytes).
A damaged *last* record cannot be told from a torn write, and is ignored like one; so
is a length field damaged to run past the end of the file, after the snapshot.

`JournalSerializer.overview` reads the same records with the same checks, decoding
of each job only its id, state and errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import compress, islice, repeat
from operator import attrgetter, not_
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar, Union, cast

import msgspec

from .. import _fds
from ..errors import CheckpointError, CheckpointSpaceError
from ..run import Job, Run
from ._incremental import IncrementalSerializer
from ._space import describe
from .base import JOURNAL_MAGIC, check_format, format_hint, write_atomic
from .overview import JobHead, Overview, OverviewBuilder

__all__ = ["JournalSerializer"]

log = logging.getLogger("jorbmp")

OC = TypeVar("OC")
JC = TypeVar("JC")

JOURNAL_VERSION = 1
FILE_MAGIC = JOURNAL_MAGIC
_FILE_HEADER = struct.Struct("<16sI")  # magic, version
RECORD_MAGIC = b"\xa5JR\x5a"  # the frame of a record, or the last frame of one
CONTINUED_MAGIC = b"\xa5JR\x5b"  # a frame of a record that goes on in the next frame
_MAGIC_PREFIX = RECORD_MAGIC[:3]
_RECORD_HEAD = struct.Struct("<4sI")  # marker, payload length; then the crc
_CRC = struct.Struct("<I")
RECORD_HEADER_SIZE = _RECORD_HEAD.size + _CRC.size
# Payload bytes in one frame: its length is a u32. A record's payload bigger than this
# is split over several frames (read at each call, so a test can lower it).
MAX_FRAME_BYTES = 0xFFFFFFFF

# Jobs per record in a snapshot. A snapshot is made atomic by its rename, not by its
# records, so it can be chunked: smaller chunks bound the memory a load needs at once,
# bigger ones cost fewer record headers. 10,000 jobs are about 0.5-1 MB.
SNAPSHOT_CHUNK_JOBS = 10_000
# The file is compacted when a record would make its journal part bigger than its
# snapshot part and than this.
# Compacting more often costs more O(run) snapshots; less often makes the file (and a
# reload) bigger. 1 MiB keeps small runs from compacting every few flushes.
COMPACT_MIN_BYTES = 1 << 20


_Count = Annotated[int, msgspec.Meta(ge=0)]


class _Begin(msgspec.Struct, Generic[OC], tag="begin"):
    """The first record of every file: the run without its jobs, and the extent of the
    snapshot's job records that follow it: how many there are (``chunks``) and their
    size in bytes, frames included (``chunk_bytes``). Files written before jorbmp
    recorded the extent have None there."""

    name: str
    next_id: int
    overall: OC
    report: dict[str, Any] | None = None
    chunks: _Count | None = None
    chunk_bytes: _Count | None = None


class _Jobs(msgspec.Struct, Generic[JC], tag="jobs"):
    """Whole jobs, each replacing the copy with its id; a snapshot chunk or one flush."""

    next_id: int
    jobs: list[Job[JC]]
    report: dict[str, Any] | None = None  # the run's report


# What `JournalSerializer.overview` decodes of the same records: msgspec skips the
# fields a struct does not name (the overall context; each job's context, history and
# dates) without building them.


class _BeginHead(msgspec.Struct, tag="begin"):
    name: str
    report: dict[str, Any] | None = None
    chunks: _Count | None = None
    chunk_bytes: _Count | None = None


class _JobsHead(msgspec.Struct, tag="jobs"):
    jobs: list[JobHead]
    report: dict[str, Any] | None = None


_decode_heads = msgspec.msgpack.Decoder(_BeginHead | _JobsHead).decode


# What a first write that falls back to appending (`JournalSerializer._first`) compares:
# the run's fields and each job as their msgpack bytes, undecoded.


_NIL = msgspec.Raw(b"\xc0")  # msgpack's nil: no report


class _BeginRaw(msgspec.Struct, tag="begin"):
    name: str
    overall: msgspec.Raw
    report: msgspec.Raw = _NIL
    chunks: _Count | None = None
    chunk_bytes: _Count | None = None


class _JobsRaw(msgspec.Struct, tag="jobs"):
    jobs: list[msgspec.Raw]
    report: msgspec.Raw = _NIL


class _JobsOut(msgspec.Struct, tag="jobs"):
    """A `_Jobs` record of jobs already encoded (the same bytes on disk)."""

    next_id: int
    jobs: list[msgspec.Raw]
    report: dict[str, Any] | None = None


class _JobId(msgspec.Struct):
    id: str


_decode_raw = msgspec.msgpack.Decoder(_BeginRaw | _JobsRaw).decode
_decode_job_id = msgspec.msgpack.Decoder(_JobId).decode
_BEGINS = (_Begin, _BeginHead, _BeginRaw)
_job_id = attrgetter("id")
_job_state = attrgetter("state")
_job_errors = attrgetter("state_errors")
_Counted = str | JobHead  # what `overview` keeps of a job


def _count(builder: OverviewBuilder, ids: list[str], counted: list[_Counted]) -> None:
    """Add jobs to ``builder`` in order: each is its state, or its copy with errors.
    Jobs without errors only add 1 to their state's count, which one `Counter` update
    does for all of them."""
    plain = list(map(isinstance, counted, repeat(str)))
    builder.count(cast("Iterator[str]", compress(counted, plain)))
    for job_id, job in compress(zip(ids, counted, strict=True), map(not_, plain)):
        assert isinstance(job, JobHead)
        builder.add(job_id, job.state, job.state_errors)


_fdatasync = getattr(os, "fdatasync", os.fsync)


_Piece = bytes | memoryview


def _frame(payload: bytes) -> list[_Piece]:
    """One record, as its frames' headers (marker, length, crc32 of marker, length and
    payload) and payloads: a header and a payload per frame, so that a payload of
    megabytes is never copied to join them, and one frame unless it is bigger than
    `MAX_FRAME_BYTES`."""
    limit = MAX_FRAME_BYTES
    size = len(payload)
    if size <= limit:
        pieces: list[_Piece] = [payload]
    else:
        view = memoryview(payload)
        pieces = [view[start : start + limit] for start in range(0, size, limit)]
    frames: list[_Piece] = []
    for i, piece in enumerate(pieces):
        marker = RECORD_MAGIC if i == len(pieces) - 1 else CONTINUED_MAGIC
        head = _RECORD_HEAD.pack(marker, len(piece))
        frames += [head + _CRC.pack(zlib.crc32(piece, zlib.crc32(head))), piece]
    return frames


def _check_frame(data: memoryview, offset: int) -> tuple[int, str | None, bool]:
    """(end of the frame at ``offset``, None, whether its record goes on in the next
    frame) if it is intact, else (its declared end, what is wrong, False), where the end
    is past the end of the file for a frame cut short (its header, or its declared
    length, runs past it: see `_records`), and -1 for one without a marker."""
    size = len(data)
    if size - offset < RECORD_HEADER_SIZE:
        end = offset + RECORD_HEADER_SIZE
        return end, f"{size - offset} bytes, too short for a record header", False
    marker, length = _RECORD_HEAD.unpack_from(data, offset)
    if marker != RECORD_MAGIC and marker != CONTINUED_MAGIC:
        return -1, "no record marker", False
    start = offset + RECORD_HEADER_SIZE
    end = start + length
    if end > size:
        return end, f"a {length}-byte record runs past the end of the file", False
    if not _crc_fits(data, offset, length):
        return end, "checksum mismatch", False
    return end, None, marker == CONTINUED_MAGIC


def _crc_fits(data: memoryview, offset: int, length: int) -> bool:
    """Whether the crc of the frame at ``offset`` fits its marker, ``length`` and the
    ``length`` bytes after its header."""
    marker = bytes(data[offset : offset + 4])
    head = _RECORD_HEAD.pack(marker, length)
    start = offset + RECORD_HEADER_SIZE
    (crc,) = _CRC.unpack_from(data, offset + _RECORD_HEAD.size)
    return bool(zlib.crc32(data[start : start + length], zlib.crc32(head)) == crc)


def _intact_after(data: memoryview, raw: bytes, offset: int, end: int) -> int | None:
    """Where an intact record follows the broken frame at ``offset`` (declared to end
    at ``end``; -1: no marker, so unknown), proving it damage rather than a torn last
    write; None if nothing does.

    A frame found inside the broken one's declared extent is part of its payload (a
    payload is any bytes: a job's context may hold a piece of a journal file), unless
    the broken frame's crc fits a length that ends exactly there: then its length field
    is what was damaged, and the records after it are real."""
    found = _next_valid_frame(data, raw, offset + 1)
    while found is not None:
        if end == -1 or found >= end:
            return found
        if _crc_fits(data, offset, found - offset - RECORD_HEADER_SIZE):
            return found
        found = _next_valid_frame(data, raw, found + 1)
    return None


def _next_valid_frame(data: memoryview, raw: bytes, start: int) -> int | None:
    """Offset of the first intact frame at or after ``start``, if any."""
    offset = raw.find(_MAGIC_PREFIX, start)
    while offset != -1:
        if _check_frame(data, offset)[1] is None:
            return offset
        offset = raw.find(_MAGIC_PREFIX, offset + 1)
    return None


_JOB_INDEX = re.compile(r"\$\.jobs\[(\d+)\]")


def _job_id_at(payload: memoryview, message: str) -> str:
    """`` (job 'id')`` for the job a msgspec error path like ``$.jobs[3]...`` points at."""
    match = _JOB_INDEX.search(message)
    if match is None:
        return ""
    try:
        job = msgspec.msgpack.decode(payload)["jobs"][int(match.group(1))]
        return f" (job {job['id']!r})"
    except Exception:
        return ""


def _records(
    path: Path, raw: bytes, decode: Callable[[memoryview], Any]
) -> Iterator[tuple[Any, int]]:
    """The records of the journal ``raw`` (read from ``path``), in order, each decoded by
    ``decode`` (a union of a begin and a jobs struct), with the byte where it ends: the
    run record first, then job records. Every reader of the file goes through here, so
    all of them make the same checks: ``CheckpointError`` (naming the path and the
    byte) for a file that is not a journal, does not decode, is damaged, or ends inside
    its snapshot; only a torn tail after the snapshot is dropped, with a warning."""
    if not raw:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if len(raw) < _FILE_HEADER.size or not raw.startswith(FILE_MAGIC):
        raise CheckpointError(f"{path}: not a jorbmp journal{format_hint(raw[:32])}")
    _, version = _FILE_HEADER.unpack_from(raw)
    check_format(path, version, JOURNAL_VERSION)
    data = memoryview(raw)
    size = len(raw)
    offset = _FILE_HEADER.size
    start = offset  # where the record being read begins
    pieces: list[memoryview] = []  # its payload so far, while its frames go on
    count = 0  # records read
    # The snapshot's records (the run record and its job records) and where they end,
    # as its run record says; unknown (None) in files of jorbmp versions that did not
    # record it, whose snapshot is then known to be complete only up to its first record.
    snapshot_records = 0
    snapshot_end: int | None = None
    chunk_bytes = 0

    def incomplete(what: str) -> CheckpointError:
        # A snapshot is written whole to a temporary file and renamed into place, so no
        # crash leaves part of one: the file was cut short (an interrupted copy, a full
        # disk) or damaged, and loading what is left would silently lose jobs.
        if snapshot_end is None:
            where = "inside the file's first record (the run): the snapshot is incomplete"
        else:
            total = chunk_bytes
            intact = start - (snapshot_end - total)
            where = (
                f"inside the snapshot, whose job records end at byte {snapshot_end}: the "
                f"snapshot is incomplete ({intact} of its {total} bytes of jobs, "
                f"{count - 1} of its {snapshot_records - 1} job records, are intact)"
            )
        return CheckpointError(
            f"{path}: {what} {where}; a snapshot is written whole, so the file was cut "
            "short or damaged, not torn by a crash"
        )

    while True:
        in_snapshot = count == 0 or (snapshot_end is not None and start < snapshot_end)
        if offset == size:
            if count == 0 and not pieces:
                raise CheckpointError(
                    f"{path}: the journal holds no run record (the file ends at byte "
                    f"{size}, after its header)"
                )
            if in_snapshot:
                raise incomplete(f"the file ends at byte {size},")
            if pieces:  # the record's last frame never made it to the file
                log.warning(
                    "%s: ignoring %d bytes at byte %d (a record without its last "
                    "frame): a write torn by a crash", path, size - start, start,
                )  # fmt: skip
            return
        end, problem, continued = _check_frame(data, offset)
        if problem is not None:
            if in_snapshot:
                raise incomplete(f"record at byte {offset} ({problem}),")
            # Which failures a crash can leave: a record is appended (with pwrite) and
            # then fsynced, and the writer cuts off whatever a failed append left before
            # it appends again (`_append`), so a crash leaves at most one incomplete
            # record, the last: a frame whose header, or whose declared length, runs
            # past the end of the file, or whose blocks never reached the disk (zeros,
            # garbage: a wrong crc or no marker). Nothing is ever appended after it, so
            # an intact record after the broken frame proves damage (`_intact_after`
            # says which frames count: not those inside the broken frame's payload).
            following = _intact_after(data, raw, offset, end)
            if following is not None:
                raise CheckpointError(
                    f"{path}: corrupt record at byte {offset} ({problem}); intact "
                    f"records follow at byte {following}, so this is damage, not a "
                    "write torn by a crash"
                )
            log.warning(
                "%s: ignoring %d bytes at byte %d (%s): a write torn by a crash",
                path, size - start, start, problem,
            )  # fmt: skip
            return
        pieces.append(data[offset + RECORD_HEADER_SIZE : end])
        offset = end
        if continued:
            continue
        payload = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
        pieces = []
        try:
            record = decode(payload)
        except msgspec.ValidationError as exc:
            raise CheckpointError(
                f"{path}: record at byte {start} does not fit the types{_job_id_at(payload, str(exc))}: {exc}"  # noqa: E501
            ) from None
        except msgspec.DecodeError as exc:
            raise CheckpointError(
                f"{path}: record at byte {start} is not a jorbmp record: {exc}"
            ) from None
        if count == 0:
            if not isinstance(record, _BEGINS):
                raise CheckpointError(f"{path}: jobs before the run record, at byte {start}")
            if record.chunks is not None and record.chunk_bytes is not None:
                chunk_bytes = record.chunk_bytes
                snapshot_end = offset + chunk_bytes
                snapshot_records = 1 + record.chunks
            else:
                log.warning(
                    "%s: written by jorbmp 0.1, which did not record where its snapshot "
                    "ends: a file cut short between its records cannot be told from a "
                    "whole one (the next execution rewrites it with its extent)",
                    path,
                )
        elif isinstance(record, _BEGINS):
            raise CheckpointError(f"{path}: a second run record at byte {start}")
        count += 1
        if (
            snapshot_end is not None
            and start < snapshot_end
            and (offset > snapshot_end or (offset == snapshot_end) != (count == snapshot_records))
        ):
            raise CheckpointError(
                f"{path}: the snapshot's records do not match its run record (record "
                f"{count} ends at byte {offset}; {snapshot_records - 1} job records were "
                f"to end at byte {snapshot_end}): the file is damaged"
            )
        yield record, offset
        start = offset


class JournalSerializer(IncrementalSerializer):
    """The run as a snapshot plus an append-only journal of changed jobs, in one file.

    Cost per transition does not grow with the run: `jobs_changed` notes the jobs, each
    flush (at most every ``interval`` seconds) appends one record with the jobs that
    changed, written and fsynced by a background thread, and the file is compacted
    into a fresh snapshot whenever the journal part outgrows the snapshot part (and
    ``compact_min_bytes``). After a crash, a reload has every record that reached the
    file; a torn last record is ignored. A file cut short or damaged inside its
    snapshot, or damaged before intact records, is a `CheckpointError` (see the module
    docstring).

    ``compactions``, ``snapshot_bytes`` and ``journal_bytes`` describe the file while
    a processor executes the run.
    """

    _thread_name = "jorbmp-journal"

    def __init__(
        self,
        path: str | os.PathLike[str],
        overall_type: Any = None,
        job_type: Any = None,
        *,
        interval: float = 0.2,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> None:
        job: Any = self._setup(path, overall_type, job_type)
        self.interval = interval
        self.compact_min_bytes = compact_min_bytes
        self._encode = msgspec.msgpack.Encoder().encode
        self._decoder = msgspec.msgpack.Decoder(
            Union[_Begin[self.overall_type], _Jobs[job]]  # type: ignore[name-defined]  # noqa: UP007
        )
        self._reset_batches()
        # Owned by whoever writes: the coordinator thread until `begin` returns, then
        # the writer thread; read by the coordinator only while no write is pending.
        self._fd: int | None = None
        self._size = 0  # bytes of intact records: where the next one goes
        # The run's report as the file holds it (set by the writer, like `_fd`): an
        # appended record repeats the report only when it changed.
        self._file_report: dict[str, Any] | None = None
        self.compactions = 0
        self.snapshot_bytes = 0
        self.journal_bytes = 0
        # Journal bytes below which no compaction is tried, after one did not fit.
        self._compact_after = 0
        self._tracking = False
        self._first_due = 0.0
        self._run: Run[Any, Any] | None = None  # while executing

    def __repr__(self) -> str:
        state = (
            f" snapshot={self.snapshot_bytes}B journal={self.journal_bytes}B "
            f"dirty={len(self._dirty)} compactions={self.compactions}"
            if self._active
            else ""
        )
        return f"JournalSerializer({str(self.path)!r}){state}"

    # -- reading --------------------------------------------------------------------

    def _read(self) -> Run[Any, Any]:
        raw = self.path.read_bytes()  # FileNotFoundError propagates, as the contract says
        return self._replay(raw)

    def _replay(self, raw: bytes) -> Run[Any, Any]:
        run: Run[Any, Any] | None = None
        for record, _ in _records(self.path, raw, self._decoder.decode):
            if run is None:  # the first record, the run's (`_records` checks that)
                run = Run(record.name, record.overall, self.job_type)
                run.next_id = record.next_id
                run.report = record.report
                continue
            jobs = run.jobs
            for job in record.jobs:
                jobs[job.id] = job
            run.next_id = record.next_id
            if record.report is not None:
                run.report = record.report
        assert run is not None  # `_records` raises for a journal without a run record
        return run

    def overview(self) -> Overview:
        """What `deserialize` would find, counted without building the run: the same
        records, with the same checks (`_records`), decoding of each job only its id,
        state and errors, and keeping per job only its latest state and errors (the
        latest record's copy of a job replaces the earlier ones, as in the run), in
        the run's order (where each job first appears)."""
        self._check_present()
        raw = self.path.read_bytes()  # FileNotFoundError propagates, as in deserialize
        # What a job is counted as: the state of its latest copy (one shared string per
        # state), or for the few whose latest copy has errors, that copy itself. Kept
        # for the snapshot a chunk at a time (its ids are all different, as jorbmp
        # writes them: one set tells), and for the jobs of the records after it, by id
        # (a dict, where a later copy replaces an earlier one, as in the run). Built by
        # C loops (map, compress, set and dict updates): a Python statement per job
        # would be most of the time this takes.
        snapshot: list[tuple[list[str], list[_Counted]]] = []
        snapshot_ids: set[str] = set()
        later: dict[str, _Counted] = {}  # in a file without the snapshot's extent: all
        shared: dict[str, str] = {}
        chunks = 0  # snapshot chunks still to come (`_records` checks how many there are)
        name = ""
        report: dict[str, Any] | None = None
        for record, _ in _records(self.path, raw, _decode_heads):
            if isinstance(record, _BeginHead):  # the first
                name, report, chunks = record.name, record.report, record.chunks or 0
                continue
            jobs = record.jobs
            ids = list(map(_job_id, jobs))
            states = list(map(_job_state, jobs))
            counted: list[_Counted] = list(map(shared.setdefault, states, states))
            for i in compress(range(len(jobs)), map(_job_errors, jobs)):
                counted[i] = jobs[i]
            if record.report is not None:
                report = record.report
            if chunks:
                chunks -= 1
                known = len(snapshot_ids)
                snapshot_ids.update(ids)
                if len(snapshot_ids) == known + len(ids):
                    snapshot.append((ids, counted))
                    continue
                # A job twice in the snapshot (not written by jorbmp): every record
                # replaces jobs by id from here on.
                for chunk in snapshot:
                    later.update(zip(*chunk, strict=True))
                snapshot.clear()
                snapshot_ids.clear()
                chunks = 0
            later.update(zip(ids, counted, strict=True))
        # The jobs in the run's order (the snapshot's, then those that first appear
        # after it), as `overview_of` adds them.
        builder = OverviewBuilder()
        for ids, counted in snapshot:
            _count(builder, ids, list(map(later.get, ids, counted)) if later else counted)
        if later:
            new = list(map(not_, map(snapshot_ids.__contains__, later)))
            _count(builder, list(compress(later, new)), list(compress(later.values(), new)))
        return builder.build(name, report)

    # -- writing --------------------------------------------------------------------

    def _snapshot(self, run: Run[Any, Any]) -> list[_Piece]:
        """The whole run as the chunks of a new file: its run record says how many job
        records follow and how many bytes they take, so that a load can tell a
        complete snapshot from a cut one (it cannot say where they end: its own size
        depends on that)."""
        encode = self._encode
        jobs = list(run.jobs.values())
        starts = range(0, len(jobs), SNAPSHOT_CHUNK_JOBS)
        records: list[_Piece] = []
        for i in starts:
            records += _frame(encode(_Jobs(run.next_id, jobs[i : i + SNAPSHOT_CHUNK_JOBS])))
        chunk_bytes = sum(map(len, records))
        begin = _Begin(run.name, run.next_id, run.overall, run.report, len(starts), chunk_bytes)
        return [_FILE_HEADER.pack(FILE_MAGIC, JOURNAL_VERSION), *_frame(encode(begin)), *records]

    def _write_run(self, run: Run[Any, Any]) -> None:
        """A fresh snapshot."""
        write_atomic(self.path, self._snapshot(run))

    def _replace(self, chunks: list[_Piece]) -> None:
        """Writer: make ``chunks`` the whole file (atomically) and append to it from now on."""
        write_atomic(self.path, chunks)
        self._close_fd()  # the old file is gone: never append to it again
        self._size = self.snapshot_bytes = sum(len(chunk) for chunk in chunks)
        self.journal_bytes = 0
        self._compact_after = 0
        self._open_fd()
        self.writes += 1

    def _open_fd(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        _fds.register(fd)  # a forked worker must not keep a replaced file alive
        self._fd = fd

    def _first(self, chunks: list[_Piece], next_id: int, report: dict[str, Any] | None) -> None:
        """Writer: the first write of an execution, the snapshot ``chunks`` made the file.
        Where it does not fit (it needs room for a whole snapshot beside the file) and
        the file is an intact journal of this run (as loaded, say), append instead the
        jobs whose copy in the file differs from the snapshot's (``next_id`` and
        ``report`` are the run's), as a compaction that does not fit does: a run whose
        file takes more than half the disk can still resume."""
        try:
            self._replace(chunks)
        except CheckpointSpaceError as exc:
            found = self._difference(chunks, next_id, report)
            if found is None:
                raise  # nothing of this run's to append to: wait for room
            record, snapshot_end, end = found
            self._open_fd()
            self._size = end  # (`_append` cuts off a torn tail beyond it first)
            self.snapshot_bytes = snapshot_end
            self.journal_bytes = end - snapshot_end
            try:
                self._append(record)
            except BaseException:
                self._close_fd()  # still no snapshot of this execution: retry one
                raise
            self._compact_after = self.journal_bytes + max(
                self.compact_min_bytes, self.snapshot_bytes
            )
            log.info(
                "%s: no room for a snapshot beside the file (%s): appended the changed "
                "jobs to it instead", self.path, describe(exc.cause),
            )  # fmt: skip

    def _difference(
        self, chunks: list[_Piece], next_id: int, report: dict[str, Any] | None
    ) -> tuple[list[_Piece], int, int] | None:
        """Writer: the record that makes the file replay to the run of the snapshot
        ``chunks``, with where the file's snapshot and its intact records end; None
        where no record can (no file, a damaged one, another run, jobs in another
        order, a report the run no longer has). Jobs are compared as their encoded
        bytes: one encoded differently (by another version, say) is appended too,
        which only costs room."""
        try:
            raw = self.path.read_bytes()
            held = self._raw_jobs(raw)
        except (OSError, CheckpointError):
            return None
        begin, jobs, snapshot_end, end, had_report = held
        new_begin, new_jobs, _, _, _ = self._raw_jobs(b"".join(chunks))
        if (
            (begin.name, begin.overall) != (new_begin.name, new_begin.overall)
            or list(jobs) != list(islice(new_jobs, len(jobs)))
            or (had_report and report is None)  # (a record cannot take a report away)
        ):
            return None
        get = jobs.get
        changed = [job for job_id, job in new_jobs.items() if get(job_id) != job]
        return _frame(self._encode(_JobsOut(next_id, changed, report))), snapshot_end, end

    def _raw_jobs(self, raw: bytes) -> tuple[_BeginRaw, dict[str, msgspec.Raw], int, int, bool]:
        """The journal ``raw``'s run record, the latest copy of each job (encoded, in
        the run's order), where its snapshot and its intact records end, and whether
        it holds a report."""
        records = _records(self.path, raw, _decode_raw)
        begin, end = next(records)
        snapshot_end = end + (begin.chunk_bytes or 0)
        had_report = begin.report != _NIL
        jobs: dict[str, msgspec.Raw] = {}
        for record, record_end in records:
            for job in record.jobs:
                jobs[_decode_job_id(job).id] = job
            had_report = had_report or record.report != _NIL
            end = record_end
        return begin, jobs, snapshot_end, end, had_report

    def _compact(self, chunks: list[_Piece], record: list[_Piece]) -> None:
        """Writer: make the new snapshot ``chunks`` the file. Where it does not fit (it
        needs room for a whole snapshot beside the file), append ``record`` (the same
        changed jobs) instead, and compact again only once the journal has grown by as
        much once more: a disk with room for appends goes on, without a snapshot that
        fills it and fails at every flush."""
        try:
            self._replace(chunks)
        except CheckpointSpaceError as exc:
            self._append(record)  # (which raises in turn if it does not fit either)
            self._compact_after = self.journal_bytes + max(
                self.compact_min_bytes, self.snapshot_bytes
            )
            log.info(
                "%s: no room to compact (%s): appended instead", self.path, describe(exc.cause)
            )
            return
        self.compactions += 1

    def _append(self, record: list[_Piece]) -> None:
        """Writer: append one record (its pieces) at the end of the intact records, then
        fsync."""
        fd = self._fd
        assert fd is not None  # `_prepare` writes a snapshot instead while there is none
        offset = self._size
        # A failed earlier write may have left part of a record there: cut it off
        # first, so that nothing is ever appended after a torn record.
        if os.fstat(fd).st_size != offset:
            os.ftruncate(fd, offset)
        try:
            for piece in record:
                view = memoryview(piece)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view = view[written:]
                    offset += written
            _fdatasync(fd)
        except OSError:
            # (A full disk, typically.) Cut off what part of the record reached the
            # file, now: a reload before the next write then finds no torn tail either.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
            raise
        self.journal_bytes += offset - self._size
        self._size = offset
        self.writes += 1

    def _close_fd(self) -> None:
        if self._fd is not None:
            _fds.unregister(self._fd)
            os.close(self._fd)
            self._fd = None

    # -- processor hooks ------------------------------------------------------------

    def begin(self, run: Run[Any, Any]) -> None:
        self._claim(run)
        # Nothing is written until the first snapshot (see the module docstring), which
        # also leaves the file compact and without any torn tail.
        self._close_fd()
        self._reset_batches()
        self._tracking = False  # whether changed jobs must be noted: once a snapshot is made
        self._first_due = self._first_deadline()
        self._run = run
        self._active = True

    def job_changed(self, job: Job[Any]) -> None:
        if self._tracking:
            super().job_changed(job)

    def jobs_changed(self, jobs: Sequence[Job[Any]]) -> None:
        if self._tracking:
            super().jobs_changed(jobs)

    @property
    def _urgent(self) -> bool:
        # `_fd` is read only while the writer is idle (see `IncrementalSerializer.flush`).
        # It is None until a snapshot of this execution is in the file (or while a
        # failed one has to be written again).
        return self._fd is None and (self._final or time.monotonic() >= self._first_due)

    def _prepare(self, run: Run[Any, Any], jobs: dict[str, Job[Any]]) -> Callable[[], None]:
        if self._fd is None:
            # The first snapshot: every job as it is now, so from here on only the jobs
            # that change need to be noted.
            self._tracking = True
            snapshot = self._snapshot(run)
            return partial(
                self._holding, run.report, self._first, snapshot, run.next_id, run.report
            )
        # The report only if the file does not hold it yet: with its timeline it can
        # take ~100 KB, and a replay keeps the latest it meets.
        report = None if run.report is self._file_report else run.report
        record = _frame(self._encode(_Jobs(run.next_id, list(jobs.values()), report)))
        # Read without a lock: the writer is idle whenever this runs.
        size = sum(map(len, record))
        if self.journal_bytes + size > max(
            self.compact_min_bytes, self.snapshot_bytes, self._compact_after
        ):
            # The journal part would outgrow the snapshot part: write a new snapshot
            # (it has the changed jobs too). A snapshot costs O(run), but only after
            # O(run) bytes of journal, so compaction is O(1) per transition.
            return partial(self._holding, run.report, self._compact, self._snapshot(run), record)
        return partial(self._holding, run.report, self._append, record)

    def _holding(
        self, report: dict[str, Any] | None, write: Callable[..., None], *pieces: Any
    ) -> None:
        """Writer: ``write(*pieces)``, after which the file holds ``report`` (not before:
        after a failed write, the next record carries it again)."""
        write(*pieces)
        self._file_report = report

    def end(self) -> None:
        try:
            written = self._stop_writer()
        finally:
            self._close_fd()
            try:
                # What the file holds now is this execution's doing (the lock is held).
                complete = written and not self._dirty and self._tracking
                if self._run is not None:
                    self._wrote(self._run, complete)
            finally:
                self._run = None
                self._release()
