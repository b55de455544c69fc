"""Load-then-execute is safe: a checkpoint that changed after the load (a redrive,
another processor) is never overwritten, two starts of one run never both run from
scratch, symlinks lead to one file and one lock, a reused serializer re-checks the
file, 0-byte files are no checkpoint, probes never take the lock, and new directories
are made durable. Real files, real processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers_checkpoint import TESTS, check_complete, make_run, serializer, states

from jorbmp import CheckpointError, Processor
from jorbmp.checkpoint import base

KINDS = ["JsonSerializer", "JournalSerializer", "SqliteSerializer"]
SUFFIX = {"JsonSerializer": "json", "JournalSerializer": "journal", "SqliteSerializer": "db"}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jorbmp", *args], env=env(), capture_output=True, text=True
    )


def failed_once(kind: str, path: Path, jobs: int = 30) -> None:
    """A complete run at ``path`` with some jobs in state failed."""
    Processor(None, states(), serializer(kind, path)).exec(make_run(jobs))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_redrive_after_the_load_is_never_overwritten(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    failed_once(kind, path)
    ser = serializer(kind, path)
    run = ser.deserialize()  # the application loads ...
    moved = cli("redrive", str(path), "--from", "failed", "--to", "new")  # ... someone redrives
    assert moved.returncode == 0 and "moved 5 jobs" in moved.stdout, moved
    with pytest.raises(CheckpointError, match="changed since this process last read"):
        Processor(None, states(), ser).exec(run)  # ... and the application executes
    # The redrive stands: loaded again, the run re-executes the redriven jobs.
    again = serializer(kind, path).deserialize()
    assert again.counts().get("new") == 5
    Processor(None, states(), serializer(kind, path)).exec(again)
    assert again.counts().get("failed") == 5  # they failed again (the execs are unlucky)
    assert all(len(j.state_errors["new"]) == 4 for j in again.jobs.values() if j.state == "failed")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_an_execution_by_another_process_after_the_load_is_refused(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    serializer(kind, path).serialize(make_run(10))
    ser = serializer(kind, path)
    loaded = ser.deserialize()
    code = f"""
        import jorbmp
        from helpers_checkpoint import serializer, states
        ser = serializer({kind!r}, {str(path)!r})
        jorbmp.Processor(None, states(), ser).exec(ser.deserialize())
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env(), check=True)
    with pytest.raises(CheckpointError, match="changed since"):
        Processor(None, states(), ser).exec(loaded)
    check_complete(serializer(kind, path).deserialize(), 10)  # the other execution's


QUICKSTART = """
    import os, sys, time
    import jorbmp
    from jorbmp import Processor, Run, State
    from helpers_checkpoint import JC, OC, serializer
    kind, path, log, build = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

    def work(ac, oc, jc):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {jc.n}\\n")
        return jc, "done"

    ser = serializer(kind, path)
    try:
        run = ser.deserialize()
    except FileNotFoundError:
        run = Run("quickstart", OC("/data"), JC)
        for i in range(100):
            run.add_job(JC(n=i))
    print("looked", flush=True)
    while not os.path.exists(path + ".go"):  # the test starts both at once
        time.sleep(0.001)
    time.sleep(build)  # listing the inputs takes a while
    try:
        Processor(None, [State("new", work, concurrency=4), State("done", terminal=True)],
                  ser).exec(run)
    except jorbmp.CheckpointError as exc:
        print("refused:", exc)
    else:
        print("completed")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_two_starts_of_the_quickstart_execute_each_job_once(tmp_path: Path, kind: str) -> None:
    path, log = tmp_path / f"run.{SUFFIX[kind]}", tmp_path / "executed"
    code = textwrap.dedent(QUICKSTART)
    # B finds no checkpoint either, and builds its run while A executes the whole run.
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", code, kind, str(path), str(log), build],
            env=env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for build in ("0", "2")
    ]
    for starter in starters:
        assert starter.stdout is not None and starter.stdout.readline() == "looked\n"
    path.with_name(path.name + ".go").touch()
    outputs = [s.communicate(timeout=100)[0] for s in starters]
    executed = log.read_text().split("\n")[:-1]
    assert len(executed) == 100, outputs
    assert sorted(int(line.split()[1]) for line in executed) == list(range(100))
    assert "completed" in outputs[0]
    # Refused: either it found the checkpoint in use, or A had finished already.
    assert "refused:" in outputs[1], outputs
    assert "found no checkpoint" in outputs[1] or "in use" in outputs[1], outputs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_symlink_leads_to_the_target_its_log_and_its_lock(tmp_path: Path, kind: str) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target = real / f"run.{SUFFIX[kind]}"
    link = tmp_path / f"link.{SUFFIX[kind]}"
    link.symlink_to(target)
    ser = serializer(kind, link)
    Processor(None, states(), ser).exec(make_run(20))
    assert link.is_symlink() and target.is_file()
    assert sorted(os.listdir(tmp_path)) == [link.name, "real"]  # nothing beside the link
    assert f"{target.name}.lock" in os.listdir(real)
    check_complete(serializer(kind, target).deserialize(), 20)
    # One lock for both names: a processor on the real path excludes one on the link.
    holder = serializer(kind, target)
    holder._acquire()
    try:
        with pytest.raises(CheckpointError, match="in use by another running processor"):
            Processor(None, states(), serializer(kind, link)).exec(make_run(3))
    finally:
        holder._release()
    # A resume through the link sees what a processor on the real path wrote.
    Processor(None, states(), serializer(kind, target)).exec(
        loaded := serializer(kind, target).deserialize()
    )
    assert serializer(kind, link).deserialize() == loaded
    assert link.is_symlink()


# Killed once the file holds 100 jobs done, as read through the link (not once 200
# are done in memory: under load the first write, which makes the file, had not
# committed by then, and nothing was there).
SQLITE_KILLED = """
    import os, signal, sys
    import jorbmp
    from helpers_checkpoint import make_run, serializer, states

    class Killer(jorbmp.StatusListener):
        def status_update(self, counts):
            try:
                done = reader.overview().states.get("done", 0)
            except FileNotFoundError:
                return  # not written yet
            if done >= 100:
                os.kill(os.getpid(), signal.SIGKILL)

    ser = serializer("SqliteSerializer", sys.argv[1], interval=0.01)
    reader = serializer("SqliteSerializer", sys.argv[1])
    jorbmp.Processor(None, states(), ser, status_listener=Killer()).exec(make_run(300, 0.002))
"""


@pytest.mark.timeout(60)
def test_sqlite_through_a_symlink_keeps_what_it_committed_after_a_kill(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    target, link = real / "run.db", tmp_path / "run.db"
    link.symlink_to(target)
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SQLITE_KILLED), str(link)], env=env()
    )
    assert child.returncode == -9
    assert sorted(os.listdir(tmp_path)) == ["real", "run.db"]  # nothing beside the link
    loaded = serializer("SqliteSerializer", link).deserialize()
    # What was committed before the kill (in the WAL beside the target, if it was not
    # folded into the database yet) is there, through either name.
    assert loaded.counts().get("done", 0) >= 100
    assert serializer("SqliteSerializer", target).deserialize() == loaded
    Processor(None, states(), serializer("SqliteSerializer", link)).exec(loaded)
    check_complete(serializer("SqliteSerializer", target).deserialize(), 300)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_reused_serializer_rechecks_a_file_that_became_unreadable(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    ser = serializer(kind, path)
    run = make_run(10)
    Processor(None, states(), ser).exec(run)
    # Meanwhile the file is replaced by something unreadable, with the same size.
    garbage = os.urandom(path.stat().st_size)
    tmp = path.with_name("garbage")
    tmp.write_bytes(garbage)
    os.replace(tmp, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        Processor(None, states(), ser).exec(run)
    with pytest.raises(CheckpointError, match="cannot be read"):
        ser.serialize(run)
    assert path.read_bytes() == garbage
    # A failed load forgets that the file was known good, even if it is put back.
    with pytest.raises(CheckpointError):
        ser.deserialize()
    assert ser._known_good is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_file_is_no_checkpoint(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    path.touch()  # e.g. `sqlite3 run.db "select ..."` before the first write
    with caplog.at_level(logging.WARNING, logger="jorbmp"), pytest.raises(FileNotFoundError):
        serializer(kind, path).deserialize()
    assert "empty and no jorbmp wrote it" in caplog.text
    run = make_run(10)
    Processor(None, states(), serializer(kind, path)).exec(run)
    check_complete(serializer(kind, path).deserialize(), 10)


PROBE_LOOP = """
    import sys
    from pathlib import Path
    from jorbmp.checkpoint.base import CheckpointLock
    path = Path(sys.argv[1])
    print("probing", flush=True)
    while True:
        CheckpointLock.held(path)
"""


@pytest.mark.timeout(60)
def test_probes_never_take_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.db"
    monkeypatch.setattr(base, "ACQUIRE_PATIENCE", 0.0)  # a taken lock refuses at once
    probers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PROBE_LOOP), str(path)],
            env=env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for prober in probers:
            assert prober.stdout is not None and prober.stdout.readline()
        lock = base.CheckpointLock(path)
        refused = 0
        for _ in range(5000):
            try:
                lock.acquire()
            except CheckpointError:
                refused += 1
            else:
                lock.release()
        assert refused == 0
    finally:
        for prober in probers:
            prober.kill()
            prober.wait()


HOLDER = """
    import sys, time
    from pathlib import Path
    from jorbmp.checkpoint.base import CheckpointLock
    CheckpointLock(Path(sys.argv[1])).acquire()
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_refusal_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(path)],
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline()
        assert base.CheckpointLock.held(path)
        with pytest.raises(CheckpointError, match=rf"\(pid {holder.pid}\)"):
            Processor(None, states(), serializer("JsonSerializer", path)).exec(make_run(2))
    finally:
        holder.kill()
        holder.wait()
    assert not base.CheckpointLock.held(path)


@pytest.mark.timeout(60)
def test_new_directories_are_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "a" / "b" / "c" / "run.json"
    serializer("JsonSerializer", path).serialize(make_run(2))
    for directory in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", path.parent):
        assert str(directory) in synced, synced


@pytest.mark.timeout(30)
def test_a_directory_fsync_that_fails_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        base.fsync_dir(tmp_path / "missing")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["JsonSerializer", "JournalSerializer"])
def test_a_replacement_keeps_the_files_owner_and_mode(tmp_path: Path, kind: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    path = tmp_path / f"run.{SUFFIX[kind]}"
    failed_once(kind, path)
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o640)
    moved = cli("redrive", str(path), "--from", "failed", "--to", "new")
    assert moved.returncode == 0, moved
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (65534, 65534, 0o640)
    lock = path.with_name(path.name + ".lock").stat()
    assert lock.st_uid == 65534


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_deleted_to_start_over_is_no_change(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    ser = serializer(kind, path)
    Processor(None, states(), ser).exec(make_run(5))
    path.unlink()  # start over, in the same process
    Processor(None, states(), ser).exec(fresh := make_run(8))
    assert serializer(kind, path).deserialize() == fresh


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_loaded_before_a_change_stays_stale_after_another_look(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    failed_once(kind, path)
    stale = serializer(kind, path).deserialize()
    assert cli("redrive", str(path), "--from", "failed", "--to", "new").returncode == 0
    # Looking at the changed file again (an overview, or a load into another Run
    # object) does not make the run loaded before it current.
    assert serializer(kind, path).overview().states.get("new") == 5
    fresh = serializer(kind, path).deserialize()
    with pytest.raises(CheckpointError, match="changed since"):
        Processor(None, states(), serializer(kind, path)).exec(stale)
    Processor(None, states(), serializer(kind, path)).exec(fresh)
    assert fresh.counts().get("new") is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_an_overview_is_what_a_load_shows(tmp_path: Path, kind: str) -> None:
    from jorbmp.checkpoint import open_checkpoint
    from jorbmp.checkpoint.overview import TOP_ERRORS, overview_of

    path = tmp_path / f"run.{SUFFIX[kind]}"
    run = make_run(400)
    for i, job in enumerate(run.jobs.values()):
        if i % 3 == 0:
            job.state = "failed"
            # More groups than are shown, ties between them, a text twice in one job,
            # the same text in two states.
            # (Words, not numbers: texts differing by a number are one kind.)
            text = f"error {chr(ord('a') + i % (2 * TOP_ERRORS))}"
            job.state_errors = {"new": [text, text, "common"], "finish": ["common"]}
        elif i % 3 == 1:
            job.state = "done"
    serializer(kind, path).serialize(run)
    for ser in (serializer(kind, path), open_checkpoint(path)):
        assert ser.overview() == overview_of(ser.deserialize())
    shown = open_checkpoint(path).overview()
    assert len(shown.errors) == TOP_ERRORS and shown.errors[0].fingerprint == "common"


@pytest.mark.timeout(60)
def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    serializer("JsonSerializer", path).serialize(make_run(3))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = path.with_name(path.name + ".lock")
    lock.unlink()
    lock.symlink_to(victim)
    with pytest.raises(CheckpointError, match="lock file is a symlink"):
        Processor(None, states(), serializer("JsonSerializer", path)).exec(make_run(3))
    moved = cli("redrive", str(path), "--from", "new", "--to", "done")
    assert moved.returncode == 2 and "symlink" in moved.stderr
    assert victim.read_text() == "precious\n"
    assert not base.CheckpointLock.held(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("node", ["fifo", "directory"])
def test_a_path_that_is_no_regular_file_is_never_replaced(
    tmp_path: Path, kind: str, node: str
) -> None:
    path = tmp_path / f"run.{SUFFIX[kind]}"
    if node == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        serializer(kind, path).deserialize()
    with pytest.raises(CheckpointError, match="not a regular file"):
        Processor(None, states(), serializer(kind, path)).exec(make_run(3))
    assert path.is_fifo() if node == "fifo" else path.is_dir()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("node", ["fifo", "directory"])
def test_a_lock_file_that_is_no_regular_file_is_refused_without_hanging(
    tmp_path: Path, node: str
) -> None:
    path = tmp_path / "run.db"
    serializer("SqliteSerializer", path).serialize(make_run(3))
    lock = path.with_name(path.name + ".lock")
    lock.unlink()
    if node == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    assert cli("status", str(path)).returncode == 0  # readers go on
    assert serializer("SqliteSerializer", path).deserialize().counts() == {"new": 3}
    for _ in range(2):  # (and nothing leaks from the first refusal)
        with pytest.raises(CheckpointError, match="lock file is"):
            Processor(None, states(), serializer("SqliteSerializer", path)).exec(make_run(3))


@pytest.mark.timeout(60)
def test_the_lock_of_a_write_protected_checkpoint_stays_usable(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    ser = serializer("JsonSerializer", path)
    ser.serialize(make_run(3))
    path.with_name(path.name + ".lock").unlink()
    os.chmod(path, 0o440)
    for _ in range(2):
        Processor(None, states(), serializer("JsonSerializer", path)).exec(
            serializer("JsonSerializer", path).deserialize()
        )
    assert path.with_name(path.name + ".lock").stat().st_mode & 0o600 == 0o600


@pytest.mark.timeout(60)
def test_a_write_that_failed_after_its_rename_leaves_the_run_resumable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.json"
    run = make_run(5)
    real = base.fsync_dir
    calls = []

    def failing(directory: Path) -> None:
        calls.append(directory)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (injected)")
        real(directory)

    monkeypatch.setattr(base, "fsync_dir", failing)
    with pytest.raises(OSError, match="injected"):
        Processor(None, states(), serializer("JsonSerializer", path)).exec(run)
    Processor(None, states(), serializer("JsonSerializer", path)).exec(run)  # not refused
    check_complete(serializer("JsonSerializer", path).deserialize(), 5)
