"""A full disk: checkpoint writes that fail for lack of space pause the run, which goes
on when space comes back, or stops with `CheckpointError` after `checkpoint_patience`;
the file is always a valid earlier checkpoint. Also: a read-only checkpoint directory
is refused before anything executes.

Each test mounts a small tmpfs of its own (root and mount(8) needed: CI runs as root;
where mounting is refused the test fails, saying so). The execs record what they do
in a file outside the tmpfs, so that a transition lost (a job run again) shows.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import jorbmp
from jorbmp import CheckpointError, Processor, Run, State, StatusCount, StatusListener

FORMATS = ["json", "journal", "sqlite"]
JOBS = 120
# Big enough for the run's checkpoint in each format (and an SQLite -wal file), small
# enough to fill in an instant.
TMPFS_KIB = 2048


class OC(msgspec.Struct):
    log: str  # where execs note what they did: outside the tmpfs
    fill: str = ""  # a file on the tmpfs that job FILL_JOB fills the disk with
    armed: str = ""  # while this file exists, that job fills the disk (once)
    checkpoint: str = ""  # ...as soon as the run's first checkpoint is there


class JC(msgspec.Struct):
    n: int
    pad: str = "x" * 200


FILL_JOB = 10


def fill_disk(path: Path, leave: int = 0) -> None:
    """Write ``path`` until the file system has no space left, then give back ``leave``
    bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


def note(oc: OC, what: str) -> None:
    with open(oc.log, "a") as f:
        f.write(what + "\n")


def first_step(ac: Any, oc: OC, jc: JC) -> tuple[JC, str]:
    note(oc, f"new {jc.n}")
    if jc.n == FILL_JOB and oc.armed:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(oc.armed)  # once: a run again of this job fills nothing
            deadline = time.monotonic() + 30
            while not os.path.exists(oc.checkpoint) and time.monotonic() < deadline:
                time.sleep(0.01)
            fill_disk(Path(oc.fill))
    time.sleep(0.005)
    return jc, "middle"


def second_step(ac: Any, oc: OC, jc: JC) -> tuple[JC, str]:
    note(oc, f"middle {jc.n}")
    time.sleep(0.005)
    return jc, "done"


STATES = [
    State("new", first_step, concurrency=2),
    State("middle", second_step, concurrency=2),
    State("done", terminal=True),
]


def serializer(fmt: str, path: Path, interval: float = 0.05) -> jorbmp.Serializer:
    kinds: dict[str, Any] = {
        "json": jorbmp.JsonSerializer,
        "journal": jorbmp.JournalSerializer,
        "sqlite": jorbmp.SqliteSerializer,
    }
    # A short interval: retries (every interval) and tests stay quick.
    result: jorbmp.Serializer = kinds[fmt](path, OC, JC, interval=interval)
    return result


def checkpoint_name(fmt: str) -> str:
    return {"json": "run.json", "journal": "run.journal", "sqlite": "run.db"}[fmt]


@contextlib.contextmanager
def tmpfs(directory: Path, kib: int = TMPFS_KIB) -> Iterator[Path]:
    """A tmpfs of ``kib`` KiB mounted at ``directory`` (made here), unmounted after."""
    directory.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=0700", "tmpfs", str(directory)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail("these tests mount a tmpfs, and this machine has no mount(8)")
    if done.returncode != 0:
        pytest.fail(
            f"these tests mount a tmpfs (as root, as CI runs them): {' '.join(command)} "
            f"was refused: {done.stderr.strip() or done.returncode}"
        )
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True, timeout=30)
        if os.path.ismount(directory):
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


class Watch(StatusListener):
    """Keeps what the status said about a pause, and calls ``on_pause`` once."""

    def __init__(self, on_pause: Any = None) -> None:
        self.paused: list[str] = []
        self.last: list[StatusCount] = []
        self.on_pause = on_pause

    def status_update(self, counts: list[StatusCount]) -> None:
        self.last = counts
        why = next((c.paused for c in counts if c.paused), "")
        if why:
            if not self.paused and self.on_pause is not None:
                self.on_pause()
            self.paused.append(why)


def new_run(
    log: Path, fill: Path | None = None, armed: Path | None = None, checkpoint: Path | None = None
) -> Run[OC, JC]:
    oc = OC(str(log), str(fill or ""), str(armed or ""), str(checkpoint or ""))
    if armed is not None:
        armed.touch()
    run: Run[OC, JC] = Run("disk", oc, JC)
    for n in range(JOBS):
        run.add_job(JC(n))
    return run


def runs(log: Path) -> Counter[str]:
    """How many times each exec ran (``"new 3"``: job 3's first step)."""
    return Counter(log.read_text().split("\n")[:-1]) if log.exists() else Counter()


def free_later(filler: Path, delay: float) -> None:
    """Delete ``filler`` ``delay`` seconds from now, from a thread."""
    threading.Timer(delay, filler.unlink).start()


def all_done(run: Run[OC, JC]) -> None:
    states = Counter(job.state for job in run.jobs.values())
    assert states == {"done": JOBS}, states


def copy_checkpoint(path: Path, to: Path) -> Path:
    """Copy the checkpoint at ``path`` (and SQLite's -wal beside it) into ``to``."""
    to.mkdir(exist_ok=True)
    for name in os.listdir(path.parent):
        if name.startswith(path.name) and not name.endswith((".lock", "-shm")):
            shutil.copy(path.parent / name, to / name)
    return to / path.name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_space_comes_back(fmt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A job fills the disk mid-run; a second after the status shows the pause, the
    filler goes: the run completes by itself, every exec ran exactly once."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / checkpoint_name(fmt), disk / "filler"
        watch = Watch(lambda: free_later(filler, 1.0))
        run = new_run(log, filler, tmp_path / "armed", path)
        with caplog.at_level(logging.INFO, logger="jorbmp"):
            Processor(None, STATES, serializer(fmt, path), watch).exec(run)
        all_done(run)
        assert not filler.exists()
        assert watch.paused, "the status never showed the pause"
        why = watch.paused[0]
        assert str(path) in why and ("No space left" in why or "disk is full" in why), why
        assert all(c.paused == "" for c in watch.last), watch.last
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any(str(path) in r.getMessage() and "paused" in r.getMessage() for r in warnings)
        assert any("resumed" in r.getMessage() for r in caplog.records)
        # Not a WARNING per retry (every 0.05 s for a second).
        assert len(warnings) <= 6, [r.getMessage() for r in warnings]
        all_done(serializer(fmt, path).deserialize())
        assert not [p.name for p in disk.iterdir() if ".tmp-" in p.name]
    assert runs(log) == {f"{s} {n}": 1 for s in ("new", "middle") for n in range(JOBS)}


@pytest.mark.timeout(120)
def test_stop_while_paused(tmp_path: Path) -> None:
    """`Processor.stop()` while the disk is full: nothing waits for the patience (60 s):
    the final write is tried once and `exec` raises `CheckpointError`; the file holds
    an earlier checkpoint, from which the run completes."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / "run.journal", disk / "filler"
        run = new_run(log, filler, tmp_path / "armed", path)
        procs: list[Processor[None]] = []
        watch = Watch(lambda: threading.Timer(0.3, procs[0].stop).start())
        proc: Processor[None] = Processor(None, STATES, serializer("journal", path), watch)
        procs.append(proc)
        started = time.monotonic()
        with pytest.raises(CheckpointError, match="final checkpoint") as caught:
            proc.exec(run)
        assert time.monotonic() - started < 30
        assert str(path) in str(caught.value)
        assert watch.paused
        copy = serializer("journal", copy_checkpoint(path, tmp_path / "big"))
    loaded = copy.deserialize()
    Processor(None, STATES, copy).exec(loaded)
    all_done(loaded)
    assert set(runs(log)) == {f"{s} {n}" for s in ("new", "middle") for n in range(JOBS)}
    assert max(runs(log).values()) <= 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("fmt", "patience"), [("json", 0.0), ("journal", 1.0), ("sqlite", 1.0)])
def test_space_never_comes_back(fmt: str, patience: float, tmp_path: Path) -> None:
    """The disk stays full: after ``checkpoint_patience`` the run stops with a
    `CheckpointError` naming the file; a copy of the file on a bigger disk loads and
    completes the run, re-running only jobs whose transitions were not on disk."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / checkpoint_name(fmt), disk / "filler"
        run = new_run(log, filler, tmp_path / "armed", path)
        proc = Processor(None, STATES, serializer(fmt, path), checkpoint_patience=patience)
        started = time.monotonic()
        with pytest.raises(CheckpointError) as caught:
            proc.exec(run)
        assert time.monotonic() - started < 60
        assert type(caught.value).__name__ == "CheckpointSpaceError"
        message = str(caught.value)
        assert str(path) in message and "checkpoint_patience" in message, message
        assert "No space left on device" in message or "disk is full" in message, message
        assert filler.exists()
        assert not [p.name for p in disk.iterdir() if ".tmp-" in p.name]
        copy = serializer(fmt, copy_checkpoint(path, tmp_path / "big"))
    before = runs(log)
    assert before[f"new {FILL_JOB}"] == 1
    loaded = copy.deserialize()
    assert len(loaded.jobs) == JOBS
    stored = {job.id: job.state for job in loaded.jobs.values()}
    assert Counter(stored.values())["done"] < JOBS  # it stopped before the end
    Processor(None, STATES, copy).exec(loaded)
    all_done(loaded)
    all_done(copy.deserialize())
    after = runs(log)
    order = ["new", "middle", "done"]
    for n in range(JOBS):
        reached = order.index(stored[str(n)])
        for i, state in enumerate(order[:2]):
            key = f"{state} {n}"
            assert before[key] <= 1, key
            # A state the file holds the job past is never run again; any other runs
            # once more (at least once: its transition was not on disk).
            assert after[key] == before[key] + (0 if reached > i else 1), (key, stored[str(n)])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_first_write_does_not_fit(fmt: str, tmp_path: Path) -> None:
    """The disk is full before the run starts: the run's first checkpoint write does
    not fit, nothing new is dispatched from then on, and the run completes once space
    comes back."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / checkpoint_name(fmt), disk / "filler"
        fill_disk(filler)
        seen: list[int] = []

        def on_pause() -> None:
            seen.append(sum(runs(log).values()))
            free_later(filler, 1.0)

        watch = Watch(on_pause)
        run = new_run(log)
        Processor(None, STATES, serializer(fmt, path), watch).exec(run)
        all_done(run)
        all_done(serializer(fmt, path).deserialize())
        assert watch.paused
    done = runs(log)
    assert done == {f"{s} {n}": 1 for s in ("new", "middle") for n in range(JOBS)}
    if fmt == "json":
        # Its first write is at the start: nothing ran before it.
        assert seen == [0], seen


@pytest.mark.timeout(60)
def test_journal_compaction_that_does_not_fit_appends_instead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Room for an append but not for a second snapshot beside the file: the compaction
    that does not fit appends its jobs instead (before: every flush failed, so the run
    paused), and no compaction is tried again until the journal has grown as much."""
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / "run.journal", disk / "filler"
        run = new_run(tmp_path / "execs.log")
        for n in range(JOBS, 4 * JOBS):
            run.add_job(JC(n))
        jobs = list(run.jobs.values())
        ser = jorbmp.JournalSerializer(path, OC, JC, compact_min_bytes=1024)
        ser.begin(run)
        try:
            ser.flush(run, final=True)  # the first snapshot
            snapshot = ser.snapshot_bytes
            # Room for 1.35 snapshots: an append of half the jobs, then (the journal
            # would outgrow the snapshot) a compaction that needs a whole snapshot
            # beside the file and does not fit: the other half appended instead; then
            # a quarter, appended without trying to compact again.
            fill_disk(filler, int(1.35 * snapshot))
            with caplog.at_level(logging.INFO, logger="jorbmp"):
                for step, some in enumerate((jobs[::2], jobs[1::2], jobs[::4])):
                    for job in some:
                        job.state = f"state {step}"
                    ser.jobs_changed(some)
                    ser.flush(run, final=True)
            assert ser.compactions == 0
            assert ser.journal_bytes > snapshot
            tries = [r for r in caplog.records if "no room to compact" in r.getMessage()]
            assert len(tries) == 1, [r.getMessage() for r in tries]
            assert not [p.name for p in disk.iterdir() if ".tmp-" in p.name]
        finally:
            ser.end()
        stored = jorbmp.JournalSerializer(path, OC, JC).deserialize()
        states = Counter(job.state for job in stored.jobs.values())
        assert states == {"state 0": JOBS, "state 1": 2 * JOBS, "state 2": JOBS}, states


class OnPause(logging.Handler):
    """Calls ``action`` (from a thread) once, when the log says dispatch paused: after
    the end of a run, the status listener is closed, and only the log tells."""

    def __init__(self, action: Any) -> None:
        super().__init__(logging.INFO)
        self.action = action
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if "dispatch paused" in record.getMessage() and not self.fired:
            self.fired = True
            threading.Thread(target=self.action).start()


@contextlib.contextmanager
def on_pause(action: Any) -> Iterator[OnPause]:
    handler = OnPause(action)
    logger = logging.getLogger("jorbmp")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["space-back", "stop"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_final_write_does_not_fit(fmt: str, how: str, tmp_path: Path) -> None:
    """The disk fills after the last periodic write (an interval longer than the run),
    so the run's final write is the first to fail: exec waits for space (patience 60 s)
    and completes when it comes back; `Processor.stop()` ends that wait at once with a
    `CheckpointError`, the file as the run was loaded."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / checkpoint_name(fmt), disk / "filler"
        serializer(fmt, path).serialize(new_run(log, filler, tmp_path / "armed", path))
        ser = serializer(fmt, path, interval=30.0)
        run = ser.deserialize()
        proc = Processor(None, STATES, ser)
        started = time.monotonic()
        with on_pause(
            lambda: (time.sleep(1.0), filler.unlink() if how == "space-back" else proc.stop())
        ) as seen:
            if how == "space-back":
                proc.exec(run)
            else:
                with pytest.raises(CheckpointError, match="final checkpoint") as caught:
                    proc.exec(run)
                assert str(path) in str(caught.value)
        assert seen.fired
        assert time.monotonic() - started < 30
        all_done(run)
        if how == "stop":  # read where it is, on the disk still full
            in_place = serializer(fmt, path).deserialize()
            assert Counter(job.state for job in in_place.jobs.values()) == {"new": JOBS}
        stored = serializer(fmt, copy_checkpoint(path, tmp_path / "copy")).deserialize()
        if how == "space-back":
            all_done(stored)
        else:
            assert Counter(job.state for job in stored.jobs.values()) == {"new": JOBS}
        assert not [p.name for p in disk.iterdir() if ".tmp-" in p.name]
    assert runs(log) == {f"{s} {n}": 1 for s in ("new", "middle") for n in range(JOBS)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_complete_run_executed_again_on_a_full_disk_waits_for_space(
    fmt: str, tmp_path: Path
) -> None:
    """A run already complete, executed again (the resume pattern) on a disk that filled
    since: its final write waits for space like any run's end (JSON writes a whole
    file, SQLite needs its -shm), or needs none (the journal appends only what changed:
    nothing), and exec returns (it raised `CheckpointError` at once, whatever the
    patience)."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path, filler = disk / checkpoint_name(fmt), disk / "filler"
        run = new_run(log)  # (no job fills the disk: the test does, after the run)
        Processor(None, STATES, serializer(fmt, path)).exec(run)
        all_done(run)
        ser = serializer(fmt, path)
        again = ser.deserialize()
        fill_disk(filler)
        started = time.monotonic()
        freeing = threading.Timer(1.0, filler.unlink)
        freeing.start()
        Processor(None, STATES, ser).exec(again)
        if fmt != "journal":
            assert time.monotonic() - started >= 0.9  # it waited for the space
        freeing.join()  # (on the tmpfs still mounted)
        all_done(again)
        all_done(serializer(fmt, copy_checkpoint(path, tmp_path / "copy")).deserialize())
    assert runs(log) == {f"{s} {n}": 1 for s in ("new", "middle") for n in range(JOBS)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_directory_is_refused_at_the_start(
    fmt: str, existing: bool, tmp_path: Path
) -> None:
    """A checkpoint directory on a read-only file system: `exec` raises a
    `CheckpointError` naming the file and saying why, before any exec runs."""
    log = tmp_path / "execs.log"
    with tmpfs(tmp_path / "disk") as disk:
        path = disk / checkpoint_name(fmt)
        run = new_run(log)
        if existing:
            serializer(fmt, path).serialize(run)
        remount = ["mount", "-o", "remount,ro", str(disk)]
        done = subprocess.run(remount, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{' '.join(remount)} was refused: {done.stderr}"
        ser = serializer(fmt, path)
        if existing:
            run = ser.deserialize()
        with pytest.raises(CheckpointError) as caught:
            Processor(None, STATES, ser).exec(run)
        message = str(caught.value)
        assert str(path) in message and "Read-only file system" in message, message
    assert not log.exists(), "an exec ran"


@pytest.mark.timeout(30)
def test_checkpoint_patience_is_validated() -> None:
    for bad in (-1, -0.5, math.nan, "60", True, None):
        with pytest.raises(ValueError, match="checkpoint_patience"):
            Processor(None, STATES, checkpoint_patience=bad)  # type: ignore[arg-type]
    for good in (0, 0.0, 2.5, math.inf):
        assert Processor(None, STATES, checkpoint_patience=good).checkpoint_patience == good


@pytest.mark.timeout(120)
def test_journal_bigger_than_half_the_disk_resumes(tmp_path: Path) -> None:
    """A journal (snapshot plus appends, with a torn last record) that leaves less room
    than a snapshot takes: the resumed execution's first write, which cannot put a
    snapshot beside the file, appends the changed jobs to it instead (before: it paused
    until the patience ran out, after running every remaining job, at every resume),
    and the run completes, each remaining job run once."""
    log = tmp_path / "execs.log"
    left = range(JOBS - 10, JOBS)  # not executed yet
    with tmpfs(tmp_path / "disk") as disk:
        path = disk / "run.journal"
        run: Run[OC, JC] = Run("disk", OC(str(log)), JC)
        for n in range(JOBS):
            run.add_job(JC(n, pad="x" * 5000))
        # The file as after a stop: a snapshot, then appends (never compacted) of the
        # jobs executed, and of every job once more.
        ser = jorbmp.JournalSerializer(path, OC, JC, compact_min_bytes=1 << 30)
        ser.begin(run)
        try:
            ser.flush(run, final=True)
            snapshot = ser.snapshot_bytes
            jobs = list(run.jobs.values())
            for job in jobs[: left[0]]:
                job.state = "done"
            for some in (jobs[: left[0]], jobs):
                ser.jobs_changed(some)
                ser.flush(run, final=True)
            assert ser.compactions == 0
        finally:
            ser.end()
        with path.open("ab") as f:  # a torn append: a frame header and part of its payload
            f.write(b"\xa5JR\x5a" + (1000).to_bytes(4, "little") + b"\0" * 30)
        assert path.stat().st_size > TMPFS_KIB * 1024 // 2
        assert shutil.disk_usage(disk).free < snapshot
        copy = serializer("journal", path)
        loaded = copy.deserialize()
        loaded.jobs["1"].context.pad = "edited before the execution"  # must reach the file
        Processor(None, STATES, copy, checkpoint_patience=3).exec(loaded)
        all_done(loaded)
        # Appended where the intact records end (the torn one cut off), and counted.
        assert copy.compactions == 0 and copy.snapshot_bytes == snapshot
        assert copy.snapshot_bytes + copy.journal_bytes == path.stat().st_size
        stored = serializer("journal", path).deserialize()
        all_done(stored)
        assert stored.jobs["1"].context.pad == "edited before the execution"
        assert not [p.name for p in disk.iterdir() if ".tmp-" in p.name]
    assert runs(log) == {f"{s} {n}": 1 for s in ("new", "middle") for n in left}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_nothing_saved_says_so(fmt: str, tmp_path: Path) -> None:
    """A new run on a disk full from the start, ``checkpoint_patience=0``: no checkpoint
    was ever written, and the error says so (before: that the file holds the last
    checkpoint, to load with deserialize(), though there was no file)."""
    with tmpfs(tmp_path / "disk") as disk:
        path = disk / checkpoint_name(fmt)
        fill_disk(disk / "filler")
        proc = Processor(None, STATES, serializer(fmt, path), checkpoint_patience=0)
        with pytest.raises(CheckpointError) as caught:
            proc.exec(new_run(tmp_path / "execs.log"))
        assert type(caught.value).__name__ == "CheckpointSpaceError"
        message = str(caught.value)
        assert str(path) in message and "nothing was saved" in message, message
        assert "starts it over" in message and "deserialize()" not in message, message
        assert not path.exists()
