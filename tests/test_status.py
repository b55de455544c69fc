"""Status updates: exact first and last, coalesced in between, metrics, listeners."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import threading
import time
from typing import Any

import msgspec
import pytest

from jorbmp import (
    FAILED,
    NilStatusListener,
    Processor,
    Run,
    State,
    StatusCount,
    StatusListener,
    TqdmStatusListener,
)

pytestmark = pytest.mark.timeout(60)


class JC(msgspec.Struct):
    n: int = 0


def slow(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.01)
    return jc, "middle"


def boom_odd(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.n % 2:
        raise ValueError("odd")
    return jc, "done"


STATES = [
    State("new", slow, concurrency=2),
    State("middle", boom_odd, concurrency=2, max_retries=0),
    State("done", terminal=True),
]


def make_run(n: int) -> Run[None, JC]:
    run: Run[None, JC] = Run("status")
    for i in range(n):
        run.add_job(JC(n=i))
    return run


def test_first_and_last_updates_are_exact_and_in_state_order(listener: Any) -> None:
    Processor(None, STATES, None, listener).exec(make_run(100))
    first, last = listener.updates[0], listener.updates[-1]
    assert [c.state for c in first] == ["new", "middle", "done", FAILED]
    assert [c.terminal for c in first] == [False, False, True, True]
    assert first[0] == StatusCount("new", waiting=100, concurrency=2)
    assert (first[1].waiting, first[2].completed, first[3].completed) == (0, 0, 0)
    by = {c.state: c for c in last}
    assert by["done"].completed == 50 and by[FAILED].completed == 50
    assert by["new"].processed == 100 and by["new"].errors == 0
    assert by["middle"].processed == 100 and by["middle"].errors == 50
    assert by["new"].executing == by["new"].waiting == 0
    assert 0.005 < by["new"].mean_seconds < 1.0
    assert listener.closed == 1


def test_updates_are_coalesced_and_consistent(listener: Any) -> None:
    start = time.monotonic()
    Processor(None, STATES, None, listener).exec(make_run(300))
    elapsed = time.monotonic() - start
    assert len(listener.updates) <= elapsed * 10 + 5
    for counts in listener.updates:
        total = sum(c.completed + c.executing + c.waiting for c in counts)
        assert total == 300
        for c in counts:
            assert c.executing <= 2
            if c.terminal:
                assert c.executing == c.waiting == 0


def test_cpu_and_memory_are_measured_for_process_states(listener: Any) -> None:
    run = make_run(6)
    Processor(
        None, [State("new", burn, concurrency=2), State("done", terminal=True)], None, listener
    ).exec(run)
    peak_cpu = max(c.cpu_percent for u in listener.updates for c in u if c.state == "new")
    peak_rss = max(c.rss_bytes for u in listener.updates for c in u if c.state == "new")
    assert peak_cpu > 20
    assert peak_rss > 1_000_000


def test_a_short_run_reports_all_of_its_workers_cpu() -> None:
    # Shorter than one psutil sample period: the only sample is the final one, and the
    # workers' CPU time counts from their start (they were not sampled at the start).
    run = make_run(2)
    proc = Processor(None, [State("new", burn, concurrency=2), State("done", terminal=True)])
    proc.exec(run)
    report = proc.last_report
    assert report is not None
    new = next(s for s in report.states if s.state == "new")
    # Two workers burning 0.5 s of CPU each.
    assert new.cpu_percent * report.wall_seconds / 100 > 0.9, (new, report.wall_seconds)


def burn(ac: Any, oc: Any, jc: JC) -> Any:
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
    return jc, "done"


class Raising(StatusListener):
    def __init__(self) -> None:
        self.calls = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        self.calls += 1
        raise RuntimeError("listener bug")


def test_a_listener_that_raises_is_logged_not_fatal(caplog: Any) -> None:
    listener = Raising()
    run = make_run(10)
    with caplog.at_level(logging.ERROR, logger="jorbmp"):
        Processor(None, STATES, None, listener).exec(run)
    assert run.counts() == {"done": 5, FAILED: 5}
    assert listener.calls >= 2
    assert any("listener bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_nil_listener_accepts_updates() -> None:
    NilStatusListener().status_update([StatusCount("x")])


def test_tqdm_listener_draws_one_bar_per_state_and_closes() -> None:
    out = io.StringIO()
    listener = TqdmStatusListener(file=out, plain=False)
    threads = set(threading.enumerate())
    Processor(None, STATES, None, listener).exec(make_run(20))
    text = out.getvalue()
    for name in ("new", "middle", "done", FAILED):
        assert name in text
    assert "10/20" in text  # terminal bars: arrived out of all jobs
    # Working bars count execs, terminal bars jobs, with no ETA (failed never gets
    # all 20): tqdm's ``<00:00`` (elapsed<remaining) only on no bar.
    assert " execs [" in text and " jobs/s" in text
    assert not re.search(r"\[\d\d:\d\d<", text), text
    assert "\r" in text
    assert listener.bars == []
    # No thread is left behind (tqdm's monitor would be): a later run's workers are
    # forked from a process with no other thread. (The listener's thread resolves the
    # run's wait just before it returns: on a loaded host it may take a moment to end.)
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(threading.enumerate()) - threads == set()


def test_tqdm_listener_writes_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()  # not a tty: plain lines, no carriage returns
    listener = TqdmStatusListener(file=out)
    Processor(None, STATES, None, listener).exec(make_run(20))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 2 <= len(lines) <= 4  # the first update, then the last one (a short run)
    assert lines[-1].startswith("[jorbmp")
    # Each figure after its label; a working state counts execs, a terminal one jobs.
    assert "new: execs=20 running=0/2 waiting=0 rate=" in lines[-1]  # (running / the limit)
    assert "done: jobs=10/20 | failed: jobs=10/20" in lines[-1]


def test_tqdm_listener_draws_bars_on_a_terminal_that_reports_no_size() -> None:
    leader, follower = pty.openpty()  # a fresh pty reports 0 columns and 0 rows
    try:
        with open(follower, "w", closefd=False) as tty:
            listener = TqdmStatusListener(file=tty)
            Processor(None, STATES, None, listener).exec(make_run(20))
            tty.flush()
        data = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if not ready:
                break
            data += os.read(leader, 65536)
    finally:
        os.close(leader)
        os.close(follower)
    text = data.decode(errors="replace")
    assert listener.plain is False
    for name in ("new", "middle", "done", FAILED):
        assert f"{name}" in text
    assert "10/20" in text
