"""The status stream: listeners off the coordinator's loop, settled final counts, bars.

A slow listener, one that blocks forever, or tqdm writing into output that stopped
draining must not hold the run up; the first and last updates stay exact; the last
update of every outcome (complete, stopped, abandoned, failed) counts what is true;
tqdm keeps the terminal states' bars when the terminal has too few rows.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import io
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import (
    FAILED,
    NilSerializer,
    Processor,
    Run,
    State,
    StatusCount,
    StatusListener,
    Stopped,
    TqdmStatusListener,
)

# The most `exec` may wait at its end for a listener (jorbmp._mailbox.CLOSE_TIMEOUT).
CLOSE_BOUND = 5.0


class JC(msgspec.Struct):
    n: int = 0
    sleep: float = 0.0


async def asleep(ac: Any, oc: Any, jc: JC) -> Any:
    await asyncio.sleep(jc.sleep)
    return jc, "done"


def tsleep(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(jc.sleep)
    return jc, "done"


def make_run(n: int, sleep: float) -> Run[None, JC]:
    run: Run[None, JC] = Run("stream")
    for i in range(n):
        run.add_job(JC(n=i, sleep=sleep))
    return run


class Recording(StatusListener):
    """Keeps every update it gets, sleeping ``delay`` seconds in each."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.updates: list[list[StatusCount]] = []
        self.closed = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        self.updates.append(list(counts))
        if self.delay:
            time.sleep(self.delay)

    def close(self) -> None:
        self.closed += 1


def timed_exec(listener: StatusListener, n: int = 800, sleep: float = 0.02) -> float:
    # 800 jobs of 20 ms at concurrency 8: about 2 s of work.
    states = [State("new", asleep, concurrency=8), State("done", terminal=True)]
    run = make_run(n, sleep)
    t0 = time.monotonic()
    Processor(None, states, None, listener).exec(run)
    elapsed = time.monotonic() - t0
    assert run.counts() == {"done": n}
    return elapsed


@pytest.mark.timeout(120)
def test_a_slow_listener_does_not_slow_the_run() -> None:
    fast = Recording()
    base = timed_exec(fast)
    slow = Recording(delay=0.5)
    took = timed_exec(slow)
    # 9baee05 called the listener on the loop: 5-9x slower. Now the run pays for the
    # last update (exec waits for it, 0.5 s) and, rarely, one in flight when it ends.
    assert took <= base * 1.3 + 0.6, (base, took, len(slow.updates))
    assert fast.updates[0] == slow.updates[0]  # the first update is exact
    first = {c.state: c for c in slow.updates[0]}
    assert (first["new"].waiting, first["new"].executing, first["done"].completed) == (800, 0, 0)
    last = {c.state: c for c in slow.updates[-1]}
    assert (last["new"].waiting, last["new"].executing, last["new"].processed) == (0, 0, 800)
    assert last["done"].completed == 800
    assert slow.closed == 1
    # Never an older update after a newer one: the counts only grow.
    seen = [({c.state: c for c in u}["done"].completed, u[0].processed) for u in slow.updates]
    assert seen == sorted(seen), seen


class Blocked(StatusListener):
    """Blocks forever (until the test lets it go) in its first update."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        self.calls += 1
        self.release.wait()


@pytest.mark.timeout(60)
def test_a_blocked_listener_delays_the_end_a_bounded_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = Blocked()
    states = [State("new", asleep, concurrency=4), State("done", terminal=True)]
    run = make_run(40, 0.01)
    # A safety net far beyond the bound, so that a listener on the loop (9baee05) makes
    # this test fail rather than hang.
    safety = threading.Timer(30.0, blocked.release.set)
    safety.start()
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="jorbmp"):
            Processor(None, states, None, blocked).exec(run)
        took = time.monotonic() - t0
    finally:
        blocked.release.set()
        safety.cancel()
    assert took < CLOSE_BOUND + 5.0, took
    assert run.counts() == {"done": 40}
    assert blocked.calls == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("did not finish" in r.getMessage() for r in warnings), caplog.records


CHILD = textwrap.dedent(
    """
    import asyncio, logging, os, sys, time
    import msgspec
    from jorbmp import Processor, Run, State, TqdmStatusListener

    class J(msgspec.Struct):
        n: int

    async def step(ac, oc, jc):
        await asyncio.sleep(0.002)
        return jc, "done"

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    run = Run("pipe", None, J)
    for i in range(3000):
        run.add_job(J(n=i))
    listener = TqdmStatusListener(file=sys.stdout, plain=False, ncols=400, mininterval=0)
    states = [State("new", step, concurrency=4), State("done", terminal=True)]
    t0 = time.monotonic()
    Processor(None, states, None, listener).exec(run)
    print(f"FINISHED {run.counts()} {time.monotonic() - t0:.2f}", file=sys.stderr, flush=True)
    os._exit(0)  # stdout is full: flushing it at exit would block
    """
)


@pytest.mark.timeout(120)
def test_tqdm_into_a_pipe_nobody_reads_does_not_stop_the_run(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    err_path = tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with open(err_path, "w") as err:
        child = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err, env=env
        )
        assert child.stdout is not None
        # The smallest pipe buffer (one page): it is full after a few redraws.
        fcntl.fcntl(child.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        try:
            code = child.wait(timeout=45)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            pytest.fail(f"the run stalled on its output: {err_path.read_text()[-2000:]}")
        finally:
            child.stdout.close()
    text = err_path.read_text()
    assert code == 0, text
    assert "FINISHED {'done': 3000}" in text, text
    assert "did not finish" in text, text  # the blocked listener, at WARNING


class FailingSerializer(NilSerializer):
    """Fails a periodic flush once ``after`` seconds have passed (the run fails then);
    the final flush works."""

    def __init__(self, after: float) -> None:
        super().__init__()
        self.after = after
        self.t0 = time.monotonic()

    def begin(self, run: Run[Any, Any]) -> None:
        self.t0 = time.monotonic()
        super().begin(run)

    def flush(self, run: Run[Any, Any], final: bool = False) -> None:
        if not final and time.monotonic() - self.t0 > self.after:
            raise OSError("the disk is on fire")


def tsleep_p(ac: Any, oc: Any, jc: JC) -> Any:  # a process state's exec
    time.sleep(jc.sleep)
    return jc, "done"


EXECS = {"async": asleep, "thread": tsleep, "process": tsleep_p}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outcome", ["complete", "stopped", "abandoned", "failed"])
@pytest.mark.parametrize("kind", ["async", "thread", "process"])
def test_the_last_update_counts_what_is_true(kind: str, outcome: str) -> None:
    rec = Recording()
    run = make_run(12, 0.3 if outcome == "complete" else 2.0)
    states = [State("new", EXECS[kind], kind=kind, concurrency=4), State("done", terminal=True)]
    serializer = FailingSerializer(0.7) if outcome == "failed" else None
    proc = Processor(
        None, states, serializer, rec, grace_period=0.2 if outcome == "abandoned" else 10
    )
    if outcome in ("stopped", "abandoned"):
        threading.Timer(0.7, proc.stop).start()
    got = "complete"
    try:
        proc.exec(run)
    except Stopped:
        got = "stopped"
    except OSError:
        got = "failed"
    assert got == ("stopped" if outcome == "abandoned" else outcome)
    truth = collections.Counter(job.state for job in run.jobs.values())
    expected = {"complete": (0, 12), "stopped": (8, 4), "abandoned": (12, 0), "failed": (12, 0)}
    assert (truth["new"], truth["done"]) == expected[outcome]
    last = {c.state: c for c in rec.updates[-1]}
    assert last["new"].executing == 0, last
    assert last["new"].waiting == truth["new"], last
    assert last["done"].completed == truth["done"], last
    assert last["new"].processed == truth["done"], last
    assert rec.closed == 1


def step(ac: Any, oc: Any, jc: JC) -> Any:
    # Through state_00 .. state_09, then done; every fifth job fails in the last.
    time.sleep(0.005)
    jc.n += 1000
    here = jc.n // 1000 - 1
    if here < 9:
        return jc, f"state_{here + 1:02d}"
    if jc.n % 5 == 0:
        raise ValueError("every fifth")
    return jc, "done"


class Captured(TqdmStatusListener):
    """Keeps what the bars wrote before the listener closed them."""

    def __init__(self, **kwargs: Any) -> None:
        self.buf = io.StringIO()
        self.before_close = ""
        super().__init__(file=self.buf, plain=False, **kwargs)

    def status_update(self, counts: list[StatusCount]) -> None:
        super().status_update(counts)
        self.before_close = self.buf.getvalue()


@pytest.mark.timeout(60)
def test_bars_keep_terminal_states_on_a_short_terminal() -> None:
    # 12 states (10 working, done, failed) on a terminal of 10 rows: tqdm draws 9 bars.
    states = [
        State(f"state_{i:02d}", step, kind="thread", concurrency=4, max_retries=0)
        for i in range(10)
    ]
    states += [State("done", terminal=True), State(FAILED, terminal=True)]
    run: Run[None, JC] = Run("bars")
    for i in range(100):
        run.add_job(JC(n=i), state="state_00")
    bars = Captured(nrows=10, ncols=160, mininterval=0)
    Processor(None, states, None, bars).exec(run)
    assert run.counts() == {"done": 80, FAILED: 20}
    shown = bars.before_close  # what was on screen during the run
    assert "done" in shown and FAILED in shown, shown[-3000:]
    assert "more hidden" not in shown
    assert "(+4 states)" in shown  # state_05 .. state_09, folded into one bar


@pytest.mark.timeout(30)
def test_bars_never_outnumber_the_rows() -> None:
    from jorbmp.progress import _layout  # here: 9baee05 has none, the other tests run

    terminal = [False] * 4 + [True] * 3
    counts = [StatusCount(f"s{i}", terminal=t) for i, t in enumerate(terminal)]
    for rows in range(1, 9):
        bars = _layout(counts, rows)
        assert 1 <= len(bars) <= rows, (rows, bars)  # be5347b: 4 bars on 2 rows
        shown = [i for bar in bars for i in bar]
        assert len(shown) == len(set(shown)), (rows, bars)
        assert {4, 5, 6} <= set(shown), (rows, bars)  # every terminal state, always
        assert all(len({terminal[i] for i in bar}) == 1 for bar in bars), (rows, bars)


@pytest.mark.timeout(60)
def test_bars_fold_terminal_states_on_a_tiny_terminal() -> None:
    # 3 working states and 3 terminal ones, on 3 rows: tqdm draws 2 bars.
    states = [
        State(f"state_{i:02d}", step, kind="thread", concurrency=4, max_retries=0)
        for i in range(7, 10)
    ]
    states += [State("done", terminal=True), State("archived", terminal=True)]
    states.append(State(FAILED, terminal=True))
    run: Run[None, JC] = Run("bars")
    for i in range(100):
        run.add_job(JC(n=7000 + i), state="state_07")
    bars = Captured(nrows=3, ncols=160, mininterval=0)
    Processor(None, states, None, bars).exec(run)
    assert run.counts() == {"done": 80, FAILED: 20}
    shown = bars.before_close
    assert "more hidden" not in shown, shown[-3000:]
    assert "done" in shown and "(2 terminal states)" in shown, shown[-3000:]
    assert "state_0" not in shown, shown[-3000:]  # no row is left for working states


@pytest.mark.timeout(30)
def test_bars_show_the_recent_rate() -> None:
    bars = TqdmStatusListener(file=io.StringIO(), plain=False, ncols=200, mininterval=0)
    out = bars.file
    assert isinstance(out, io.StringIO)
    counts = [
        StatusCount("work", processed=50_000, waiting=10, executing=2, jobs_per_second=7.0),
        StatusCount("done", terminal=True, completed=50_000),
    ]
    bars.status_update(counts)
    time.sleep(0.05)
    bars.status_update(counts)
    text = out.getvalue()
    # The working state's rate is its jobs_per_second (over the last few seconds), not
    # 50,000 jobs over the 50 ms since the bar appeared.
    assert "7.00 execs/s" in text, text
    bars.close()
