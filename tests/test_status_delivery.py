"""How the listener's thread delivers: whatever a listener is, and however it behaves.

A listener whose methods have no ``__name__`` (a ``functools.partial``, a callable
object, a Mock) and raise must be logged like any other, not end the delivery; one
slow call (an output paused for a moment) must not hold up the updates long after it,
while a listener that is always slow still gets a bounded share of the time; a
listener that starts a run with itself from inside a call is refused at once.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from typing import Any

import msgspec
import pytest

from jorbmp import Processor, Run, State, StatusCount, StatusListener

# The most `exec` waits at its end for a listener (jorbmp._mailbox.CLOSE_TIMEOUT).
CLOSE_BOUND = 5.0


class JC(msgspec.Struct):
    n: int = 0
    sleep: float = 0.005


def tstep(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(jc.sleep)
    return jc, "done"


def states(concurrency: int = 4) -> list[State]:
    return [
        State("new", tstep, kind="thread", concurrency=concurrency),
        State("done", terminal=True),
    ]


def make_run(n: int, sleep: float = 0.005, name: str = "delivery") -> Run[None, JC]:
    run: Run[None, JC] = Run(name)
    for i in range(n):
        run.add_job(JC(n=i, sleep=sleep))
    return run


class _RaisingClose:
    """A callable object, with no ``__name__``, that raises."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        raise RuntimeError("close failed")


class Nameless(StatusListener):
    """Its methods are a partial and a callable object: neither has ``__name__``."""

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.status_update = functools.partial(self._update, "tag")  # type: ignore[method-assign]
        self.close = _RaisingClose()  # type: ignore[method-assign]

    def _update(self, tag: str, counts: list[StatusCount]) -> None:
        self.updates.append(counts[1].completed)
        raise ValueError(f"{tag}: every update fails")


@pytest.mark.timeout(60)
def test_a_raising_listener_without_names_keeps_getting_updates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = Nameless()
    died: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(repr(args.exc_value))
    try:
        run = make_run(200)
        with caplog.at_level(logging.ERROR, logger="jorbmp"):
            Processor(None, states(), None, listener).exec(run)
    finally:
        threading.excepthook = previous
    assert run.counts() == {"done": 200}
    # 64d858c: logging the first error read method.__name__, which raised in the
    # except block and ended the thread: updates [0], no close, an AttributeError.
    assert died == []
    assert listener.updates[0] == 0 and listener.updates[-1] == 200, listener.updates
    assert listener.close.calls == 1
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("raised in status_update" in m for m in messages), messages
    assert any("raised in close" in m for m in messages), messages


class Hiccup(StatusListener):
    """Fast, except that call number ``slow_call`` takes ``slow`` seconds, or every
    call takes ``every`` seconds; records when each call starts and ends."""

    def __init__(self, slow_call: int = 0, slow: float = 0.0, every: float = 0.0) -> None:
        self.slow_call, self.slow, self.every = slow_call, slow, every
        self.calls: list[tuple[float, float]] = []

    def status_update(self, counts: list[StatusCount]) -> None:
        start = time.monotonic()
        if len(self.calls) + 1 == self.slow_call:
            time.sleep(self.slow)  # the terminal paused (Ctrl-S), then resumed
        elif self.every:
            time.sleep(self.every)
        self.calls.append((start, time.monotonic()))


@pytest.mark.timeout(90)
def test_one_slow_call_does_not_hold_up_the_updates_after_it() -> None:
    # 400 jobs of 50 ms at concurrency 4: about 5 s, an update every 0.1 s. The third
    # update takes 1.5 s and ends about 1.7 s in.
    listener = Hiccup(slow_call=3, slow=1.5)
    run = make_run(400, sleep=0.05)
    Processor(None, states(), None, listener).exec(run)
    assert run.counts() == {"done": 400}
    assert len(listener.calls) > 3, listener.calls
    after = listener.calls[3][0] - listener.calls[2][1]
    # 64d858c paused 4 x 1.5 s = 6 s: nothing until the last update, 3 s later. Now
    # the next update comes at the next tick (0.1 s; generous for a loaded host).
    assert after < 1.0, (after, listener.calls[:6])
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(listener.calls[3:])]
    assert max(gaps, default=0.0) < 1.0, gaps


@pytest.mark.timeout(90)
def test_a_listener_slow_in_every_call_gets_a_bounded_share_of_the_time() -> None:
    listener = Hiccup(every=0.2)
    run = make_run(400, sleep=0.05)
    t0 = time.monotonic()
    Processor(None, states(), None, listener).exec(run)
    took = time.monotonic() - t0
    busy = sum(end - start for start, end in listener.calls)
    # About 1 / (1 + PAUSE_FACTOR) = 20% of the run, plus the pinned first and last
    # updates and the first calls before the cost is known; without a pause, ~100%.
    assert busy / took < 0.45, (busy, took, len(listener.calls))


class SubRunner(StatusListener):
    """Runs a sub-run with itself as its listener from inside its first update."""

    def __init__(self) -> None:
        self.updates: list[int] = []  # states per update
        self.inner: tuple[float, str] | None = None  # how long, and what it raised
        self.closed = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        self.updates.append(len(counts))
        if self.inner is None:
            inner = [*states(), State("archived", terminal=True)]  # one state more
            t0 = time.monotonic()
            try:
                Processor(None, inner, None, self).exec(make_run(5, name="inner"))
                what = "returned"
            except RuntimeError as exc:
                what = str(exc)
            self.inner = (time.monotonic() - t0, what)

    def close(self) -> None:
        self.closed += 1


@pytest.mark.timeout(60)
def test_a_listener_starting_a_run_with_itself_is_refused_at_once() -> None:
    listener = SubRunner()
    run = make_run(100, sleep=0.01)
    Processor(None, states(), None, listener).exec(run)
    assert run.counts() == {"done": 100}
    assert listener.inner is not None
    took, what = listener.inner
    # 64d858c: the sub-run waited 5 s for the outer call (it holds the listener's
    # lock) and returned, its updates and close delivered later, into the outer run.
    assert "started a run with itself" in what and "another listener" in what, what
    assert took < 1.0, took
    assert len(set(listener.updates)) == 1, listener.updates  # only the outer run's
    assert listener.closed == 1
