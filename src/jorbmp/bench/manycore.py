"""The ``manycore`` scenario: how well one coordinator feeds many workers.

A big machine, seen from a small one: execs that ``time.sleep(t)`` use no CPU, so
each sleeping worker stands in for a job running on a core of its own, and 256 of
them on 2 cores show what the coordinator costs per job and per worker. The ideal
wall time is ``jobs * t / concurrency`` (plus ``t`` per extra pipeline stage, to fill
it); efficiency is ideal / actual.

Each row runs the same jobs, in the same round, through jorbmp and through
``multiprocessing.Pool(c).imap_unordered(chunksize=1)`` (a pipeline: one such pool
per stage, each fed the one before's results as they come). For both it measures,
in the parent process only (the coordinator, or the Pool's parent with its
threads; ``time.process_time()``, which counts what ``os.times()`` does without its
10 ms ticks, and not the children):

- efficiency, and jobs/s over the whole run;
- parent CPU per job over the whole run (start-up and shutdown included), and with
  start-up excluded: over the middle of the run, from the moment half of the jobs
  are done to the moment 90% are (`STEADY_FROM`, `STEADY_TO`), per job finished
  in it; not from the first result, because jorbmp forks its workers as the queue
  needs them, after the first results have come (a second of forking at 256);
- the time from the ``exec()`` call (or the Pool's creation) to the first result,
  and (in the efficiency row's extras) from the last result to the return: start-up
  and shutdown, the two parts of the wall that ideal workers would not spend.

jorbmp's results are seen by a serializer that writes nothing and only notes when
jobs change (`_Clock`): the coordinator calls it once per batch of finished jobs,
on its own thread, right after it applied them.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from ..checkpoint.base import NilSerializer
from ..processor import Processor
from ..run import Job, Run
from ..state import State
from .suite import Row, in_turn

# Quick rows' ideal wall time (each row's full one is `Case.ideal_s`).
QUICK_IDEAL_SECONDS = 0.5
# Full rows: three rounds of every row's ideal walls, on both sides, stay under 90% of
# this (101 s; start-up, shutdown and the Pool's slower rows made it ~160 s on 2 cores).
BUDGET_SECONDS = 120.0

# The targets (for the rows that have one): (efficiency at least, at least
# Pool's). Reported, not asserted.
TARGETS: dict[str, tuple[float | None, bool]] = {
    "c256": (0.8, True),
    "c64": (0.95, False),
    "2ms": (None, True),
    "pipeline": (0.9, False),
}
# Coordinator CPU per job (20 ms jobs, start-up excluded) at concurrency 256 over that
# at 16, in the same run: dispatch cost must not grow with the worker count.
DISPATCH_GROWTH_TARGET = 1.2
# The window, in shares of the jobs done, over which start-up is excluded.
STEADY_FROM = 0.5
STEADY_TO = 0.9


class Sleep(msgspec.Struct):
    """Overall context: how long each exec sleeps."""

    seconds: float


class Tick(msgspec.Struct, array_like=True):
    """The job context: tiny, so that only the coordinator's own cost shows."""

    n: int


def sleep_to_middle(ac: Any, oc: Sleep, jc: Tick) -> tuple[Tick, str]:
    time.sleep(oc.seconds)
    return jc, "middle"


def sleep_to_last(ac: Any, oc: Sleep, jc: Tick) -> tuple[Tick, str]:
    time.sleep(oc.seconds)
    return jc, "last"


def sleep_to_done(ac: Any, oc: Sleep, jc: Tick) -> tuple[Tick, str]:
    time.sleep(oc.seconds)
    return jc, "done"


def sleep_task(seconds: float) -> float:
    """The baseline's job: the same sleep."""
    time.sleep(seconds)
    return seconds


@dataclass(frozen=True)
class Case:
    """One row: jobs of ``seconds`` each, through ``stages`` states (or pools) of
    ``concurrency`` workers each, as many as ideal workers would take ``ideal_s`` on.

    Start-up (forking every worker: 1 to 2 s for 256 on a loaded 2-core machine, on
    both sides) and shutdown count in the whole-run efficiency, so the rows with many
    workers get the long ideal walls, and the rows with few or short jobs short ones.
    """

    key: str
    concurrency: int
    seconds: float
    ideal_s: float
    stages: int = 1
    note: str = ""  # said after the title

    def jobs(self, ideal: float) -> int:
        return max(self.concurrency, round(ideal * self.concurrency / self.seconds))

    def ideal(self, jobs: int) -> float:
        return jobs * self.seconds / self.concurrency + (self.stages - 1) * self.seconds

    def title(self, jobs: int) -> str:
        ms = f"{self.seconds * 1000:g} ms"
        c = self.concurrency
        if self.stages > 1:
            title = f"manycore {self.stages}-state pipeline, {c}/state, {ms} x {jobs:,}"
        else:
            title = f"manycore concurrency {c}, {ms} x {jobs:,}"
        return f"{title} ({self.note})" if self.note else title


CASES = (
    Case("c16", 16, 0.02, 1.0),
    Case("c64", 64, 0.02, 3.0),
    Case("c256", 256, 0.02, 6.0),
    # 32,000 jobs/s: the baseline's parent alone needs ~20 us of CPU per job.
    Case("2ms", 64, 0.002, 1.0),
    Case("pipeline", 64, 0.02, 5.0, stages=3),
    # Many short jobs swamp the coordinator (320,000 jobs/s would be ideal): its CPU
    # per job, not the workers, sets jobs/s, so that row is about jobs/s.
    Case("swamp", 64, 0.0002, 0.25, note="swamps the coordinator"),
    # 51,200 jobs/s would be ideal: 256 workers swamp this machine, the coordinator among its
    # processes; its batches grow with that load (`jorbmp._load`), Pool's stay at one.
    Case("c256-5ms", 256, 0.005, 0.5, note="swamps the machine"),
)
QUICK_CASES = ("c16", "c64", "c256")


@dataclass
class Measure:
    """One side's figures for one run of a case."""

    wall: float
    cpu: float  # parent CPU seconds, whole run
    first: float  # seconds from the start to the first result
    steady_cpu: float  # parent CPU seconds over the steady window (see STEADY_FROM)
    steady_wall: float  # seconds the steady window lasted
    steady_jobs: int  # jobs finished in the steady window
    shutdown: float = 0.0  # seconds from the last result to the return


def cpu_now() -> float:
    """This process's CPU time so far (every thread, not its children)."""
    return time.process_time()


class _Marks:
    """(time, CPU, jobs done) when the first job was done and when the steady window
    opened and closed, fed the count of jobs done as it grows."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.at = [max(1, int(STEADY_FROM * total)), max(2, int(STEADY_TO * total))]
        self.first: tuple[float, float, int] | None = None
        self.last = 0.0  # when the count last grew
        self.window: list[tuple[float, float, int]] = []

    def done(self, done: int) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = (time.perf_counter(), cpu_now(), done)
        while len(self.window) < 2 and done >= self.at[len(self.window)]:
            self.window.append((time.perf_counter(), cpu_now(), done))

    def measure(self, t0: float, cpu0: float, t1: float, cpu1: float) -> Measure:
        assert self.first is not None and len(self.window) == 2, "the run did not finish"
        (a_t, a_cpu, a_done), (b_t, b_cpu, b_done) = self.window
        return Measure(
            t1 - t0,
            cpu1 - cpu0,
            self.first[0] - t0,
            b_cpu - a_cpu,
            b_t - a_t,
            b_done - a_done,
            t1 - self.last,
        )


class _Clock(NilSerializer):
    """Writes nothing; counts the jobs that reach state ``final`` into ``marks`` (the
    coordinator reports changed jobs a batch at a time)."""

    def __init__(self, final: str, marks: _Marks) -> None:
        self.final, self.marks = final, marks
        self.count = 0

    def jobs_changed(self, jobs: Sequence[Job[Any]]) -> None:
        final = self.final
        n = sum(1 for job in jobs if job.state == final)
        if n:
            self.count += n
            self.marks.done(self.count)


def states_for(case: Case) -> list[State]:
    c = case.concurrency
    if case.stages == 1:
        return [State("new", sleep_to_done, concurrency=c), State("done", terminal=True)]
    assert case.stages == 3
    return [
        State("new", sleep_to_middle, concurrency=c),
        State("middle", sleep_to_last, concurrency=c),
        State("last", sleep_to_done, concurrency=c),
        State("done", terminal=True),
    ]


def measure_jorbmp(case: Case, jobs: int) -> Measure:
    run: Run[Sleep, Tick] = Run("manycore", Sleep(case.seconds), Tick)
    for n in range(jobs):
        run.add_job(Tick(n))
    marks = _Marks(jobs)
    cpu0, t0 = cpu_now(), time.perf_counter()
    Processor(None, states_for(case), serializer=_Clock("done", marks)).exec(run)
    return marks.measure(t0, cpu0, time.perf_counter(), cpu_now())


def measure_pool(case: Case, jobs: int) -> Measure:
    def chain(pools: list[Any], tasks: Iterable[float]) -> Iterator[float]:
        for pool in pools:
            tasks = pool.imap_unordered(sleep_task, tasks, chunksize=1)
        return iter(tasks)

    marks = _Marks(jobs)
    cpu0, t0 = cpu_now(), time.perf_counter()
    pools = [multiprocessing.Pool(case.concurrency) for _ in range(case.stages)]
    try:
        for done, _ in enumerate(chain(pools, [case.seconds] * jobs), 1):
            marks.done(done)
    finally:
        for pool in pools:
            pool.close()
        for pool in pools:
            pool.join()
    return marks.measure(t0, cpu0, time.perf_counter(), cpu_now())


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def rows_for(case: Case, jobs: int, ours: list[Measure], pools: list[Measure]) -> list[Row]:
    """The rows of one case, from the runs of every round (medians)."""
    ideal = case.ideal(jobs)
    title = case.title(jobs)

    def figures(ms: list[Measure]) -> dict[str, float]:
        return {
            "efficiency": _median(ideal / m.wall for m in ms),
            "cpu_us_per_job": _median(1e6 * m.cpu / jobs for m in ms),
            "steady_cpu_us_per_job": _median(1e6 * m.steady_cpu / m.steady_jobs for m in ms),
            "first_result_s": _median(m.first for m in ms),
            "jobs_per_s": _median(jobs / m.wall for m in ms),
        }

    a, b = figures(ours), figures(pools)

    def steady(m: Measure) -> float:
        """Efficiency over the steady window (start-up and shutdown left out)."""
        return m.steady_jobs * case.seconds / case.concurrency / m.steady_wall

    spread = {
        "steady_efficiency": _median(steady(m) for m in ours),
        "pool_steady_efficiency": _median(steady(m) for m in pools),
        "efficiency_runs": [round(ideal / m.wall, 3) for m in ours],
        "pool_efficiency_runs": [round(ideal / m.wall, 3) for m in pools],
        "steady_cpu_us_runs": [round(1e6 * m.steady_cpu / m.steady_jobs, 1) for m in ours],
        "shutdown_s": _median(m.shutdown for m in ours),
        "pool_shutdown_s": _median(m.shutdown for m in pools),
    }
    target, beat_pool = TARGETS.get(case.key, (None, False))
    parts = ([f">= {target}"] if target is not None else []) + (["Pool's"] if beat_pool else [])
    ok = None
    if parts:
        ok = (target is None or a["efficiency"] >= target) and (
            not beat_pool or a["efficiency"] >= b["efficiency"]
        )
    pool = "Pool.imap_unordered(1)" if case.stages == 1 else "Pools chained, imap_unordered(1)"

    def row(what: str, key: str, unit: str, lower_better: bool, **more: Any) -> Row:
        ratio = (b[key] / a[key] if a[key] else None) if lower_better else a[key] / b[key]
        return Row(f"{title}: {what}", a[key], unit, pool, b[key], ratio, **more)

    return [
        row(
            "efficiency",
            "efficiency",
            "ideal/wall",
            False,
            target=" and ".join(parts),
            ok=ok,
            extra={"ideal_s": ideal, **spread},
        ),
        row("parent CPU/job, whole run", "cpu_us_per_job", "us", True),
        row("parent CPU/job, start-up excluded", "steady_cpu_us_per_job", "us", True),
        row("exec() to first result", "first_result_s", "s", True),
        row("jobs/s", "jobs_per_s", "jobs/s", False),
    ]


def scenario(quick: bool, rounds: int) -> list[Row]:
    cases = [c for c in CASES if not quick or c.key in QUICK_CASES]
    sizes = {c.key: c.jobs(QUICK_IDEAL_SECONDS if quick else c.ideal_s) for c in cases}
    ours: dict[str, list[Measure]] = {c.key: [] for c in cases}
    pools: dict[str, list[Measure]] = {c.key: [] for c in cases}
    for i in range(rounds):
        for case in cases:
            contenders: list[tuple[list[Measure], Callable[[], Measure]]] = [
                (ours[case.key], partial(measure_jorbmp, case, sizes[case.key])),
                (pools[case.key], partial(measure_pool, case, sizes[case.key])),
            ]
            for into, measure in in_turn(i, contenders):
                into.append(measure())
    rows: list[Row] = []
    for case in cases:
        rows += rows_for(case, sizes[case.key], ours[case.key], pools[case.key])
    if "c16" in ours and "c256" in ours:
        rows.append(dispatch_growth(ours["c16"], ours["c256"]))
    return rows


def dispatch_growth(c16: list[Measure], c256: list[Measure]) -> Row:
    """Coordinator CPU per job at concurrency 256 over 16 (start-up excluded), each
    round's pair measured back to back."""
    ratios = [
        (b.steady_cpu / b.steady_jobs) / (a.steady_cpu / a.steady_jobs)
        for a, b in zip(c16, c256, strict=True)
    ]
    growth = statistics.median(ratios)
    return Row(
        "manycore dispatch cost, concurrency 256 / 16 (CPU per job, start-up excluded)",
        growth,
        "x",
        "flat would be",
        1.0,
        1.0 / growth,
        f"<= {DISPATCH_GROWTH_TARGET}x",
        growth <= DISPATCH_GROWTH_TARGET,
        {"runs": [round(r, 3) for r in ratios]},
    )
