"""Metrics of process-state execs that never return: timed out, or killed with their
worker (issue 15 item 8).

Such an exec held its slot until the kill, and the report's mean, p95 and busy share
must count that time, as async states do, so that the bottleneck hint is right.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest

from jorbmp import FAILED, Processor, Run, State

MP = pytest.mark.parametrize("mp_context", ["fork", "spawn"])


class Hang(msgspec.Struct):
    """``sleep`` seconds of exec; then ``exit`` makes the worker die with ``os._exit``."""

    n: int
    sleep: float = 0.0
    exit: bool = False


def hang(ac: object, oc: object, jc: Hang) -> tuple[Hang, str]:
    time.sleep(jc.sleep)
    if jc.exit:
        os._exit(3)
    return jc, "done"


def hanging_run(jobs: int, sleep: float, exit: bool = False) -> Run[None, Hang]:
    run: Run[None, Hang] = Run("killed", None, Hang)
    for i in range(jobs):
        run.add_job(Hang(n=i, sleep=sleep, exit=exit))
    return run


def states(**kwargs: object) -> list[State]:
    return [
        State("new", hang, concurrency=2, max_retries=0, **kwargs),  # type: ignore[arg-type]
        State("done", terminal=True),
    ]


@pytest.mark.timeout(60)
@MP
def test_timed_out_execs_count_their_slot_time(mp_context: str) -> None:
    # 6 execs that would sleep 30 s, killed after 0.5 s, two at a time: each held
    # its slot ~0.5 s (plus the kill and the housekeeping tick that notices it).
    run = hanging_run(6, 30.0)
    proc = Processor(None, states(timeout=0.5), mp_context=mp_context)
    started = time.monotonic()
    proc.exec(run)
    wall = time.monotonic() - started
    assert all(job.state == FAILED for job in run.jobs.values())
    report = proc.last_report
    assert report is not None
    s = report.states[0]
    assert s.execs == 6 and s.errors == 6
    assert 0.45 <= s.mean_seconds <= 5.0, s
    assert s.p95_seconds >= 0.45, s
    # Busy: 6 x >= 0.5 slot-seconds over 2 slots; 0 before the fix.
    assert s.utilisation >= 6 * 0.45 / (2 * wall) * 0.9, (s, wall)
    assert report.bottleneck == "new"


@pytest.mark.timeout(60)
@MP
def test_execs_whose_worker_dies_count_their_slot_time(mp_context: str) -> None:
    # Each exec sleeps 0.4 s and then kills its worker: "worker died", charged 0.4 s.
    run = hanging_run(4, 0.4, exit=True)
    proc = Processor(None, states(), mp_context=mp_context)
    proc.exec(run)
    for job in run.jobs.values():
        assert job.state == FAILED
        assert "worker died (exit code 3)" in job.state_errors["new"][0]
    report = proc.last_report
    assert report is not None
    s = report.states[0]
    assert s.execs == 4
    assert 0.35 <= s.mean_seconds <= 5.0, s
    assert s.utilisation > 0.1, s
