"""The end of a run waits for its listener without blocking, and a second Ctrl-C cuts it.

`exec` waits a bounded time for the listener's last update and close. That wait must
leave an application's event loop running (`exec_async`), end at once on a second
Ctrl-C or when `exec_async` is cancelled, and never let two threads call one listener
at once (a listener left behind by one run and used again by the next). A listener
raising `SystemExit` must not lose the updates and the close that follow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_status import JC, StuckAfterFirst, make_run

from jorbmp import Processor, State, StatusCount, StatusListener

# The most `exec` waits at its end for a listener (jorbmp._mailbox.CLOSE_TIMEOUT).
CLOSE_BOUND = 5.0
# Far beyond every bound: a listener called on the loop (9baee05) blocks it until then,
# so that the old code fails these tests instead of hanging them.
SAFETY = 25.0


def tstep(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.005)
    return jc, "done"


def states() -> list[State]:
    return [State("new", tstep, kind="thread", concurrency=4), State("done", terminal=True)]


@pytest.mark.timeout(90)
def test_exec_async_waits_for_the_listener_without_blocking_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = StuckAfterFirst()
    safety = threading.Timer(SAFETY, listener.release.set)
    safety.start()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def main() -> float:
        tick = asyncio.create_task(ticker())
        run = make_run(100)
        t0 = time.monotonic()
        await Processor(None, states(), None, listener).exec_async(run)
        took = time.monotonic() - t0
        assert run.counts() == {"done": 100}
        await asyncio.sleep(0.1)  # the ticker measures the gap that ends now, if any
        tick.cancel()
        return took

    try:
        with caplog.at_level(logging.WARNING, logger="jorbmp"):
            took = asyncio.run(main())
    finally:
        listener.release.set()
        safety.cancel()
    # The app's other task kept running through the whole wait: 9baee05 and be5347b
    # stalled the loop (forever, and for the 5 s of the wait).
    assert max(gaps) < 1.0, max(gaps)
    assert took < CLOSE_BOUND + 5.0, took
    assert any("did not finish" in r.getMessage() for r in caplog.records), caplog.records


@pytest.mark.timeout(90)
def test_cancelling_exec_async_ends_the_listener_wait_at_once() -> None:
    listener = StuckAfterFirst()
    safety = threading.Timer(SAFETY, listener.release.set)
    safety.start()

    async def main() -> float:
        task = asyncio.ensure_future(
            Processor(None, states(), None, listener).exec_async(make_run(40))
        )
        await asyncio.sleep(1.0)  # the run (0.05 s of work) is over: exec waits
        assert not task.done()
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    try:
        after_cancel = asyncio.run(main())
    finally:
        listener.release.set()
        safety.cancel()
    assert after_cancel < 1.5, after_cancel


CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import msgspec
    from jorbmp import Processor, Run, State, StatusListener

    class J(msgspec.Struct):
        n: int = 0

    def step(ac, oc, jc):
        time.sleep(0.01)
        return jc, "done"

    class Stuck(StatusListener):
        def __init__(self):
            self.calls = 0
        def status_update(self, counts):
            self.calls += 1
            if self.calls > 1:
                threading.Event().wait()  # forever, from the second update on

    run = Run("r", None, J)
    for i in range(40):
        run.add_job(J(n=i))
    states = [State("new", step, kind="thread", concurrency=4), State("done", terminal=True)]
    proc = Processor(None, states, None, Stuck())
    t0 = time.monotonic()

    def send():
        for what in sys.argv[1:]:
            name, at = what.split("@")
            time.sleep(max(0.0, float(at) - (time.monotonic() - t0)))
            print(f"SENT {name} {time.monotonic() - t0:.3f}", flush=True)
            if name == "stop":
                proc.stop()
            else:
                os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=send, daemon=True).start()
    try:
        proc.exec(run)
        print("RETURNED", flush=True)
    except BaseException as e:
        print(f"RAISED {type(e).__name__} {time.monotonic() - t0:.3f} {run.counts()}", flush=True)
    os._exit(0)
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "plan",
    [
        ["sigint@0.8", "sigint@1.2"],  # the run (0.1 s) is over: both come in the wait
        ["stop@0.03", "sigint@0.8", "sigint@1.2"],  # stopped, then Ctrl-C twice
    ],
    ids=["sigint-twice", "stop-then-sigint-twice"],
)
def test_a_second_ctrl_c_ends_the_listener_wait_at_once(tmp_path: Path, plan: list[str]) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        out = subprocess.run(
            [sys.executable, str(script), *plan],
            capture_output=True,
            text=True,
            env=env,
            timeout=45,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"exec never returned after two SIGINTs: {exc.stdout!r}")
    lines = out.stdout.splitlines()
    sent = [float(line.split()[2]) for line in lines if line.startswith("SENT sigint")]
    raised = [line.split() for line in lines if line.startswith("RAISED")]
    assert len(sent) == 2 and raised, out
    assert raised[0][1] == "KeyboardInterrupt", out
    # Within moments of the second SIGINT, not at the end of the 5 s wait (be5347b),
    # nor never (9baee05: the listener was called on the loop).
    assert float(raised[0][2]) - sent[1] < 1.5, out
    assert "'done': 40" in out.stdout or "stop" in plan[0], out


class Reused(StatusListener):
    """Records (run, what, thread) for every call; blocks in run 1's last update until
    released; counts calls that overlap."""

    def __init__(self) -> None:
        self.run = 0
        self.calls: list[tuple[int, str, int]] = []
        self.inside = 0
        self.overlaps = 0
        self.release = threading.Event()
        self.lock = threading.Lock()

    def _enter(self, what: str) -> None:
        with self.lock:
            self.inside += 1
            self.overlaps += self.inside > 1
            self.calls.append((self.run, what, threading.get_ident()))

    def _leave(self) -> None:
        with self.lock:
            self.inside -= 1

    def status_update(self, counts: list[StatusCount]) -> None:
        self._enter(f"update {counts[1].completed}")
        try:
            if self.run == 1 and counts[1].completed == 20:
                self.release.wait()
            time.sleep(0.01)  # wide enough for an overlap to show
        finally:
            self._leave()

    def close(self) -> None:
        self._enter("close")
        self._leave()


@pytest.mark.timeout(120)
def test_a_listener_left_behind_and_reused_is_never_called_twice_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = Reused()
    safety = threading.Timer(SAFETY, listener.release.set)
    safety.start()
    took: list[float] = []
    try:
        with caplog.at_level(logging.WARNING, logger="jorbmp"):
            for n in (1, 2):
                listener.run = n
                run = make_run(20)
                t0 = time.monotonic()
                Processor(None, states(), None, listener).exec(run)
                took.append(time.monotonic() - t0)
                assert run.counts() == {"done": 20}
            # Run 2 ended while run 1's call was still stuck: it did not hang either.
            listener.release.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and listener.calls[-1][:2] != (2, "close"):
                time.sleep(0.05)
    finally:
        listener.release.set()
        safety.cancel()
    assert took[0] < CLOSE_BOUND + 4.0, took  # 9baee05: stuck until the safety net
    assert took[1] < CLOSE_BOUND + 4.0, took
    assert listener.overlaps == 0, listener.calls
    runs = [r for r, _, _ in listener.calls]
    assert runs == sorted(runs), listener.calls  # run 1's calls never come after run 2's
    # Run 1's thread dropped its close (run 2 had begun): run 2's thread closed the
    # listener for it, before run 2's first update; run 2 got its last update and close.
    assert (1, "close") not in [c[:2] for c in listener.calls], listener.calls
    second = [c[1] for c in listener.calls if c[0] == 2]
    assert second[0] == "close" and second.count("close") == 2, listener.calls
    assert second[-2:] == ["update 20", "close"], listener.calls
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "still in a call from another run" in text, text
    assert "the later run closes the listener for it" in text, text


class Exiting(StatusListener):
    """Raises SystemExit in every update and in close."""

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.closed = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        self.updates.append(counts[1].completed)
        raise SystemExit(3)

    def close(self) -> None:
        self.closed += 1
        raise SystemExit(4)


@pytest.mark.timeout(60)
def test_a_listener_raising_system_exit_keeps_getting_updates_and_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = Exiting()
    run = make_run(200)
    with caplog.at_level(logging.ERROR, logger="jorbmp"):
        Processor(None, states(), None, listener).exec(run)  # 9baee05: SystemExit here
    assert run.counts() == {"done": 200}
    # be5347b: the thread died in the first update: [0], and no close.
    assert listener.updates[0] == 0 and listener.updates[-1] == 200, listener.updates
    assert listener.closed == 1
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("in close" in r.getMessage() for r in logged), logged
