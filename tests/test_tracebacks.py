"""`Job.traceback`: the traceback of a job's last attempt when it raised, kept in memory
and in every checkpoint format, bounded, cleared by a later attempt that does not
raise; and ``python -m jorbmp status CHECKPOINT --job ID``, which shows it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

import jorbmp
from jorbmp import FAILED, Processor, RateLimitError, Run, State
from jorbmp._execute import TRACE_CHARS, TRACE_FRAMES

pytestmark = pytest.mark.timeout(60)
FORMATS = ["JsonSerializer", "JournalSerializer", "SqliteSerializer"]
SUFFIX = {"JsonSerializer": "json", "JournalSerializer": "journal", "SqliteSerializer": "db"}


class TJ(msgspec.Struct):
    """``fails``: how many attempts raise before one succeeds (-1: all of them);
    ``how``: what the failing attempts do."""

    n: int
    fails: int = 0
    how: str = "raise"
    note: str = ""


# Attempts per (state, job number): thread and async execs run in this process.
ATTEMPTS: dict[tuple[str, int], int] = {}


def _nested(depth: int, message: str) -> None:
    if depth:
        _nested(depth - 1, message)
    raise ValueError(message)


def _attempt(state: str, jc: TJ) -> Any:
    key = (state, jc.n)
    tried = ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if jc.fails < 0 or tried <= jc.fails:
        if jc.how == "deep":
            _nested(60, "deep " + "x" * 20_000 + " end of the message")
        if jc.how == "bad return":
            return "garbage"
        if jc.how == "returned error":
            return jc, state, None, "returned, not raised"
        if jc.how == "rate limited":
            raise RateLimitError("slow down")
        raise KeyError(f"missing key {jc.n}")
    jc.note = f"ok after {tried}"
    return jc, "done"


def thread_exec(ac: Any, oc: Any, jc: TJ) -> Any:
    return _attempt("thread", jc)


async def async_exec(ac: Any, oc: Any, jc: TJ) -> Any:
    return _attempt("async", jc)


def process_exec(ac: Any, oc: Any, jc: TJ) -> Any:
    if jc.fails < 0:
        raise KeyError(f"missing key {jc.n} in a worker")
    return jc, "done"


def serializer(kind: str, tmp_path: Path) -> Any:
    return getattr(jorbmp, kind)(tmp_path / f"run.{SUFFIX[kind]}", job_type=TJ)


def run_of(*jobs: TJ) -> Run[None, TJ]:
    run: Run[None, TJ] = Run("tb", None, TJ)
    for jc in jobs:
        run.add_job(jc)
    return run


def states(kind: str, exec_: Any, retries: int = 2) -> list[State]:
    return [
        State("new", exec_, kind=kind, max_retries=retries, retry_delay=0),
        State("done", terminal=True),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_last_attempts_traceback_is_kept_and_reloaded(fmt: str, tmp_path: Path) -> None:
    ATTEMPTS.clear()
    run = run_of(
        TJ(0, fails=-1),  # always raises: ends in FAILED with its traceback
        TJ(1, fails=1),  # raises once, then succeeds: none
        TJ(2),  # never raises: none
        TJ(3, fails=-1, how="deep"),  # a deep stack and a huge message: bounded
    )
    ser = serializer(fmt, tmp_path)
    Processor(None, states("thread", thread_exec), ser).exec(run)
    assert run.counts() == {FAILED: 2, "done": 2}
    tb = run.jobs["0"].traceback
    assert tb is not None
    assert tb.startswith("Traceback (most recent call last):")
    assert "in _attempt" in tb and 'raise KeyError(f"missing key {jc.n}")' in tb
    assert tb.rstrip().endswith("KeyError: 'missing key 0'")
    assert "_execute.py" not in tb  # jorbmp's own call of the exec is left out
    assert run.jobs["1"].traceback is None and run.jobs["1"].context.note == "ok after 2"
    assert run.jobs["2"].traceback is None
    deep = run.jobs["3"].traceback
    assert deep is not None
    assert len(deep) <= TRACE_CHARS + 40 and "characters cut]" in deep
    assert deep.rstrip().endswith("end of the message")
    assert deep.count('File "') <= TRACE_FRAMES

    loaded = ser.deserialize()
    for job_id in "0123":
        assert loaded.jobs[job_id].traceback == run.jobs[job_id].traceback
    assert loaded == run


def test_sqlite_keeps_it_in_a_column_and_reads_old_databases(tmp_path: Path) -> None:
    ATTEMPTS.clear()
    run = run_of(TJ(0, fails=-1), TJ(1))
    ser = serializer("SqliteSerializer", tmp_path)
    Processor(None, states("thread", thread_exec, retries=0), ser).exec(run)
    with sqlite3.connect(ser.path) as conn:
        rows = conn.execute(
            "select id, json_extract(context, '$.n'), traceback like '%KeyError%' "
            "from jobs where traceback is not null"
        ).fetchall()
        assert rows == [("0", 0, 1)]
        # A database an earlier version wrote has no such column.
        conn.execute("alter table jobs drop column traceback")
    old = ser.deserialize()
    assert old.jobs["0"].traceback is None and old.jobs["0"].state == FAILED
    # It gains the column at its next write, and keeps what it gets.
    old.jobs["0"].traceback = "Traceback (most recent call last):\n  (by hand)\n"
    ser.serialize(old)
    assert ser.deserialize().jobs["0"].traceback == old.jobs["0"].traceback


def second_attempt(ac: Any, oc: Any, jc: TJ) -> Any:
    if jc.how == "bad return":
        return "garbage"
    if jc.how == "returned error":
        return jc, "done", None, "returned, not raised"
    raise KeyError("raised again")


@pytest.mark.parametrize(
    ("how", "state", "kept"),
    [
        ("raise", FAILED, True),
        ("bad return", FAILED, False),  # failed without raising: the last attempt did not raise
        ("returned error", "done", False),  # an error returned is no raise either
    ],
)
def test_each_attempt_replaces_it(how: str, state: str, kept: bool) -> None:
    ATTEMPTS.clear()
    run = run_of(TJ(0, fails=-1))
    Processor(None, states("thread", thread_exec, retries=0)).exec(run)
    first = run.jobs["0"].traceback
    assert first is not None and "missing key 0" in first
    run.redrive(FAILED, "new")
    run.jobs["0"].context.how = how
    Processor(None, states("thread", second_attempt, retries=0)).exec(run)
    assert run.jobs["0"].state == state
    tb = run.jobs["0"].traceback
    assert (tb is not None) is kept
    assert tb is None or "raised again" in tb


def test_a_rate_limit_leaves_it_and_a_success_clears_it() -> None:
    ATTEMPTS.clear()
    run = run_of(TJ(0, fails=-1))
    Processor(None, states("thread", thread_exec, retries=0)).exec(run)
    before = run.jobs["0"].traceback
    assert before is not None
    run.redrive(FAILED, "new")
    assert run.jobs["0"].traceback == before  # kept until the next attempt

    def limited_then_ok(ac: Any, oc: Any, jc: TJ) -> Any:
        ATTEMPTS[("rl", 0)] = ATTEMPTS.get(("rl", 0), 0) + 1
        if ATTEMPTS[("rl", 0)] == 1:
            seen.append(run.jobs["0"].traceback)
            raise RateLimitError("slow down")
        seen.append(run.jobs["0"].traceback)
        return jc, "done"

    seen: list[str | None] = []
    Processor(
        None, [State("new", limited_then_ok, kind="thread"), State("done", terminal=True)]
    ).exec(run)
    assert seen == [before, before]  # the RateLimitError left it in place
    assert run.jobs["0"].traceback is None and run.jobs["0"].state == "done"


@pytest.mark.parametrize("kind", ["async", "process"])
def test_async_and_process_states_keep_it_too(kind: str) -> None:
    ATTEMPTS.clear()
    run = run_of(TJ(0, fails=-1), TJ(1))
    exec_ = async_exec if kind == "async" else process_exec
    Processor(None, states(kind, exec_, retries=0)).exec(run)
    tb = run.jobs["0"].traceback
    assert tb is not None and "KeyError" in tb
    assert ("in _attempt" if kind == "async" else "in process_exec") in tb
    assert run.jobs["1"].traceback is None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jorbmp", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_status_job_prints_one_job(fmt: str, tmp_path: Path) -> None:
    ATTEMPTS.clear()
    run = run_of(TJ(0, fails=-1, note="ünï \u202e"), TJ(1, fails=1))
    run.add_job(TJ(2), state="done")
    ser = serializer(fmt, tmp_path)
    Processor(None, states("thread", thread_exec, retries=1), ser).exec(run)
    out = cli("status", str(ser.path), "--job", "0")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "job '0'" in text and f"state: {FAILED}" in text
    assert "retries: 0" in text and "parent: none" in text
    context = next(line for line in text.splitlines() if line.lstrip().startswith("context:"))
    assert json.loads(context.split("context:", 1)[1]) == {
        "n": 0, "fails": -1, "how": "raise", "note": "ünï \u202e"
    }  # fmt: skip
    assert "errors in 'new' (2):" in text and text.count("KeyError: 'missing key 0'") >= 3
    assert "last traceback" in text and "Traceback (most recent call last):" in text
    assert "\u202e" not in text  # nothing from a checkpoint can reorder the terminal

    out = cli("status", str(ser.path), "--job", "1", "--json")
    assert out.returncode == 0, out.stderr
    one = json.loads(out.stdout)
    assert one["id"] == "1" and one["state"] == "done" and one["traceback"] is None
    assert one["state_errors"] == {"new": ["KeyError: 'missing key 1'"]}
    assert one["context"]["note"] == "ok after 2"

    out = cli("status", str(ser.path), "--job", "nope")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no job 'nope'" in out.stderr


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


def unprintable_exec(ac: Any, oc: Any, jc: TJ) -> Any:
    raise _Unprintable()


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_an_exception_whose_str_raises_is_recorded_on_its_job(kind: str) -> None:
    """Its ``__str__`` raising killed a process state's worker ("worker died (exit code
    1)", no traceback) and, in a thread state, recorded jorbmp's own failure instead."""
    run: Run[None, TJ] = Run("unprintable", job_type=TJ)
    run.add_job(TJ(0))
    states = [
        State("new", unprintable_exec, kind=kind, max_retries=0),
        State("done", terminal=True),
    ]
    Processor(None, states, mp_context="fork").exec(run)
    job = run.jobs["0"]
    assert job.state == FAILED
    assert job.state_errors["new"] == ["_Unprintable: (its str() raised RuntimeError)"]
    assert job.traceback is not None and "unprintable_exec" in job.traceback


def huge_error_exec(ac: Any, oc: Any, jc: TJ) -> Any:
    raise ValueError("x" * 300_000)


def test_status_job_cuts_each_error_text(tmp_path: Path) -> None:
    """A 300 KB error printed whole by ``status --job`` (4 MB for four of them): each is
    cut to a few KB, saying how much more there is; ``--json`` keeps it whole."""
    run: Run[None, TJ] = Run("huge", job_type=TJ)
    run.add_job(TJ(0))
    ser = serializer("JsonSerializer", tmp_path)
    Processor(None, states("thread", huge_error_exec, retries=1), ser).exec(run)
    out = cli("status", str(ser.path), "--job", "0")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) < 30_000 and "more characters: see --json" in out.stdout
    whole = json.loads(cli("status", str(ser.path), "--job", "0", "--json").stdout)
    assert [len(t) for t in whole["state_errors"]["new"]] == [len("ValueError: ") + 300_000] * 2
