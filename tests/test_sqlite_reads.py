"""Reading SQLite checkpoints: consistent snapshots while others write, no files left
behind, other users' and read-only checkpoints, 0-byte files, and the SQL overview.
Real databases, real writer processes, real kills."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers_checkpoint import TESTS, make_run, serializer, states

import jorbmp.cli
from jorbmp import CheckpointError, Processor, Run, SqliteSerializer
from jorbmp.checkpoint.base import CheckpointLock


def overview_module() -> Any:
    """The overview's module (which 9baee05 did not have)."""
    import jorbmp.checkpoint.overview

    return jorbmp.checkpoint.overview


def typed(path: Path) -> SqliteSerializer:
    return serializer("SqliteSerializer", path)  # type: ignore[no-any-return]


def listing(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def flip_run(jobs: int, state: str = "a") -> Run[Any, Any]:
    run: Run[Any, Any] = Run("race", {"k": 1})
    for n in range(jobs):
        run.add_job({"n": n, "pad": "x" * 50}, state=state)
    return run


# A writer process, as any SQLite client may be (a user redriving by SQL): each
# transaction moves every job to the other state, then the connection closes (the
# last one folds the WAL into the database and deletes it), so the database is quiet
# (no -wal) between transactions, and rewritten in place in each.
FLIPPER = """
import sqlite3, sys
while True:
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE jobs SET state = CASE state WHEN 'a' THEN 'b' ELSE 'a' END")
    conn.execute("COMMIT")
    conn.close()
    print("flipped", flush=True)
"""


@pytest.mark.timeout(90)
def test_a_reader_racing_a_writer_sees_only_states_that_existed(tmp_path: Path) -> None:
    """Every read is one snapshot: all jobs in a, or all in b; never an error, never a
    mix, never a job missing. (An immutable read without a lock saw a mix within a
    few reads, when a writer's checkpoint rewrote the file under it.)"""
    path = tmp_path / "run.db"
    jobs = 20_000
    SqliteSerializer(path).serialize(flip_run(jobs))
    writer = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(path)], stdout=subprocess.PIPE, text=True
    )
    seen: list[Any] = []
    bad: list[Any] = []
    try:
        assert writer.stdout is not None
        writer.stdout.readline()  # it is at work
        deadline = time.monotonic() + 8
        reads = 0
        while time.monotonic() < deadline and len(bad) < 3:
            reader = SqliteSerializer(path)
            try:
                if reads % 3 == 2 and hasattr(reader, "overview"):
                    view = reader.overview()
                    counts, total = view.states, view.jobs
                else:
                    run = reader.deserialize()
                    counts = dict(Counter(job.state for job in run.jobs.values()))
                    total = len(run.jobs)
            except CheckpointError as exc:
                bad.append(str(exc)[:200])
            else:
                seen.append(counts)
                if total != jobs or counts not in ({"a": jobs}, {"b": jobs}):
                    bad.append(counts)
            reads += 1
        assert writer.poll() is None, "the writer failed"
    finally:
        writer.kill()
        writer.wait()
    assert not bad, f"{len(bad)} bad reads of {reads}: {bad}"
    assert len(seen) >= 10
    assert {"a": jobs} in seen or {"b": jobs} in seen


@pytest.mark.timeout(60)
def test_a_read_leaves_no_new_files(tmp_path: Path) -> None:
    """A read-only connection to a WAL database creates -wal and -shm files that it
    cannot remove: loading, the overview, ``status`` and ``redrive --dry-run`` of a
    checkpoint no one writes leave the directory as it was."""
    path = tmp_path / "run.db"
    run = flip_run(300, state="failed")
    run.jobs["7"].state_errors = {"new": ["boom"]}
    SqliteSerializer(path).serialize(run)
    before = listing(tmp_path)
    assert "run.db" in before and not any(name.endswith(("-wal", "-shm")) for name in before)
    assert SqliteSerializer(path).deserialize() == run
    if hasattr(SqliteSerializer, "overview"):
        assert SqliteSerializer(path).overview().states == {"failed": 300}
    dry_run = ["redrive", str(path), "--from", "failed", "--to", "new", "--dry-run"]
    for args in (["status", str(path)], dry_run):
        out = subprocess.run(
            [sys.executable, "-m", "jorbmp", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert listing(tmp_path) == before, args
    assert listing(tmp_path) == before


# -- another user's checkpoint, read-only media ----------------------------------------


def _in_child(fn: Callable[[], Any], user: int | None) -> Any:
    """``fn()`` in a forked child (as ``user``, if given); its value, or the exception
    it raised, comes back pickled."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(read_end)
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)
            try:
                result: Any = ("ok", fn())
            except BaseException as exc:
                result = ("raised", exc)
            with os.fdopen(write_end, "wb") as f:
                pickle.dump(result, f)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the child failed"
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise value
    return value


NOBODY = 65534


@contextlib.contextmanager
def unwritable_dir(how: str) -> Iterator[tuple[Path, Path, Callable[[Callable[[], Any]], Any]]]:
    """A directory to write in, the same directory as a reader sees it, and a function
    that runs a read as that reader, who cannot create files there: another user (the
    reader is ``nobody``; or, where the tests do not run as root, this user with the
    directory made read-only while it reads), or anyone through a read-only bind mount
    of it (read-only media)."""
    base = Path(tempfile.mkdtemp(prefix="jorbmp-ro-"))
    base.chmod(0o755)  # (a temp directory is the owner's only)
    writable = base / "w"
    writable.mkdir()
    writable.chmod(0o755)

    def as_nobody(fn: Callable[[], Any]) -> Any:
        return _in_child(fn, NOBODY)

    def in_read_only_dir(fn: Callable[[], Any]) -> Any:
        writable.chmod(0o555)
        try:
            return _in_child(fn, None)
        finally:
            writable.chmod(0o755)

    try:
        if how == "another-user":
            yield writable, writable, as_nobody if os.geteuid() == 0 else in_read_only_dir
            return
        view = base / "ro"
        view.mkdir()
        mount = shutil.which("mount")
        if os.geteuid() != 0 or mount is None:
            pytest.skip("a read-only bind mount needs root and mount(8)")
        made = subprocess.run([mount, "--bind", str(writable), str(view)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {made.stderr.decode().strip()}")
        try:
            ro = subprocess.run([mount, "-o", "remount,bind,ro", str(view)], capture_output=True)
            if ro.returncode != 0:
                pytest.skip(f"cannot remount read-only: {ro.stderr.decode().strip()}")
            yield writable, view, lambda fn: _in_child(fn, None)
        finally:
            subprocess.run(["umount", str(view)], capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _status(path: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = jorbmp.cli.main(["status", "--json", str(path)])
    return code, out.getvalue() + err.getvalue()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["another-user", "read-only-mount"])
def test_reading_where_the_reader_cannot_create_files(how: str) -> None:
    """Where no -shm can be made, a checkpoint is read all the same, consistently (as
    immutable, checked), also while its processor holds the lock before its first write;
    a -wal that holds commits, which such a read could not see, is an error instead."""
    with unwritable_dir(how) as (directory, view, as_reader):
        path = directory / "run.db"
        seen = view / "run.db"
        run = flip_run(500, state="failed")
        run.jobs["3"].state_errors = {"new": ["boom"]}
        SqliteSerializer(path).serialize(run)
        for p in directory.iterdir():
            p.chmod(0o644)  # readable by the reader (jorbmp makes them owner-only)
        before = listing(directory)

        def read_all() -> Any:
            status = _status(seen)
            loaded = SqliteSerializer(seen).deserialize()
            view_ = getattr(SqliteSerializer(seen), "overview", lambda: None)()
            return loaded, view_, status

        loaded, view_, status = as_reader(read_all)
        assert loaded == run
        assert status[0] == 0, status[1]
        assert json_of(status[1])["states"] == {"failed": 500}
        if view_ is not None:
            assert view_ == overview_module().overview_of(run)
        assert listing(directory) == before

        # Its processor holds the lock and has not written yet: an ordinary read (as
        # a writer is at work) cannot be made here.
        holder = SqliteSerializer(path)
        holder.begin(run)
        try:
            assert CheckpointLock.held(path)
            (directory / "run.db.lock").chmod(0o644)  # the reader sees that it is held
            loaded, view_, status = as_reader(read_all)
            assert loaded == run
            assert status[0] == 0, status[1]
        finally:
            holder.end()
        assert SqliteSerializer(path).deserialize() == run

        # A writer left a -wal with a commit (its -shm lost): a read that ignored it
        # would give the run as it was before; it is refused.
        shutil.copy(path, directory / "copy")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("UPDATE jobs SET state = 'done'")
            shutil.copy(path.with_name("run.db-wal"), directory / "copy-wal")
        shutil.copy(directory / "copy", path)
        shutil.copy(directory / "copy-wal", path.with_name("run.db-wal"))
        for p in directory.iterdir():
            p.chmod(0o644)
        with contextlib.suppress(FileNotFoundError):
            path.with_name("run.db-shm").unlink()
        with pytest.raises(CheckpointError, match="-wal"):
            as_reader(lambda: SqliteSerializer(seen).deserialize())
        loaded = SqliteSerializer(path).deserialize()  # where it can be read
        assert loaded.counts() == {"done": 500}


def json_of(text: str) -> Any:
    return msgspec.json.decode(text)


# -- 0-byte files ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_0_byte_file_is_no_checkpoint_and_a_run_replaces_it(tmp_path: Path, caplog: Any) -> None:
    """``sqlite3 run.db "select ..."`` before the first write creates a 0-byte file: it
    holds no checkpoint, and a run starts over it."""
    path = tmp_path / "run.db"
    sqlite3.connect(path).close()
    assert path.stat().st_size == 0
    with caplog.at_level(logging.WARNING, logger="jorbmp"), pytest.raises(FileNotFoundError):
        SqliteSerializer(path).deserialize()
    assert "empty" in caplog.text
    run = make_run(20)
    Processor(None, states(), typed(path)).exec(run)
    assert typed(path).deserialize() == run


KILLED_RUN = """
import sys
import helpers_checkpoint as h
from jorbmp import Processor, SqliteSerializer
run = h.make_run(200, sleep=0.05)
# interval=60: the first write keeps its transaction open for a minute, the kill comes first
Processor(None, h.states(), SqliteSerializer(sys.argv[1], h.OC, h.JC, interval=60)).exec(run)
"""


@pytest.mark.timeout(90)
def test_a_kill_9_before_the_first_commit_over_a_0_byte_file_restarts(tmp_path: Path) -> None:
    """The first write over a 0-byte file builds the database beside it, so a kill -9
    before it commits leaves the 0-byte file as it was (written in place, it left a
    file that is no jorbmp database, which no run may overwrite)."""
    path = tmp_path / "run.db"
    sqlite3.connect(path).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(path)], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not any(  # the first write has begun: a new database beside it, or a log
            p.name.startswith(".run.db.tmp-") or p.name == "run.db-wal" for p in tmp_path.iterdir()
        ):
            assert child.poll() is None, "the run ended"
            assert time.monotonic() < deadline, "no first write"
            time.sleep(0.01)
        time.sleep(0.2)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert path.stat().st_size == 0  # as it was
    with pytest.raises(FileNotFoundError):
        typed(path).deserialize()
    run = make_run(30)
    Processor(None, states(), typed(path)).exec(run)
    loaded = typed(path).deserialize()
    assert loaded == run
    assert all(job.state in ("done", "failed") for job in loaded.jobs.values())


# -- the SQL overview ------------------------------------------------------------------


def errors_run() -> Run[Any, Any]:
    """Errors in several states, repeated texts within a job, more groups than an
    overview keeps, ties (broken by state, then text, in code-point order), texts that
    sort differently as UTF-16 or by locale, and groups with more jobs than examples."""
    run: Run[Any, Any] = Run("errors \u2713", {"k": [1, 2]})
    texts = ["Z", "a", "\u00e9", "\U0001f600", "\uff21", "ab", "a b", "", "x\x00y"]
    for n in range(400):
        job = run.jobs[run.add_job({"n": n}, state=("done", "failed", "new", "x y")[n % 4])]
        if n % 3 == 0:
            job.state_errors = {
                "new": [texts[n % len(texts)]] * (1 + n % 2) + [f"E{n % 13}"],
                "finish": [texts[(n // 3) % len(texts)], "same"],
            }
        elif n % 5 == 0:
            job.state_errors = {"\u00e9tat": ["same", "same"], "new": []}
        elif n % 7 == 0:
            job.state_errors = {}
    run.report = {"anything": [1, "two"]}
    return run


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make",
    [
        errors_run,
        lambda: Run("empty", None),
        lambda: flip_run(50),
        lambda: make_run(30),  # typed contexts, read untyped
    ],
    ids=["errors", "empty", "no-errors", "processor-run"],
)
def test_overview_is_overview_of_the_loaded_run(tmp_path: Path, make: Any) -> None:
    path = tmp_path / "run.db"
    run = make()
    SqliteSerializer(path).serialize(run)
    view = SqliteSerializer(path).overview()
    expected = overview_module().overview_of(SqliteSerializer(path).deserialize())
    assert view == expected
    assert msgspec.json.encode(view) == msgspec.json.encode(expected)  # order too
    assert list(view.states) == list(expected.states)
    if make is errors_run:
        assert len(view.errors) == overview_module().TOP_ERRORS
        assert any(len(g.examples) == overview_module().EXAMPLE_IDS for g in view.errors)
        assert len({g.jobs for g in view.errors}) < len(view.errors)  # ties
    out = subprocess.run(
        [sys.executable, "-m", "jorbmp", "status", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert json_of(out.stdout) == msgspec.to_builtins(expected)


@pytest.mark.timeout(60)
def test_overview_of_a_run_executed_then_edited(tmp_path: Path) -> None:
    """After a processor's run (errors, retries, kicks), and after edits by SQL."""
    path = tmp_path / "run.db"
    Processor(None, states(), typed(path)).exec(make_run(120))

    def same() -> None:
        assert SqliteSerializer(path).overview() == overview_module().overview_of(
            SqliteSerializer(path).deserialize()
        )

    same()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE jobs SET state = 'new' WHERE rowid % 2 = 0")
        conn.execute("""UPDATE jobs SET state_errors = '{"a": ["x", "x", "y"], "b": ["x"]}'
            WHERE rowid % 9 = 0""")
    same()


@pytest.mark.timeout(60)
def test_overview_errors_are_those_of_deserialize(tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "run.db"
    with pytest.raises(FileNotFoundError):
        SqliteSerializer(path).overview()
    assert not path.exists()
    sqlite3.connect(path).close()  # 0 bytes: no checkpoint, with a warning
    with caplog.at_level(logging.WARNING, logger="jorbmp"), pytest.raises(FileNotFoundError):
        SqliteSerializer(path).overview()
    assert "empty" in caplog.text
    path.unlink()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("create table t (x)")
    with pytest.raises(CheckpointError, match="not a jorbmp SQLite checkpoint"):
        SqliteSerializer(path).overview()
    path.unlink()
    SqliteSerializer(path).serialize(errors_run())
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("update run set format = 99")
    with pytest.raises(CheckpointError, match="format 99 is not supported"):
        SqliteSerializer(path).overview()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("update run set format = 1")
        conn.execute("""update jobs set state_errors = '{"new": "not a list"}' where id = '9'""")
    with pytest.raises(CheckpointError, match="job '9'") as info:
        SqliteSerializer(path).overview()
    with pytest.raises(CheckpointError, match="job '9'"):
        SqliteSerializer(path).deserialize()
    assert str(path) in str(info.value)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("update jobs set state_errors = '{not json' where id = '9'")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        SqliteSerializer(path).overview()
    path.write_bytes(os.urandom(5000))
    with pytest.raises(CheckpointError, match="not a readable jorbmp SQLite"):
        SqliteSerializer(path).overview()
