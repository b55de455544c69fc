"""JournalSerializer: real runs, real files, real crashes."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_checkpoint import (
    JC,
    LOOPS,
    OC,
    OtherJC,
    OtherOC,
    Rich,
    StopAfter,
    check_complete,
    kill_9_then_resume,
    loop,
    make_run,
    rich_run,
    serializer,
    states,
)

from jorbmp import CheckpointError, JournalSerializer, Processor, Run, State, Stopped
from jorbmp.checkpoint.journal import FILE_MAGIC, RECORD_HEADER_SIZE, RECORD_MAGIC


def journal(path: Path, **kwargs: Any) -> JournalSerializer:
    return serializer("JournalSerializer", path, **kwargs)  # type: ignore[no-any-return]


def record_offsets(path: Path) -> list[int]:
    """Where each record starts (walking the length fields; the file must be intact)."""
    data = path.read_bytes()
    offsets, offset = [], len(FILE_MAGIC) + 4
    while offset < len(data):
        assert data[offset : offset + 4] == RECORD_MAGIC
        offsets.append(offset)
        (length,) = struct.unpack_from("<I", data, offset + 4)
        offset += RECORD_HEADER_SIZE + length
    assert offset == len(data)
    return offsets


@pytest.mark.timeout(60)
def test_round_trip_of_a_processor_run(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(60)
    Processor(None, states(), journal(path)).exec(run)
    check_complete(run, 60)
    loaded = journal(path).deserialize()
    assert loaded == run
    assert loaded.name == "checkpoint-test"
    assert loaded.overall == OC(workdir="/data")
    assert loaded.job_type is JC
    assert all(type(job.context) is JC for job in loaded.jobs.values())
    assert list(loaded.jobs) == list(run.jobs)  # the order a resume queues them in
    check_complete(loaded, 60)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Executing an all-terminal run again changes nothing.
    Processor(None, states(), journal(path)).exec(loaded)
    assert journal(path).deserialize() == run


@pytest.mark.timeout(60)
def test_untyped_load_gives_plain_values(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(10)
    Processor(None, states(), journal(path)).exec(run)
    loaded = JournalSerializer(path).deserialize()
    assert loaded.overall == {"workdir": "/data", "factor": 2}
    assert loaded.jobs["1"].context["total"] == 2


@pytest.mark.timeout(60)
def test_resume_after_stop(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(200, sleep=0.005)
    listener = StopAfter(10)
    processor: Processor[Any, Any, Any] = Processor(None, states(), journal(path), listener)
    listener.processor = processor
    with pytest.raises(Stopped):
        processor.exec(run)
    loaded = journal(path).deserialize()
    assert loaded == run  # the final checkpoint has every transition
    states_now = loaded.counts()
    assert states_now.get("done", 0) >= 10
    assert sum(n for s, n in states_now.items() if s not in ("done", "failed")) > 0
    Processor(None, states(), journal(path)).exec(loaded)
    check_complete(loaded, 200)
    check_complete(journal(path).deserialize(), 200)


def write_two_batches(path: Path) -> tuple[Run[OC, JC], int]:
    """A checkpoint written through the hooks: a snapshot, then two journal records.
    Returns the run as of the first record, and the file size after it."""
    run = make_run(5)
    ser = journal(path)
    ser.begin(run)
    ser.flush(run, final=True)  # the first snapshot
    run.jobs["1"].state = "finish"
    run.jobs["1"].context.total = 7
    ser.job_changed(run.jobs["1"])
    ser.flush(run, final=True)
    first = journal(path).deserialize()
    size = path.stat().st_size
    run.jobs["2"].state = "done"
    ser.job_changed(run.jobs["2"])
    ser.flush(run, final=True)
    ser.end()
    assert journal(path).deserialize() == run
    assert first.jobs["1"].context.total == 7
    assert first.jobs["2"].state == "new"
    return first, size


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cut", [1, 3, 20])
def test_torn_tail_loads_the_last_complete_state(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "run.journal"
    first, _ = write_two_batches(path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut] + os.urandom(50))  # torn write, then junk
    loaded = journal(path).deserialize()
    assert loaded == first
    # A resume starts from there, and what it appends later is not lost behind the tail.
    ser = journal(path)
    ser.begin(loaded)
    assert FILE_MAGIC not in path.read_bytes()[1:]  # a fresh file, the tail dropped
    loaded.jobs["3"].state = "done"
    ser.job_changed(loaded.jobs["3"])
    ser.flush(loaded, final=True)
    ser.end()
    again = journal(path).deserialize()
    assert again == loaded
    assert again.jobs["3"].state == "done"


@pytest.mark.timeout(30)
def test_torn_header_of_last_record(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    first, size = write_two_batches(path)
    path.write_bytes(path.read_bytes()[: size + 5])  # half a record header
    assert journal(path).deserialize() == first


@pytest.mark.timeout(60)
def test_torn_tail_of_a_processor_run(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(40, sleep=0.005)  # long enough for journal records after the snapshot
    ser = journal(path, interval=0.01)
    Processor(None, states(), ser).exec(run)
    assert ser.journal_bytes > 0
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 4)
        f.seek(0, os.SEEK_END)
        f.write(b"\x00" * 64)  # what a filesystem can leave after a crash
    loaded = journal(path).deserialize()
    assert set(loaded.jobs) <= set(run.jobs)
    Processor(None, states(), journal(path)).exec(loaded)
    check_complete(loaded, 40)


@pytest.mark.timeout(30)
def test_the_first_write_is_one_snapshot_made_late(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(100)
    ser = journal(path, interval=60)
    ser.begin(run)
    run.jobs["1"].state = "done"
    ser.jobs_changed([run.jobs["1"]])
    ser.flush(run)
    assert not path.exists()  # nothing before the first snapshot is due
    run.jobs["2"].state = "done"
    ser.jobs_changed([run.jobs["2"]])
    ser.flush(run, final=True)
    ser.end()
    assert journal(path).deserialize() == run
    assert len(record_offsets(path)) == 2  # begin and one chunk: each job written once


@pytest.mark.timeout(30)
def test_until_the_first_snapshot_the_file_keeps_the_run_as_loaded(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(10)
    journal(path).serialize(run)
    before = path.read_bytes()
    loaded = journal(path).deserialize()
    ser = journal(path, interval=60)
    ser.begin(loaded)
    loaded.jobs["3"].state = "done"
    ser.jobs_changed([loaded.jobs["3"]])
    ser.flush(loaded)
    assert path.read_bytes() == before  # a crash now resumes from the run as loaded
    ser.flush(loaded, final=True)
    ser.end()
    assert journal(path).deserialize().jobs["3"].state == "done"


@pytest.mark.timeout(30)
def test_append_after_a_failed_write_cuts_the_torn_bytes(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(5)
    ser = journal(path)
    ser.begin(run)
    ser.flush(run, final=True)  # the first snapshot
    with path.open("ab") as f:  # what a write that failed halfway leaves behind
        f.write(RECORD_MAGIC + b"\xff\x00\x00\x00partial")
    run.jobs["4"].state = "done"
    ser.job_changed(run.jobs["4"])
    ser.flush(run, final=True)
    ser.end()
    assert journal(path).deserialize() == run
    assert b"partial" not in path.read_bytes()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("which", ["begin", "snapshot", "journal"])
def test_corruption_before_the_tail_is_an_error(tmp_path: Path, which: str) -> None:
    path = tmp_path / "run.journal"
    write_two_batches(path)
    offsets = record_offsets(path)
    assert len(offsets) == 4  # begin, one snapshot chunk, two journal records
    target = {"begin": offsets[0], "snapshot": offsets[1], "journal": offsets[2]}[which]
    data = bytearray(path.read_bytes())
    data[target + RECORD_HEADER_SIZE + 2] ^= 0x40  # one bit, inside the payload
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        journal(path).deserialize()
    message = str(info.value)
    assert str(path) in message
    assert f"byte {target}" in message
    assert "checksum" in message
    # A checkpoint that cannot be read is never overwritten.
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, states(), journal(path)).exec(make_run(3))
    assert path.read_bytes() == bytes(data)


@pytest.mark.timeout(30)
def test_corrupt_length_before_the_tail_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    write_two_batches(path)
    offsets = record_offsets(path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offsets[1] + 4, 10**9)  # runs past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"byte {offsets[1]}"):
        journal(path).deserialize()


@pytest.mark.timeout(120)
def test_compaction_keeps_the_file_bounded(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run: Run[OC, JC] = Run("loops", OC(workdir="/"), JC)
    for i in range(100):
        run.add_job(JC(n=i, sleep=0.0005), state="loop")
    ser = journal(path, interval=0.005, compact_min_bytes=4096)
    sizes: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                sizes.append(path.stat().st_size)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        Processor(
            None,
            [State("loop", loop, concurrency=2), State("done", terminal=True)],
            ser,
        ).exec(run)
    finally:
        stop.set()
        watcher.join()
    assert all(job.context.total == LOOPS and job.state == "done" for job in run.jobs.values())
    assert ser.compactions >= 2, ser
    snapshot = tmp_path / "fresh.journal"
    journal(snapshot).serialize(run)
    # 10,000 transitions, ~800 kB of job records; the file never held more than a
    # snapshot and a journal part no bigger than max(snapshot, compact_min_bytes).
    limit = 2 * snapshot.stat().st_size + 4096
    assert max(sizes) <= limit, (max(sizes), limit)
    assert journal(path).deserialize() == run


@pytest.mark.timeout(30)
def test_cost_per_flush_does_not_grow_with_the_run(tmp_path: Path) -> None:
    grown = []
    for jobs in (10, 20_000):
        path = tmp_path / f"{jobs}.journal"
        run = make_run(jobs)
        ser = journal(path)
        ser.begin(run)
        ser.flush(run, final=True)  # the first snapshot
        before = path.stat().st_size
        run.jobs["3"].state = "done"
        ser.job_changed(run.jobs["3"])
        ser.flush(run, final=True)
        grown.append(path.stat().st_size - before)
        ser.end()
    # One record with the one job that changed (next_id takes a few bytes more).
    assert grown[0] < 200
    assert abs(grown[0] - grown[1]) <= 4


@pytest.mark.timeout(60)
def test_kill_9_then_resume(tmp_path: Path) -> None:
    kill_9_then_resume("JournalSerializer", tmp_path / "run.journal")


@pytest.mark.timeout(30)
def test_wrong_types_are_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    Processor(None, states(), journal(path)).exec(make_run(5))
    data = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        JournalSerializer(path, OC, OtherJC).deserialize()
    message = str(info.value)
    assert str(path) in message
    assert "$.jobs[0].context.n" in message
    assert "job '0'" in message
    with pytest.raises(CheckpointError, match=r"\$\.overall\.workdir"):
        JournalSerializer(path, OtherOC, JC).deserialize()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, states(), JournalSerializer(path, OC, OtherJC)).exec(
            Run("x", None, OtherJC)
        )
    assert path.read_bytes() == data


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\x00" * 100, "not a jorbmp journal"),
        (os.urandom(1000), "not a jorbmp journal"),
        (b'{"format": 1, "name": "x"}', "use JsonSerializer"),
        (b"SQLite format 3\x00" + b"\x00" * 100, "use SqliteSerializer"),
        (FILE_MAGIC + b"\x07\x00\x00\x00", "format 7 is not supported"),
        (FILE_MAGIC + b"\x01\x00\x00\x00", "no run record"),
    ],
)
def test_files_that_are_not_journals(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "run.journal"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as info:
        journal(path).deserialize()
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, states(), journal(path)).exec(make_run(2))
    assert path.read_bytes() == content


@pytest.mark.timeout(30)
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        journal(tmp_path / "nothing.journal").deserialize()


@pytest.mark.timeout(30)
def test_a_running_checkpoint_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    run = make_run(3)
    holder = journal(path)
    holder.begin(run)
    try:
        with pytest.raises(CheckpointError, match="in use"):
            journal(path).begin(run)
        with pytest.raises(RuntimeError):
            holder.serialize(run)
    finally:
        holder.end()
    journal(path).begin(run)  # released


@pytest.mark.timeout(30)
def test_serialize_and_deserialize_without_a_processor(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.journal"
    run = make_run(25_000)  # more than one snapshot chunk
    run.jobs["7"].state_errors = {"new": ["one", "two"]}
    journal(path).serialize(run)
    assert journal(path).deserialize() == run
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert repr(journal(path)) == f"JournalSerializer({str(path)!r})"


@pytest.mark.timeout(30)
def test_contexts_of_every_kind_round_trip_exactly(tmp_path: Path) -> None:
    path = tmp_path / "rich"
    run = rich_run()
    JournalSerializer(path, None, Rich).serialize(run)
    loaded = JournalSerializer(path, None, Rich).deserialize()
    assert loaded == run
    assert list(loaded.jobs) == list(run.jobs)
    assert loaded.jobs["0"].context == Rich()
