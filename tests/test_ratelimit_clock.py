"""Retry-After waits follow the monotonic clock (review of b06c975, c_clock case 2): a
step of the wall clock while a job waits out its Retry-After neither stretches nor
cuts the wait. The job's ``not_before`` stays wall time, for a resume elsewhere.

A real run: ``time.time`` itself is stepped (pytest's monkeypatch restores it)."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
import pytest

from jorbmp import Processor, RateLimitError, Run, State, Stopped

pytestmark = pytest.mark.timeout(60)


class J(msgspec.Struct):
    n: int


@pytest.mark.parametrize("step", [-60.0, 60.0])
def test_a_wall_clock_step_does_not_move_a_retry_after_wait(
    monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    """At b06c975 a step back of 60 s delayed the retry by 60 s (the run was stopped
    at 12 s with the job still waiting); a step forward must not cut it either."""
    real_time = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])
    first: list[float] = []
    retried: list[float] = []

    async def ex(ac: Any, oc: Any, jc: J) -> tuple[J, str]:
        if not first:
            first.append(time.monotonic())
            # The wall clock steps while the job waits out its Retry-After.
            threading.Timer(0.3, lambda: offset.__setitem__(0, step)).start()
            raise RateLimitError("429", retry_after=1.0)
        retried.append(time.monotonic())
        return jc, "done"

    run = Run("c", None, J)
    run.add_job(J(n=0))
    proc = Processor(None, [State("new", ex), State("done", terminal=True)])
    stopper = threading.Timer(20.0, proc.stop)
    stopper.start()
    try:
        proc.exec(run)
    except Stopped:
        pass
    finally:
        stopper.cancel()
    assert run.counts() == {"done": 1}
    assert 0.95 <= retried[0] - first[0] <= 10.0
