"""Checkpoints under contention and crashes: the lock and its probes, temporary files of
interrupted writes, the first write of an execution, journal records of any size, and
``Job.not_before`` in every format. Real files, real processes, real kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers_checkpoint import JC, OC, TESTS, check_complete, make_run, serializer, states

import jorbmp
from jorbmp import (
    CheckpointError,
    JournalSerializer,
    Processor,
    Run,
    SqliteSerializer,
    State,
)
from jorbmp.checkpoint import journal as journal_module
from jorbmp.checkpoint.base import CheckpointLock
from jorbmp.checkpoint.journal import CONTINUED_MAGIC, FILE_MAGIC, RECORD_HEADER_SIZE

KINDS = ["JsonSerializer", "JournalSerializer", "SqliteSerializer"]
SUFFIX = {"JsonSerializer": "json", "JournalSerializer": "journal", "SqliteSerializer": "db"}


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


def python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """``python -c code args...`` with the tests' helpers importable, in its own session
    (so that a kill of its group reaches the workers it forked too)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=child_env(),
        text=True,
        start_new_session=True,
        **kwargs,
    )


@contextlib.contextmanager
def killed_at_exit(child: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield child
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def leftovers(path: Path) -> list[str]:
    """Temporary files beside the checkpoint at ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-"))


# -- 1. serialize() respects the lock --------------------------------------------------

# Executes the checkpoint at argv[2] (format argv[1]) slowly, after saying "started".
SLOW_EXECUTION = """
    import sys
    from pathlib import Path
    import helpers_checkpoint as h
    import jorbmp

    class Started(jorbmp.StatusListener):
        said = False

        def status_update(self, counts):
            if not self.said:
                self.said = True
                print("started", flush=True)

    ser = h.serializer(sys.argv[1], Path(sys.argv[2]), interval=60)
    run = ser.deserialize()
    jorbmp.Processor(None, h.states(), ser, Started()).exec(run)
    print("finished", flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_serialize_refuses_a_checkpoint_that_a_live_processor_holds(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    serializer(kind, path).serialize(make_run(30, sleep=0.05))
    holder = python(SLOW_EXECUTION, kind, str(path), stdout=subprocess.PIPE)
    with killed_at_exit(holder):
        assert holder.stdout is not None and holder.stdout.readline().strip() == "started"
        other = serializer(kind, path)
        snapshot = other.deserialize()  # reading a live checkpoint is fine
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".lock"}
        with pytest.raises(CheckpointError, match=rf"{path}.*in use.*\(pid {holder.pid}\)"):
            other.serialize(snapshot)
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".lock"}
        assert after == before  # nothing written, not even a temporary file
        assert holder.stdout.readline().strip() == "finished"
        assert holder.wait(timeout=30) == 0
    # The live run's transitions are all there: nothing replaced its checkpoint.
    check_complete(serializer(kind, path).deserialize(), 30)


@pytest.mark.timeout(60)
def test_serialize_under_the_serializers_own_lock_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run = make_run(5)
    ser = serializer("JsonSerializer", path)
    ser.begin(run)  # holds the lock while "executing"
    try:
        run.jobs["1"].state = "finish"
        ser.serialize(run)  # what its flushes do
        assert serializer("JsonSerializer", path).deserialize().jobs["1"].state == "finish"
    finally:
        ser.end()
    with ser.locked(), ser.locked():  # re-entrant, as `python -m jorbmp redrive` uses it
        ser.serialize(run)
    assert not CheckpointLock.held(path)
    Processor(None, states(), ser).exec(run)  # and released again
    check_complete(run, 5)


# -- 2. probing the lock never refuses a starting processor ---------------------------

PROBER = """
    import sys
    from pathlib import Path
    from jorbmp.checkpoint.base import CheckpointLock
    path = Path(sys.argv[1])
    print("probing", flush=True)
    while True:
        CheckpointLock.held(path)
"""

STATUS_POLLER = """
    import sys
    from jorbmp.cli import main
    import io, contextlib
    print("polling", flush=True)
    while True:
        with contextlib.redirect_stdout(io.StringIO()):
            main(["status", sys.argv[1]])
"""


@pytest.mark.timeout(120)
def test_probing_the_lock_never_refuses_a_starting_processor(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(3)
    for job in run.jobs.values():
        job.state = "done"
    ser = serializer("SqliteSerializer", path)
    ser.serialize(run)
    probers = [
        python(PROBER, str(path), stdout=subprocess.PIPE),
        python(STATUS_POLLER, str(path), stdout=subprocess.PIPE),
    ]
    with killed_at_exit(probers[0]), killed_at_exit(probers[1]):
        for prober in probers:
            assert prober.stdout is not None and prober.stdout.readline()
        refused = []
        lock = CheckpointLock(path)
        for _ in range(3000):  # what a processor's start does first
            try:
                lock.acquire()
            except CheckpointError as exc:
                refused.append(str(exc))
            else:
                lock.release()
        for _ in range(100):  # whole executions of the (already complete) run
            try:
                Processor(None, states(), ser).exec(run)
            except CheckpointError as exc:
                refused.append(str(exc))
        assert refused == []
        assert not CheckpointLock.held(path)  # probes never look like a processor


# -- 3. temporary files of interrupted writes -----------------------------------------

# serialize() at argv[2] (format argv[1]) that stalls in its fsync, like a write to a
# disk that hangs, after saying "stalled".
STALLED_WRITE = """
    import os, sys, time
    from pathlib import Path
    import helpers_checkpoint as h

    def stall(fd):
        print("stalled", flush=True)
        time.sleep(3600)

    os.fsync = stall
    h.serializer(sys.argv[1], Path(sys.argv[2])).serialize(h.make_run(50))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["JsonSerializer", "JournalSerializer"])
def test_temporary_files_of_interrupted_writes_are_removed_at_the_next_open(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    serializer(kind, path).serialize(make_run(20))
    for attempt in range(2):
        writer = python(STALLED_WRITE, kind, str(path), stdout=subprocess.PIPE)
        with killed_at_exit(writer):
            assert writer.stdout is not None and writer.stdout.readline().strip() == "stalled"
            mine = f".{path.name}.tmp-{writer.pid}"
            assert mine in leftovers(path)
            # A live writer's temporary file is never touched: it holds the lock.
            with pytest.raises(CheckpointError, match=f"pid {writer.pid}"):
                serializer(kind, path).serialize(make_run(1))
            with pytest.raises(CheckpointError, match=f"pid {writer.pid}"):
                Processor(None, states(), serializer(kind, path)).exec(make_run(1))
            assert mine in leftovers(path)
            os.killpg(writer.pid, signal.SIGKILL)  # the write never finishes
        assert leftovers(path) == [mine]
        assert len(serializer(kind, path).deserialize().jobs) == 20  # the old file, intact
        if attempt == 0:
            serializer(kind, path).serialize(make_run(20))  # the next write removes it
        else:
            run = serializer(kind, path).deserialize()
            Processor(None, states(), serializer(kind, path)).exec(run)  # so does a start
            check_complete(run, 20)
        assert leftovers(path) == []


# Executes a new run at argv[1] with SQLite: its first write is built beside the path
# and renamed into place only after a minute.
SQLITE_NEW_RUN = """
    import sys, time
    from pathlib import Path
    import helpers_checkpoint as h
    import jorbmp

    ser = h.serializer("SqliteSerializer", Path(sys.argv[1]), interval=60)
    jorbmp.Processor(None, h.states(), ser).exec(h.make_run(200, sleep=0.05))
"""


@pytest.mark.timeout(60)
def test_sqlite_first_write_leftovers_are_removed_at_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    child = python(SQLITE_NEW_RUN, str(path))
    with killed_at_exit(child):
        deadline = time.monotonic() + 30
        while not leftovers(path):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)  # some jobs go in
        os.killpg(child.pid, signal.SIGKILL)
    assert leftovers(path) and not path.exists()
    (tmp_path / f".{path.name}.tmp-{child.pid}-journal").write_bytes(b"as SQLite leaves one")
    run = make_run(20)
    Processor(None, states(), serializer("SqliteSerializer", path)).exec(run)
    assert leftovers(path) == []
    check_complete(serializer("SqliteSerializer", path).deserialize(), 20)


# -- 4. the first write of an execution: bounded loss ---------------------------------

# Executes the checkpoint at argv[2] (format argv[1]), printing "<monotonic time> <jobs
# done>" at every status update.
PROGRESS = """
    import sys, time
    from pathlib import Path
    import helpers_checkpoint as h
    import jorbmp

    class Progress(jorbmp.StatusListener):
        def status_update(self, counts):
            done = sum(c.completed for c in counts if c.state == "done")
            print(time.monotonic(), done, flush=True)

    ser = h.serializer(sys.argv[1], Path(sys.argv[2]))  # the default interval
    try:
        run = ser.deserialize()
    except FileNotFoundError:
        run = h.make_run(int(sys.argv[3]), sleep=float(sys.argv[4]))
    jorbmp.Processor(None, h.states(), ser, Progress()).exec(run)
"""


def kill_during_the_first_write(
    kind: str, path: Path, jobs: int, after: float
) -> tuple[list[tuple[float, int]], float]:
    """Execute ``path`` (or a new run of ``jobs`` jobs) in a child, kill -9 it ``after``
    seconds into the execution; its progress as (time, jobs done) and the time of the
    kill."""
    child = python(PROGRESS, kind, str(path), str(jobs), str(SLEEP), stdout=subprocess.PIPE)
    progress: list[tuple[float, int]] = []

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            when, done = line.split()
            progress.append((float(when), int(done)))

    reader = threading.Thread(target=read, daemon=True)
    with killed_at_exit(child):
        reader.start()
        deadline = time.monotonic() + 40
        while not progress:
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.01)
        time.sleep(max(0.0, progress[0][0] + after - time.monotonic()))
        assert child.poll() is None, "the run ended before the kill"
        os.killpg(child.pid, signal.SIGKILL)
        killed = time.monotonic()
    reader.join(5)
    return progress, killed


def check_consistent(run: Run[OC, JC], jobs: int) -> None:
    """Every job of the run there, and each kick there exactly when its parent's
    transition that made it is (see `helpers_checkpoint.work`)."""
    assert {str(i) for i in range(jobs)} <= set(run.jobs)
    for job in run.jobs.values():
        if "->" in job.id:
            parent = run.jobs[job.parent or ""]
            assert parent.context.kicked and parent.kicks == 1, (job, parent)
        elif job.context.kicked:
            assert f"{job.id}->0" in run.jobs, job


# Each exec sleeps this long: the runs below last longer than the kill takes to come.
SLEEP = 0.0001


def done_by(progress: list[tuple[float, int]], when: float) -> int:
    return max((done for t, done in progress if t <= when), default=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["JournalSerializer", "SqliteSerializer"])
def test_a_kill_during_the_first_write_of_a_resumed_run_loses_one_interval(
    tmp_path: Path, kind: str
) -> None:
    # Big enough that storing the whole run again takes a while: the first write used
    # to wait 20 us per job (3 s here), and a kill before it lost everything.
    jobs = 150_000
    path = tmp_path / f"run.{SUFFIX[kind]}"
    serializer(kind, path).serialize(make_run(jobs, sleep=SLEEP))
    progress, killed = kill_during_the_first_write(kind, path, jobs, after=2.0)
    reloaded = serializer(kind, path).deserialize()
    check_consistent(reloaded, jobs)
    # Every transition done a second before the kill (five intervals) is in the file.
    earlier = done_by(progress, killed - 1.0)
    assert earlier > 0
    assert reloaded.counts().get("done", 0) >= earlier, (earlier, progress[-3:])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["JournalSerializer", "SqliteSerializer"])
def test_a_new_run_is_in_the_file_about_an_interval_after_it_starts(
    tmp_path: Path, kind: str
) -> None:
    # Nothing of a new run can be durable before the whole run is: its first write
    # starts after an interval (it used to wait 20 us per job: 3 s here).
    jobs = 150_000
    path = tmp_path / f"run.{SUFFIX[kind]}"
    progress, killed = kill_during_the_first_write(kind, path, jobs, after=2.5)
    reloaded = serializer(kind, path).deserialize()
    check_consistent(reloaded, jobs)
    earlier = done_by(progress, killed - 1.5)
    assert earlier > 0
    assert reloaded.counts().get("done", 0) >= earlier, (earlier, progress[-3:])


def states_in_file(path: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("select id, state from jobs"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loader", ["the same serializer", "another serializer"])
def test_sqlite_resume_commits_every_step_and_stores_edits_made_before(
    tmp_path: Path, loader: str
) -> None:
    path = tmp_path / "run.db"
    jobs = 20_000  # the rewrite pass waits 20 us per job (0.4 s) for jobs to change
    serializer("SqliteSerializer", path).serialize(make_run(jobs))
    ser = serializer("SqliteSerializer", path, interval=0.05)
    run = (
        ser if loader == "the same serializer" else serializer("SqliteSerializer", path)
    ).deserialize()
    added = run.add_job(JC(n=-1))  # added before the execution
    run.redrive("new", "parked")  # edited in place: no processor reports it
    ser.begin(run)
    try:
        run.jobs["1"].state = "finish"  # a transition
        ser.jobs_changed([run.jobs["1"]])
        time.sleep(0.06)
        ser.flush(run)  # the first step, one transaction
        deadline = time.monotonic() + 10
        while states_in_file(path).get(added) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        now = states_in_file(path)
        assert now["1"] == "finish" and now[added] == "parked"
        assert now["2"] == "new"  # the rewrite pass stores the in-place edits later,
        with contextlib.closing(sqlite3.connect(path)) as conn:  # not the whole run now
            assert conn.execute("select next_id from run").fetchone() == (jobs + 1,)
        ser.flush(run, final=True)  # the final step: the rest of the pass
    finally:
        ser.end()
    loaded = serializer("SqliteSerializer", path).deserialize()
    assert loaded == run and loaded.counts() == {"parked": jobs, "finish": 1}


# -- 5. journal records of any size -----------------------------------------------------


class Padded(msgspec.Struct):
    n: int
    pad: str = ""
    step: int = 0


def grow(ac: Any, oc: Any, jc: Padded) -> Any:
    time.sleep(0.003)  # a run that lasts many flushes, and compactions
    jc.step += 1
    jc.pad = jc.pad + "y" * 700
    return jc, ("grow" if jc.step < 3 else "done")


def frames(path: Path) -> list[tuple[int, bytes, int]]:
    """(offset, marker, payload length) of each frame of an intact journal."""
    data = path.read_bytes()
    offset, out = len(FILE_MAGIC) + 4, []
    while offset < len(data):
        length = int.from_bytes(data[offset + 4 : offset + 8], "little")
        out.append((offset, data[offset : offset + 4], length))
        offset += RECORD_HEADER_SIZE + length
    assert offset == len(data)
    return out


@pytest.mark.timeout(60)
def test_journal_records_bigger_than_a_frame_are_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_FRAME_BYTES", 1000)  # not 4 GiB
    path = tmp_path / "run.journal"
    run: Run[None, Padded] = Run("big", None, Padded)
    for i in range(40):
        run.add_job(Padded(n=i, pad="x" * (i * 100)))
    ser = JournalSerializer(path, None, Padded, interval=0.01, compact_min_bytes=20_000)
    pipeline = [
        State("new", grow, kind="thread"),
        State("grow", grow, kind="thread"),
        State("done", terminal=True),
    ]
    Processor(None, pipeline, ser).exec(run)
    assert run.counts() == {"done": 40}
    assert ser.compactions > 0
    assert any(marker == CONTINUED_MAGIC for _, marker, _ in frames(path))
    assert all(length <= 1000 for _, _, length in frames(path))
    assert JournalSerializer(path, None, Padded).deserialize() == run
    # Another process, with frames of the usual size, reads it too.
    loader = python(
        """
        import sys, msgspec
        from jorbmp import JournalSerializer
        run = JournalSerializer(sys.argv[1]).deserialize()
        print(sorted({len(job.context["pad"]) for job in run.jobs.values()})[-1], run.counts())
        """,
        str(path),
        stdout=subprocess.PIPE,
    )
    out, _ = loader.communicate(timeout=30)
    assert out.split(maxsplit=1) == [str(39 * 100 + 3 * 700), "{'done': 40}\n"]


@pytest.mark.timeout(60)
def test_a_torn_record_of_several_frames_is_ignored_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_FRAME_BYTES", 1000)
    path = tmp_path / "run.journal"
    run: Run[None, Padded] = Run("big", None, Padded)
    for i in range(5):
        run.add_job(Padded(n=i, pad="x" * 3000))  # a snapshot chunk of many frames
    ser = JournalSerializer(path, None, Padded)
    ser.begin(run)
    ser.flush(run, final=True)  # the snapshot
    before = JournalSerializer(path, None, Padded).deserialize()
    snapshot_end = path.stat().st_size
    for job_id in ("1", "3"):  # one batch of two transitions: one record, 8 frames
        run.jobs[job_id].context.step = 1
        run.jobs[job_id].context.pad = "z" * 3000
    ser.jobs_changed([run.jobs["1"], run.jobs["3"]])
    ser.flush(run, final=True)
    ser.end()
    whole = path.read_bytes()
    record = [f for f in frames(path) if f[0] >= snapshot_end]
    assert len(record) > 2 and record[-1][1] != CONTINUED_MAGIC
    assert JournalSerializer(path, None, Padded).deserialize() == run
    cuts = [offset + n for offset, _, _ in record for n in (0, 5, RECORD_HEADER_SIZE + 7)]
    cuts.append(len(whole) - 1)
    for cut in cuts:
        path.write_bytes(whole[:cut])
        assert JournalSerializer(path, None, Padded).deserialize() == before, cut
    # A damaged frame with intact ones after it is damage, not a torn write.
    damaged = bytearray(whole)
    damaged[record[1][0] + RECORD_HEADER_SIZE + 3] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=f"{path}: corrupt record at byte {record[1][0]}"):
        JournalSerializer(path, None, Padded).deserialize()


# -- 6. Job.not_before in every format ------------------------------------------------


def run_with_not_before() -> Run[OC, JC]:
    run = make_run(6)
    run.jobs["1"].not_before = time.time() + 12.345678901  # a short row but for this
    run.jobs["2"].not_before = 1.0000000000000002  # every bit of the float counts
    run.jobs["3"].parent = "0"  # a full row without not_before
    run.jobs["4"].parent = "0"
    run.jobs["4"].not_before = 1e300
    return run


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", KINDS)
def test_not_before_round_trips(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    run = run_with_not_before()
    serializer(kind, path).serialize(run)
    loaded = serializer(kind, path).deserialize()
    assert loaded == run
    assert [job.not_before for job in loaded.jobs.values()] == [
        job.not_before for job in run.jobs.values()
    ]
    # Written by a processor's incremental writes too.
    ser = serializer(kind, path, interval=0.01)
    loaded.jobs["5"].not_before = 2.5
    loaded.jobs["1"].not_before = None
    ser.begin(loaded)
    ser.jobs_changed([loaded.jobs["5"], loaded.jobs["1"]])
    ser.flush(loaded, final=True)
    ser.end()
    again = serializer(kind, path).deserialize()
    assert again.jobs["5"].not_before == 2.5 and again.jobs["1"].not_before is None
    assert again == loaded


@pytest.mark.timeout(30)
def test_sqlite_not_before_is_a_nullable_real_column(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = run_with_not_before()
    serializer("SqliteSerializer", path).serialize(run)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = dict(conn.execute("select id, typeof(not_before) from jobs"))
        (value,) = conn.execute("select not_before from jobs where id = '2'").fetchone()
    assert rows == {"0": "null", "1": "real", "2": "real", "3": "null", "4": "real", "5": "null"}
    assert value == 1.0000000000000002


# The schema of databases written before not_before existed.
OLD_SCHEMA = """
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    format INTEGER NOT NULL,
    name TEXT NOT NULL,
    overall TEXT NOT NULL,
    next_id INTEGER NOT NULL,
    report TEXT
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    context TEXT NOT NULL,
    state_errors TEXT NOT NULL,
    parent TEXT,
    retries INTEGER NOT NULL,
    kicks INTEGER NOT NULL,
    last_update TEXT NOT NULL
);
PRAGMA application_id = 1785688674;  -- 0x6A6F7262, "jorb"
PRAGMA journal_mode = WAL;
INSERT INTO run VALUES (0, 1, 'old', '{"workdir":"/old","factor":2}', 3, NULL);
INSERT INTO jobs VALUES
    ('0', 'done', '{"n":0,"kicked":false,"total":0,"sleep":0.0}', '{}', NULL, 0, 0,
     '2024-01-01T00:00:00Z'),
    ('1', 'new', '{"n":1,"kicked":false,"total":0,"sleep":0.0}',
     '{"new":["ValueError: x"]}', NULL, 1, 0, '2024-01-01T00:00:01Z'),
    ('2', 'new', '{"n":2,"kicked":false,"total":0,"sleep":0.0}', '{}', '0', 0, 0,
     '2024-01-01T00:00:02Z');
"""


def old_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(OLD_SCHEMA)


def columns(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[1] for row in conn.execute("pragma table_info(jobs)")]


@pytest.mark.timeout(60)
def test_sqlite_database_of_the_old_schema_is_read_then_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_database(path)
    run = serializer("SqliteSerializer", path).deserialize()  # read as it is
    assert "not_before" not in columns(path)
    assert run.name == "old" and list(run.jobs) == ["0", "1", "2"]
    assert all(job.not_before is None for job in run.jobs.values())
    assert run.jobs["1"].state_errors == {"new": ["ValueError: x"]}
    assert run.jobs["2"].parent == "0"
    untyped = SqliteSerializer(path).deserialize()  # as `python -m jorbmp status` does
    assert untyped.jobs["0"].context["n"] == 0
    # Opened for writing by an execution: the column is added, the rows stay.
    ser = serializer("SqliteSerializer", path, interval=0.01)
    ser.begin(run)
    run.jobs["2"].not_before = 1234.5
    ser.jobs_changed([run.jobs["2"]])
    ser.flush(run, final=True)
    ser.end()
    assert {"not_before", "traceback"} <= set(columns(path))  # both added since
    loaded = serializer("SqliteSerializer", path).deserialize()
    assert loaded == run and loaded.jobs["2"].not_before == 1234.5
    # And a whole execution of it completes.
    Processor(None, states(), serializer("SqliteSerializer", path)).exec(loaded)
    assert set(loaded.counts()) <= {"done", jorbmp.FAILED}


@pytest.mark.timeout(60)
def test_sqlite_old_schema_migrated_by_serialize(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old_database(path)
    run = serializer("SqliteSerializer", path).deserialize()
    run.jobs["0"].not_before = 99.25
    serializer("SqliteSerializer", path).serialize(run)  # an existing database, in place
    assert {"not_before", "traceback"} <= set(columns(path))  # both added since
    assert serializer("SqliteSerializer", path).deserialize() == run
