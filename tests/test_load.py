"""Batching that responds to load (issue 16, item 4): when the coordinator falls behind,
messages carry more jobs, and fewer messages come back.

The meter is tested on stepped clocks; the engine with a real run whose event loop an
async exec keeps busy, so that the coordinator is behind on any machine.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import Processor, Run, State
from jorbmp._load import HIGH, LOW, MAX_SCALE, WINDOW_SECONDS, LoadMeter
from jorbmp._pool import ProcessPool


class Clocks:
    """A wall clock and a CPU clock the test steps."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0

    def step(self, seconds: float, busy: float) -> None:
        self.wall += seconds
        self.cpu += seconds * busy


def run_meter(meter: LoadMeter, clocks: Clocks, seconds: float, busy: float, late: float = 0.0):
    """Tick every 0.1 s for ``seconds``, the loop on the CPU ``busy`` of the time and each
    tick ``late`` seconds late; the scales after each tick."""
    scales = []
    for _ in range(round(seconds / 0.1)):
        clocks.step(0.1, busy)
        scales.append(meter.tick(late))
    return scales


def meter() -> tuple[LoadMeter, Clocks]:
    clocks = Clocks()
    return LoadMeter(lambda: clocks.wall, lambda: clocks.cpu), clocks


def test_a_busy_loop_doubles_the_scale_once_per_window_up_to_the_cap() -> None:
    m, clocks = meter()
    scales = run_meter(m, clocks, WINDOW_SECONDS * 0.8, busy=0.95)
    assert set(scales) == {1}, "no decision before a window has passed"
    scales = run_meter(m, clocks, 20 * WINDOW_SECONDS, busy=0.95)
    assert scales[-1] == MAX_SCALE and m.peak == MAX_SCALE
    steps = [b for a, b in zip([1, *scales], scales, strict=False) if b != a]
    assert steps == [2, 4, 8]  # one doubling per window


def test_an_idle_loop_halves_it_back_to_one_and_the_middle_holds() -> None:
    m, clocks = meter()
    run_meter(m, clocks, 10 * WINDOW_SECONDS, busy=0.9)
    assert m.scale == MAX_SCALE
    middle = (HIGH + LOW) / 2
    assert set(run_meter(m, clocks, 10 * WINDOW_SECONDS, busy=middle)) == {MAX_SCALE}
    run_meter(m, clocks, 10 * WINDOW_SECONDS, busy=LOW / 2)
    assert m.scale == 1


def test_late_ticks_count_as_load_a_starved_loop_is_behind_too() -> None:
    """40% on the CPU and each 0.1 s tick 50 ms late: the loop wanted to run 90% of the
    time (its cores taken by the workers it feeds)."""
    m, clocks = meter()
    run_meter(m, clocks, 4 * WINDOW_SECONDS, busy=0.4, late=0.05)
    assert m.scale > 1 and m.pressure == pytest.approx(0.9)
    m2, clocks2 = meter()
    run_meter(m2, clocks2, 4 * WINDOW_SECONDS, busy=0.4)
    assert m2.scale == 1


def test_odd_clocks_change_nothing_wrongly() -> None:
    m, clocks = meter()
    for _ in range(50):  # a clock that does not move; a CPU clock that goes back
        assert m.tick(5.0) == 1
    clocks.cpu -= 3.0
    run_meter(m, clocks, 2 * WINDOW_SECONDS, busy=0.0, late=-1.0)  # (negative: early)
    assert m.scale == 1 and 0.0 <= m.pressure < LOW
    run_meter(m, clocks, 2 * WINDOW_SECONDS, busy=0.0, late=10.0)  # late: at most the tick
    assert m.pressure <= 1.0 + 1e-9


class Task(msgspec.Struct):
    n: int


class Seen:
    """The AC: the largest batch the pool sent, and results messages against jobs."""

    def __init__(self) -> None:
        self.largest = 0
        self.scales: set[int] = set()
        self.report: Any = None


def sleep_job(ac: Any, oc: Any, jc: Task) -> tuple[Task, str]:
    time.sleep(0.02)
    return jc, "done"


async def hog(ac: Seen, oc: Any, jc: Task) -> tuple[Task, str]:
    """Keep the coordinator's loop on the CPU ~98% of the time while the pool's jobs
    run (long spins: on a loaded machine the meter sees a starved loop by its late
    ticks), and watch the batches it sends."""
    pool = None
    while pool is None:
        pools = [o for o in gc.get_objects() if type(o) is ProcessPool and not o.closing]
        pool = pools[0] if pools else None
        await asyncio.sleep(0.001)
    lane: Any = pool.sink
    while lane.count and not pool.closing:
        if jc.n:
            end = time.thread_time() + 0.049
            while time.thread_time() < end:
                pass
        for worker in pool.workers:
            for batch in worker.batches:
                ac.largest = max(ac.largest, len(batch))
        ac.scales.add(lane.batch_scale())
        await asyncio.sleep(0.001)
    return jc, "done"


def run_with(
    hogging: bool, work: Any = sleep_job, jobs: int = 2000, log: str = ""
) -> tuple[Seen, int, int]:
    """``jobs`` jobs of 20 ms at concurrency 8 (one job per batch by time alone), beside
    the hog; returns what it saw, and the batches the pool sent, and the jobs."""
    seen = Seen()
    run: Run[Any, Task] = Run("load", log or None, Task)
    run.add_job(Task(1 if hogging else 0), state="hog")
    for n in range(jobs):
        run.add_job(Task(n), state="work")
    sent = [0]
    original = ProcessPool._send

    def counted(self: ProcessPool, worker: Any, batch: Any) -> None:
        sent[0] += 1
        original(self, worker, batch)

    ProcessPool._send = counted  # type: ignore[method-assign]
    try:
        processor = Processor(
            seen,
            [
                State("hog", hog, kind="async"),
                State("work", work, concurrency=8),
                State("done", terminal=True),
            ],
        )
        processor.exec(run)
        seen.report = processor.last_report
    finally:
        ProcessPool._send = original  # type: ignore[method-assign]
    assert all(job.state == "done" for job in run.jobs.values())
    return seen, sent[0], jobs


@pytest.mark.timeout(180)
def test_a_coordinator_behind_sends_bigger_batches() -> None:
    calm, calm_sent, jobs = run_with(hogging=False)
    if calm.scales == {1}:  # (a loaded machine may leave even this loop behind)
        assert calm.largest == 1
        assert calm_sent >= jobs  # one message per 20 ms job
    busy, busy_sent, jobs = run_with(hogging=True)
    assert max(busy.scales) > 1, busy.scales
    report = busy.report
    assert report is not None and report.batch_scale == max(busy.scales)
    assert f"batches held up to {report.batch_scale}x" in str(report)
    assert busy.largest > 1
    assert busy_sent < 0.8 * jobs, (busy_sent, jobs)


def slow_log_then_die(ac: Any, oc: str, jc: Task) -> tuple[Task, str]:
    """12 ms jobs that note each exec; every 150th kills its worker once, mid-batch."""
    with open(oc, "a") as f:
        f.write(f"{jc.n}\n")
    if jc.n % 150 == 75 and not os.path.exists(f"{oc}.{jc.n}"):
        open(f"{oc}.{jc.n}", "w").close()
        os._exit(9)
    time.sleep(0.012)
    return jc, "done"


@pytest.mark.timeout(180)
def test_a_worker_death_under_load_reruns_no_finished_slow_job(tmp_path: Path) -> None:
    """Bigger batches under load must not hold finished jobs' results back longer: a
    job of 12 ms still reports on its own, so a death re-runs only the job it killed
    (with results held for a whole scaled batch, 9 finished jobs ran twice)."""
    log = tmp_path / "log"
    busy, _, jobs = run_with(hogging=True, work=slow_log_then_die, jobs=900, log=str(log))
    assert max(busy.scales) > 1, busy.scales
    counts = Counter(int(line) for line in log.read_text().split())
    assert set(counts) == set(range(jobs))
    twice = sorted(n for n, c in counts.items() if c > 1)
    assert twice == [n for n in range(jobs) if n % 150 == 75], twice
