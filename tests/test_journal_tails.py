"""JournalSerializer: the end of a snapshot, torn appends, damage, and `overview` (issue
14, items 4 and 11). Real files, cut and damaged the way copies, disks and crashes do."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers_checkpoint import JC, OC, make_run, serializer, states

from jorbmp import CheckpointError, Job, JournalSerializer, Processor, Run

# The format, spelled out here (see the module docstring of jorbmp.checkpoint.journal),
# so that these tests can write a file as an older jorbmp did.
HEADER = b"\x89jorbmp journal\n" + struct.pack("<I", 1)
MARKER = b"\xa5JR\x5a"
HEADER_SIZE = 12  # marker, length, crc
JOBS = 25_000  # three snapshot chunks of at most 10,000 jobs


def journal(path: Path, **kwargs: Any) -> JournalSerializer:
    return serializer("JournalSerializer", path, **kwargs)  # type: ignore[no-any-return]


def frame(payload: bytes) -> bytes:
    head = MARKER + struct.pack("<I", len(payload))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def record_offsets(data: bytes) -> list[int]:
    """Where each record of an intact file starts (single-frame records)."""
    offsets, offset = [], len(HEADER)
    while offset < len(data):
        assert data[offset : offset + 4] == MARKER
        offsets.append(offset)
        (length,) = struct.unpack_from("<I", data, offset + 4)
        offset += HEADER_SIZE + length
    assert offset == len(data)
    return offsets


def payload_at(data: bytes, offset: int) -> Any:
    (length,) = struct.unpack_from("<I", data, offset + 4)
    return msgspec.msgpack.decode(data[offset + HEADER_SIZE : offset + HEADER_SIZE + length])


def snapshot_then_appends(path: Path, appends: int) -> Run[OC, JC]:
    """A snapshot of `JOBS` jobs written by an execution's first flush, then one journal
    record per append, each changing job ``str(k)``. Returns the run as written."""
    run = make_run(JOBS)
    ser = journal(path)
    ser.begin(run)
    ser.flush(run, final=True)  # the snapshot
    for k in range(appends):
        job = run.jobs[str(k)]
        job.state, job.context.total = "finish", k + 1
        ser.job_changed(job)
        ser.flush(run, final=True)
    ser.end()
    return run


def assert_refused(path: Path, *parts: str) -> str:
    """Loading the file at ``path`` fails naming the path and ``parts``; `overview` fails
    the same way; and a processor leaves the file as it is."""
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        journal(path).deserialize()
    message = str(info.value)
    assert str(path) in message
    for part in parts:
        assert part in message
    with pytest.raises(CheckpointError) as again:
        JournalSerializer(path).overview()
    assert str(again.value) == message
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, states(), journal(path)).exec(make_run(3))
    assert path.read_bytes() == before
    return message


CUTS = [
    "in the run record",
    "after the run record",
    "in a chunk",
    "at a chunk boundary",
    "last byte",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", CUTS)
def test_a_snapshot_cut_short_is_an_error(tmp_path: Path, where: str) -> None:
    path = tmp_path / "run.journal"
    journal(path).serialize(make_run(JOBS))
    data = path.read_bytes()
    begin, first, second, third = record_offsets(data)
    cut, record = {
        "in the run record": (begin + 5, begin),
        "after the run record": (first, None),
        "in a chunk": ((first + second) // 2, first),
        "at a chunk boundary": (second, None),
        "last byte": (len(data) - 1, third),  # cut: one byte short
    }[where]
    path.write_bytes(data[:cut])
    # Where the file ends between two records, the message says so; else which record.
    parts = [f"the file ends at byte {cut}" if record is None else f"record at byte {record}"]
    parts.append("incomplete")
    if where == "at a chunk boundary":
        snapshot = len(data) - first
        parts.append(f"{second - first} of its {snapshot} bytes of jobs, 1 of its 3 job records")
    assert_refused(path, *parts)


@pytest.mark.timeout(60)
def test_a_flipped_bit_in_the_last_snapshot_chunk_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    journal(path).serialize(make_run(JOBS))  # a snapshot and nothing after it
    data = bytearray(path.read_bytes())
    last = record_offsets(bytes(data))[-1]
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert_refused(path, f"record at byte {last} (checksum mismatch)", "incomplete")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut", ["nothing after the snapshot", "header", "payload", "last byte"])
def test_a_torn_append_after_a_complete_snapshot_loads(
    tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.journal"
    snapshot_then_appends(path, 2)
    data = path.read_bytes()
    offsets = record_offsets(data)
    assert len(offsets) == 6  # the run, three chunks, two appends
    # The run record says where its snapshot ends: so a loader can tell a cut snapshot
    # from a torn append.
    begin = payload_at(data, offsets[0])
    assert (begin["chunks"], begin["chunk_bytes"]) == (3, offsets[4] - offsets[1])
    torn = offsets[5]
    end = {
        "nothing after the snapshot": offsets[4],
        "header": torn + 5,
        "payload": (torn + len(data)) // 2,
        "last byte": len(data) - 1,
    }[cut]
    path.write_bytes(data[:end])
    with caplog.at_level(logging.WARNING, logger="jorbmp"):
        loaded = journal(path).deserialize()
        overview = JournalSerializer(path).overview()
    assert len(loaded.jobs) == JOBS  # every job of the snapshot
    assert list(loaded.jobs) == [str(i) for i in range(JOBS)]
    appended = cut != "nothing after the snapshot"
    assert loaded.jobs["0"].context.total == (1 if appended else 0)
    assert loaded.jobs["1"].context.total == 0  # the torn append is dropped
    assert overview.jobs == JOBS
    assert overview.states == ({"new": JOBS - 1, "finish": 1} if appended else {"new": JOBS})
    if appended:
        assert f"ignoring {end - torn} bytes at byte {torn}" in caplog.text
        assert "torn by a crash" in caplog.text
    else:
        assert "torn" not in caplog.text


def blob_run(path: Path) -> tuple[Run[Any, Any], bytes, int]:
    """An untyped run written as a snapshot, then a journal record whose job holds the
    bytes of a complete frame (one of the snapshot's). Returns the run as of the
    snapshot, the file, and where the embedded frame ends in it."""
    run: Run[Any, Any] = Run("blobs", None)
    for i in range(20):
        run.add_job({"n": i})
    ser = JournalSerializer(path)
    ser.begin(run)
    ser.flush(run, final=True)
    snapshot = path.read_bytes()
    chunk = snapshot[record_offsets(snapshot)[1] :]  # a framed record, crc and all
    run.jobs["3"].context = {"n": 3, "journal": chunk}
    ser.job_changed(run.jobs["3"])
    ser.flush(run, final=True)
    ser.end()
    data = path.read_bytes()
    embedded = data.find(chunk, len(snapshot))
    assert embedded > len(snapshot)
    run.jobs["3"].context = {"n": 3}
    return run, data, embedded + len(chunk)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cut", ["right after the embedded frame", "midway", "last byte"])
def test_a_torn_append_holding_a_framed_record_loads(
    tmp_path: Path, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.journal"
    as_snapshot, data, embedded_end = blob_run(path)
    end = {
        "right after the embedded frame": embedded_end,
        "midway": (embedded_end + len(data)) // 2,
        "last byte": len(data) - 1,
    }[cut]
    assert end < len(data)
    path.write_bytes(data[:end])
    with caplog.at_level(logging.WARNING, logger="jorbmp"):
        loaded = JournalSerializer(path).deserialize()
    assert loaded == as_snapshot  # the torn record, embedded frame and all, is dropped
    assert "torn by a crash" in caplog.text
    assert JournalSerializer(path).overview().jobs == 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "where, damage",
    [("snapshot", "crc"), ("journal", "crc"), ("journal", "marker")],
)
def test_damage_followed_by_intact_records_is_an_error(
    tmp_path: Path, where: str, damage: str
) -> None:
    path = tmp_path / "run.journal"
    snapshot_then_appends(path, 2)
    data = bytearray(path.read_bytes())
    offsets = record_offsets(bytes(data))
    target = offsets[2] if where == "snapshot" else offsets[4]
    if damage == "crc":
        data[target + HEADER_SIZE + 2] ^= 0x40  # one bit, inside the payload
    else:
        data[target : target + 4] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    problem = "checksum mismatch" if damage == "crc" else "no record marker"
    if where == "snapshot":
        # Its extent says the snapshot goes on: the message says how much is intact.
        parts = ["incomplete", f"{offsets[2] - offsets[1]} of its", "1 of its 3 job records"]
    else:
        parts = [f"intact records follow at byte {offsets[5]}", "damage"]
    assert_refused(path, f"record at byte {target} ({problem})", *parts)


@pytest.mark.timeout(30)
def test_an_old_file_without_the_extent_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file as jorbmp wrote it before the snapshot's extent was recorded: its run
    record has no ``chunks``; it ends with a torn append whose payload holds a whole
    framed record."""
    path = tmp_path / "run.journal"
    jobs = [Job(id=str(i), context={"n": i}) for i in range(30)]

    def jobs_record(batch: list[Job[Any]]) -> bytes:
        return frame(msgspec.msgpack.encode({"type": "jobs", "next_id": 30, "jobs": batch}))

    begin = {"type": "begin", "name": "old", "next_id": 30, "overall": {"workdir": "/old"}}
    snapshot = HEADER + frame(msgspec.msgpack.encode(begin))
    snapshot += jobs_record(jobs[:20]) + jobs_record(jobs[20:])
    changed = Job(id="4", context={"n": 4, "total": 8}, state="done")
    appended = snapshot + jobs_record([changed])
    embedded = jobs_record(jobs[:2])
    blob = Job(id="5", context={"n": 5, "journal": embedded}, state="done")
    torn = jobs_record([blob])
    cut = len(torn) - 3
    assert torn.index(embedded) + len(embedded) < cut  # the torn record holds a whole frame
    path.write_bytes(appended + torn[:cut])
    with caplog.at_level(logging.WARNING, logger="jorbmp"):
        loaded = JournalSerializer(path).deserialize()
        overview = JournalSerializer(path).overview()
    assert "torn by a crash" in caplog.text
    assert (loaded.name, loaded.overall, loaded.next_id) == ("old", {"workdir": "/old"}, 30)
    assert list(loaded.jobs) == [str(i) for i in range(30)]
    assert loaded.jobs["4"] == changed
    assert loaded.jobs["5"] == jobs[5]
    assert (overview.jobs, overview.states) == (30, {"new": 29, "done": 1})
    # Its first record cut short is an error, as in any file.
    path.write_bytes(snapshot[: len(HEADER) + 9])
    assert_refused(path, f"record at byte {len(HEADER)}", "first record", "incomplete")


def record_changes(path: Path) -> None:
    """Journal records, through the hooks, after a processor ran at ``path``: a job's
    errors cleared, a job given errors in one record and a new state in the next, and
    a new job appearing only in the journal."""
    run = journal(path).deserialize()
    ser = journal(path)
    ser.begin(run)
    ser.flush(run, final=True)  # an execution's first write is a snapshot
    with_errors = [j for j in run.jobs.values() if j.recorded_errors()]
    cleared, moved = with_errors[0], with_errors[1]
    cleared.state_errors = {}
    cleared.state = "new"
    fresh = run.jobs["2"]
    fresh.state_errors = {"finish": ["late error"]}
    fresh.state = "failed"
    ser.jobs_changed([cleared, fresh])
    ser.flush(run, final=True)
    fresh.state = "finish"
    moved.state_errors["new"].append("another")
    added = Job(id="extra", context=JC(n=-1), state="failed")
    added.state_errors = {"new": ["x"]}
    run.jobs[added.id] = added
    ser.jobs_changed([fresh, moved, added])
    ser.flush(run, final=True)
    ser.end()
    assert journal(path).deserialize() == run
    assert ser.journal_bytes > 0 and ser.compactions == 0


@pytest.mark.timeout(60)
def test_overview_agrees_with_deserialize(tmp_path: Path) -> None:
    from jorbmp.checkpoint.overview import overview_of

    path = tmp_path / "run.journal"
    run = make_run(300, sleep=0.01)  # kicks (n % 5), failures (n % 7), soft errors (n % 3)
    ser = journal(path, interval=0.01)
    Processor(None, states(concurrency=4), ser).exec(run)
    # Many records appended after the first snapshot, the jobs changing in each.
    assert len(record_offsets(path.read_bytes())) > 5
    assert journal(path).overview() == overview_of(journal(path).deserialize())
    record_changes(path)
    loaded = journal(path).deserialize()
    assert "extra" in loaded.jobs and "0->0" in loaded.jobs
    expected = overview_of(loaded)
    assert expected.errors and len(expected.states) >= 3
    assert any(len(group.examples) == 5 for group in expected.errors)
    assert journal(path).overview() == expected
    assert JournalSerializer(path).overview() == overview_of(JournalSerializer(path).deserialize())


@pytest.mark.timeout(30)
def test_overview_of_a_snapshot_holding_a_job_twice(tmp_path: Path) -> None:
    """No jorbmp writes such a snapshot, but a load takes the later copy: so does
    `overview`."""
    from jorbmp.checkpoint.overview import overview_of

    path = tmp_path / "run.journal"
    first = [Job(id=str(i), context={"n": i}) for i in range(4)]
    again = Job(id="1", context={"n": 1}, state="failed")
    again.state_errors = {"new": ["boom"]}
    second = [Job(id="4", context={}), again, Job(id="2", context={}, state="done")]
    chunks = b"".join(
        frame(msgspec.msgpack.encode({"type": "jobs", "next_id": 5, "jobs": batch}))
        for batch in (first, second)
    )
    begin = {"type": "begin", "name": "twice", "next_id": 5, "overall": None}
    begin |= {"chunks": 2, "chunk_bytes": len(chunks)}
    later = frame(msgspec.msgpack.encode({"type": "jobs", "next_id": 5, "jobs": [first[3]]}))
    path.write_bytes(HEADER + frame(msgspec.msgpack.encode(begin)) + chunks + later)
    loaded = JournalSerializer(path).deserialize()
    assert list(loaded.jobs) == ["0", "1", "2", "3", "4"]
    overview = JournalSerializer(path).overview()
    assert overview == overview_of(loaded)
    assert overview.states == {"new": 3, "done": 1, "failed": 1}
    assert [(g.fingerprint, g.examples) for g in overview.errors] == [("boom", ["1"])]


@pytest.mark.timeout(30)
def test_overview_of_a_missing_or_empty_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.journal"
    with pytest.raises(FileNotFoundError):
        journal(path).overview()
    path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="jorbmp"), pytest.raises(FileNotFoundError):
        journal(path).overview()
    assert "empty and no jorbmp wrote it" in caplog.text
    path.write_bytes(HEADER)  # a header and no run
    assert_refused(path, "holds no run record")


@pytest.mark.timeout(60)
def test_a_flipped_bit_in_a_journal_records_length_is_damage(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    snapshot_then_appends(path, 5)
    data = bytearray(path.read_bytes())
    first = record_offsets(bytes(data))[-5]  # the first journal record
    data[first + 4 + 3] ^= 0x01  # bit 24 of its length: it runs past the end of the file
    path.write_bytes(bytes(data))
    assert_refused(path, f"corrupt record at byte {first}", "intact records follow")


class Blob(msgspec.Struct):
    blob: bytes = b""


@pytest.mark.timeout(60)
def test_a_last_record_with_lost_blocks_and_a_frame_inside_is_torn(tmp_path: Path) -> None:
    """A power cut after the file grew but before a block of its last record reached the
    disk (it reads as zeros); the record's payload holds a framed record of its own."""
    path = tmp_path / "run.journal"
    run: Run[Any, Blob] = Run("r", None, Blob)
    for _ in range(3):
        run.add_job(Blob())
    ser = JournalSerializer(path, job_type=Blob, interval=0.0)
    ser.begin(run)
    ser.flush(run, final=True)
    run.jobs["0"].state = "done"
    ser.job_changed(run.jobs["0"])
    ser.flush(run, final=True)
    before_last = path.stat().st_size
    embedded = frame(msgspec.msgpack.encode({"type": "jobs", "next_id": 3, "jobs": []}))
    run.jobs["1"].context = Blob(b"x" * 5000 + embedded + b"x" * 100)
    run.jobs["1"].state = "done"
    ser.job_changed(run.jobs["1"])
    ser.flush(run, final=True)
    ser.end()
    data = bytearray(path.read_bytes())
    data[before_last + 100 : before_last + 2148] = bytes(2048)
    path.write_bytes(bytes(data))
    loaded = JournalSerializer(path, job_type=Blob).deserialize()
    assert loaded.counts() == {"done": 1, "new": 2}  # the last record dropped, as torn
