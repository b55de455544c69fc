"""The run report's bottleneck hint names what really held the run up (issue 19, item
7): a rate limit, retry delays (a Retry-After), or an I/O state's full slots, not only
the busiest state's workers. Real runs; the checks name the state and the cause, not
timings."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgspec
import pytest

from jorbmp import Processor, RateLimitError, Run, State, Stopped

pytestmark = pytest.mark.timeout(60)


class JC(msgspec.Struct):
    n: int


def prep(ac: Any, oc: Any, jc: JC) -> Any:
    """A third of the run or so busy: the busiest state by its workers."""
    time.sleep(0.04)
    return jc, "api"


async def call(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, "done"


_limited: set[int] = set()


async def call_429(ac: Any, oc: Any, jc: JC) -> Any:
    """Every job's first call is answered 429 with Retry-After: 1.5."""
    if jc.n not in _limited:
        _limited.add(jc.n)
        raise RateLimitError("429 Too Many Requests", retry_after=1.5)
    return jc, "done"


async def call_slow(ac: Any, oc: Any, jc: JC) -> Any:
    await asyncio.sleep(0.1)
    return jc, "done"


def execute(api: State, jobs: int = 20) -> Any:
    run: Run[None, JC] = Run("hint", None, JC)
    for n in range(jobs):
        run.add_job(JC(n=n))
    states = [State("new", prep, kind="thread"), api, State("done", terminal=True)]
    processor = Processor(None, states)
    processor.exec(run)
    assert run.counts() == {"done": jobs}
    return processor.last_report


def test_a_rate_limit_that_sets_the_pace_is_named() -> None:
    """The issue's case: a state busy a third of the run beside an async state that
    waited seconds on its rate limit got "no state was saturated"."""
    report = execute(State("api", call, concurrency=8, rate_limit=8))
    api = next(s for s in report.states if s.state == "api")
    assert api.rate_wait_seconds > 1.0, report
    assert report.bottleneck == "api", str(report)
    assert "'api'" in report.hint and "rate limit" in report.hint, report.hint


def test_waiting_out_retry_after_is_named() -> None:
    _limited.clear()
    report = execute(State("api", call_429, concurrency=8))
    api = next(s for s in report.states if s.state == "api")
    # Every job waited 1.5 s; the run had nothing else to do for most of that.
    assert api.delay_wait_seconds >= 1.0, report
    assert report.bottleneck == "api", str(report)
    assert "'api'" in report.hint and "retry delays" in report.hint, report.hint
    assert "retry wait" in str(report)  # a column, only where there were delays


def test_an_io_state_with_its_slots_full_is_named() -> None:
    report = execute(State("api", call_slow, concurrency=2), jobs=30)
    assert report.bottleneck == "api", str(report)
    assert "slots were full" in report.hint and "raise its concurrency" in report.hint


_held_long: set[int] = set()


async def call_one_429(ac: Any, oc: Any, jc: JC) -> Any:
    """Job 0's first call gets Retry-After: 30 s; the others pass at once."""
    if jc.n == 0 and 0 not in _held_long:
        _held_long.add(0)
        raise RateLimitError("429", retry_after=30)
    return jc, "done"


def test_one_job_waiting_out_a_delay_beside_busy_work_is_not_the_bottleneck() -> None:
    """Only time the run had nothing else to do counts: one job held while the others
    flow through a busy state does not make retry delays the hint (the first part:
    where delays did hold the run up, they are named)."""
    test_waiting_out_retry_after_is_named()
    _held_long.clear()
    run: Run[None, JC] = Run("hint", None, JC)
    for n in range(40):
        run.add_job(JC(n=n))
    states = [
        State("new", prep, kind="thread"),
        State("api", call_one_429, concurrency=8),
        State("done", terminal=True),
    ]
    processor = Processor(None, states)
    stopper = threading.Timer(2.5, processor.stop)  # job 0 would wait 30 s
    stopper.start()
    try:
        with pytest.raises(Stopped):
            processor.exec(run)
    finally:
        stopper.cancel()
    report = processor.last_report
    assert report.bottleneck == "new", str(report)
    assert "retry" not in report.hint, report.hint
