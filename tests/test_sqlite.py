"""SqliteSerializer: real runs, real databases, real crashes, queried with SQL."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers_checkpoint import (
    JC,
    OC,
    OtherJC,
    OtherOC,
    Rich,
    StopAfter,
    check_complete,
    kill_9_then_resume,
    make_run,
    rich_run,
    serializer,
    states,
)

import jorbmp
from jorbmp import CheckpointError, Processor, Run, SqliteSerializer, Stopped
from jorbmp.checkpoint.sqlite import APPLICATION_ID


def db(path: Path, **kwargs: Any) -> SqliteSerializer:
    return serializer("SqliteSerializer", path, **kwargs)  # type: ignore[no-any-return]


def query(path: Path, sql: str, *args: Any) -> list[Any]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


def change(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)


def files(path: Path) -> dict[str, bytes]:
    """The database and its write-ahead log, byte for byte (not the -shm index, which
    readers update, nor the lock)."""
    return {
        p.name: p.read_bytes()
        for p in path.parent.iterdir()
        if p.name.startswith(path.name) and not p.name.endswith((".lock", "-shm"))
    }


@pytest.mark.timeout(60)
def test_round_trip_of_a_processor_run(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(60)
    Processor(None, states(), db(path)).exec(run)
    check_complete(run, 60)
    loaded = db(path).deserialize()
    assert loaded == run
    assert loaded.overall == OC(workdir="/data")
    assert loaded.next_id == 60
    assert all(type(job.context) is JC for job in loaded.jobs.values())
    assert list(loaded.jobs) == list(run.jobs)  # insertion order, kicks after parents
    assert loaded.jobs["5"].last_update == run.jobs["5"].last_update  # exact, with tz
    check_complete(loaded, 60)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A finished run leaves one file (and the lock), in WAL mode.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.db", "run.db.lock"]
    assert query(path, "pragma journal_mode") == [("wal",)]
    Processor(None, states(), db(path)).exec(loaded)  # nothing to do
    assert db(path).deserialize() == run


@pytest.mark.timeout(60)
def test_sql_queries_on_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(30)
    Processor(None, states(), db(path)).exec(run)
    failed = query(
        path,
        "select id, json_extract(context, '$.n') from jobs where state = 'failed' order by rowid",
    )
    assert failed == [(str(n), n) for n in range(0, 30, 7)]
    assert query(path, "select json_extract(context, '$.total') from jobs where id = '4'") == [(8,)]
    assert query(path, "select parent, state from jobs where id = '10->0'") == [("10", "done")]
    assert query(
        path, "select json_extract(state_errors, '$.new[0]') from jobs where id = '3'"
    ) == [("soft error",)]
    assert query(path, "select name, json_extract(overall, '$.workdir'), next_id from run") == [
        ("checkpoint-test", "/data", 30)
    ]
    counts = dict(query(path, "select state, count(*) from jobs group by state"))
    assert counts == run.counts()


@pytest.mark.timeout(60)
def test_queries_while_the_run_executes(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    seen: list[int] = []

    class Peek(jorbmp.StatusListener):
        def status_update(self, counts: list[jorbmp.StatusCount]) -> None:
            if path.exists():
                with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as conn:
                    seen.append(conn.execute("select count(*) from jobs").fetchone()[0])

    Processor(None, states(), db(path, interval=0.05), Peek()).exec(make_run(60, sleep=0.01))
    assert seen and seen[-1] == 72  # 60 jobs and 12 kicks
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.timeout(60)
def test_resume_after_stop(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(200, sleep=0.005)
    listener = StopAfter(10)
    processor: Processor[Any, Any, Any] = Processor(None, states(), db(path), listener)
    listener.processor = processor
    with pytest.raises(Stopped):
        processor.exec(run)
    loaded = db(path).deserialize()
    assert loaded == run
    assert list(loaded.jobs) == list(run.jobs)
    counts = loaded.counts()
    assert counts.get("done", 0) >= 10
    assert sum(n for s, n in counts.items() if s not in ("done", "failed")) > 0
    Processor(None, states(), db(path)).exec(loaded)
    check_complete(loaded, 200)
    check_complete(db(path).deserialize(), 200)


@pytest.mark.timeout(60)
def test_kill_9_then_resume(tmp_path: Path) -> None:
    kill_9_then_resume("SqliteSerializer", tmp_path / "run.db")


@pytest.mark.timeout(30)
def test_wrong_types_are_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    Processor(None, states(), db(path)).exec(make_run(5))
    before = files(path)
    with pytest.raises(CheckpointError) as info:
        SqliteSerializer(path, OC, OtherJC).deserialize()
    message = str(info.value)
    assert str(path) in message
    assert "job '0'" in message
    assert "$.context.n" in message
    with pytest.raises(CheckpointError, match=r"\$\.overall\.workdir"):
        SqliteSerializer(path, OtherOC, JC).deserialize()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, states(), SqliteSerializer(path, OC, OtherJC)).exec(Run("x", None, OtherJC))
    assert files(path) == before


@pytest.mark.timeout(30)
def test_untyped_load_gives_plain_values(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    Processor(None, states(), db(path)).exec(make_run(10))
    loaded = SqliteSerializer(path).deserialize()
    assert loaded.overall == {"workdir": "/data", "factor": 2}
    assert loaded.jobs["1"].context["total"] == 2


def other_database(path: Path) -> None:
    change(path, "create table t (x)")


def wrong_schema(path: Path) -> None:
    change(
        path,
        f"pragma application_id = {APPLICATION_ID}",
        "create table run (id, format, name, overall, next_id)",
        """insert into run values (0, 1, 'x', '{"workdir": "/"}', 0)""",
        "create table jobs (id text primary key, state)",
    )


def future_format(path: Path) -> None:
    SqliteSerializer(path).serialize(Run("x", None))
    change(path, "update run set format = 99")


def bad_json(path: Path) -> None:
    SqliteSerializer(path).serialize(make_run(3))
    change(path, "update jobs set context = '{not json' where id = '1'")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(os.urandom(5000)), "not a readable jorbmp SQLite"),
        (lambda p: p.write_bytes(b'{"format": 1}'), "use JsonSerializer"),
        (lambda p: p.write_bytes(b"\x89jorbmp journal\n\x01\x00\x00\x00"), "JournalSerializer"),
        (other_database, "not a jorbmp SQLite checkpoint"),
        (wrong_schema, "no such column"),
        (future_format, "format 99 is not supported"),
        (bad_json, "malformed JSON"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path: Path, make: Any, reason: str) -> None:
    path = tmp_path / "run.db"
    make(path)
    before = files(path)
    with pytest.raises(CheckpointError, match=reason) as info:
        db(path).deserialize()
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, states(), db(path)).exec(make_run(2))
    assert files(path) == before


@pytest.mark.timeout(30)
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        db(tmp_path / "nothing.db").deserialize()
    assert not (tmp_path / "nothing.db").exists()


@pytest.mark.timeout(30)
def test_a_run_with_nothing_to_do_is_still_written(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(3)
    for job in run.jobs.values():
        job.state = "done"
    Processor(None, states(), db(path)).exec(run)
    assert db(path).deserialize() == run


@pytest.mark.timeout(30)
def test_a_running_checkpoint_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(3)
    holder = db(path)
    holder.begin(run)
    try:
        with pytest.raises(CheckpointError, match="in use"):
            db(path).begin(run)
        with pytest.raises(RuntimeError):
            holder.serialize(run)
    finally:
        holder.end()
    assert db(path).deserialize() == run
    db(path).begin(run)


@pytest.mark.timeout(60)
def test_serialize_rewrites_exactly_the_run(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.db"
    big = make_run(20_000)  # several statements' worth of rows
    big.jobs["7"].state_errors = {"new": ["one", "two"]}
    big.jobs["8"].parent = "7"
    db(path).serialize(big)
    assert db(path).deserialize() == big
    small = make_run(2)
    db(path).serialize(small)  # an existing database: rewritten in one transaction
    loaded = db(path).deserialize()
    assert loaded == small and list(loaded.jobs) == ["0", "1"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert repr(db(path)) == f"SqliteSerializer({str(path)!r})"


@pytest.mark.timeout(30)
def test_flushes_through_the_hooks(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    run = make_run(5)
    ser = db(path)
    ser.begin(run)
    assert not path.exists()  # the whole run is written at the first flush
    ser.flush(run)
    ser.flush(run, final=True)
    # PRAGMA data_version changes when another connection commits.
    reader = sqlite3.connect(path)
    version = reader.execute("pragma data_version").fetchone()[0]
    ser.flush(run, final=True)  # nothing changed: nothing written
    assert reader.execute("pragma data_version").fetchone()[0] == version
    for job_id in ("1", "2", "3"):
        run.jobs[job_id].state = "done"
        ser.job_changed(run.jobs[job_id])
    ser.flush(run, final=True)
    assert reader.execute("pragma data_version").fetchone()[0] != version
    assert reader.execute("select count(*) from jobs where state = 'done'").fetchone() == (3,)
    ser.end()
    reader.close()
    assert db(path).deserialize() == run


@pytest.mark.timeout(30)
def test_contexts_of_every_kind_round_trip_exactly(tmp_path: Path) -> None:
    path = tmp_path / "rich"
    run = rich_run()
    SqliteSerializer(path, None, Rich).serialize(run)
    loaded = SqliteSerializer(path, None, Rich).deserialize()
    assert loaded == run
    assert list(loaded.jobs) == list(run.jobs)
    assert loaded.jobs["0"].context == Rich()
