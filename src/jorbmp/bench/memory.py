"""The ``memory`` scenarios (issue 18): ``python -m jorbmp.bench --only memory``.

1. Fat jobs (`Processor(memory_limit=...)`): 300 MB jobs, concurrency 16 under a
   1.5 GB limit against a fixed concurrency of 4; see `jorbmp.bench._memory_fat`.
2. A leak: each job appends `LEAK_BYTES` (20 MB) to a module-level list, 200 jobs,
   ``max_worker_memory=300e6``, concurrency 2. Targets: no worker's RSS (psutil,
   sampled every 20 ms) goes past about 340 MB (the limit plus what one batch leaks);
   every job completes with no error recorded. It reports how many workers were
   recycled.
3. ``max_jobs_per_worker=10`` over 100 jobs of ~20 ms of CPU, concurrency 2: the
   pids that execs report change every 10 jobs (no pid runs more than 10, and all but
   the last ``concurrency`` run exactly 10), and wall time stays within 1.2x of the
   same run without recycling (median of the rounds, the two taking turns first).
4. Figures only: what a recycled worker costs with 1,000,000 jobs loaded in the
   coordinator, under fork and forkserver; see `jorbmp.bench._memory_cow`.

Each scenario is a function ``(quick, rounds) -> list[Row]`` listed in `SCENARIOS`,
run in that order; `RssMonitor` samples the memory of this process and its workers
for any of them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil

from ..processor import Processor
from ..run import Run
from ..state import State
from ._sampler import Sampler
from ._work import calibrate, spin
from .suite import Row, in_turn

__all__ = ["SCENARIOS", "RssMonitor", "measure_leak", "measure_recycling", "scenario"]

# Scenario 2: what each job leaks, the limit, and the most a worker may reach (the
# limit plus one batch's leak: a batch of about 20 ms holds one or two such jobs).
LEAK_BYTES = 20_000_000
LEAK_LIMIT = 300e6
LEAK_TARGET_BYTES = 340e6
# Scenario 3: jobs per worker, CPU per job, and the slowdown recycling may cost.
EVERY = 10
RECYCLE_JOB_MS = 20.0
RECYCLE_TARGET = 1.2
# How often `RssMonitor` samples (each sample reads /proc for every process).
SAMPLE_SECONDS = 0.02


class Leak(msgspec.Struct):
    """The overall context of scenario 2: bytes leaked per job."""

    leak: int = LEAK_BYTES


class Spins(msgspec.Struct):
    """The overall context of scenario 3: CPU per job."""

    spins: int = 0


class Job(msgspec.Struct):
    """A job context that says which worker ran it."""

    n: int
    pid: int = 0


# What the leaking exec holds on to: it lives as long as its worker does.
_LEAKED: list[bytes] = []


def leak(ac: Any, oc: Leak, jc: Job) -> tuple[Job, str]:
    """Leak ``oc.leak`` bytes (every page written, so all of it is resident)."""
    _LEAKED.append(b"\x01" * oc.leak)
    jc.pid = os.getpid()
    return jc, "done"


def cpu(ac: Any, oc: Spins, jc: Job) -> tuple[Job, str]:
    spin(oc.spins)
    jc.pid = os.getpid()
    return jc, "done"


class RssMonitor(Sampler):
    """While entered, samples every `SAMPLE_SECONDS` on a thread of its own: the
    largest RSS any child process of this one reached (``worker_peak``), and the
    largest RSS of this process and all of its descendants together (``tree_peak``).
    With ``own``, also the largest this process's RSS plus each descendant's own
    memory (USS) came to (``use_peak``): what they really use together, each page
    they share counted once, what ``memory_limit`` governs (a USS read walks the
    page tables, so sampling then takes longer)."""

    def __init__(self, own: bool = False) -> None:
        super().__init__(SAMPLE_SECONDS)
        self.worker_peak = 0
        self.tree_peak = 0
        self.use_peak = 0
        self.own = own
        self.samples = 0

    def sample(self) -> None:
        tree = use = self.me.memory_info().rss
        for child in self.me.children(recursive=True):
            try:
                if self.own:
                    full = child.memory_full_info()
                    rss, use = full.rss, use + full.uss
                else:
                    rss = child.memory_info().rss
            except psutil.Error:
                continue  # gone since it was listed
            tree += rss
            self.worker_peak = max(self.worker_peak, rss)
        self.tree_peak = max(self.tree_peak, tree)
        self.use_peak = max(self.use_peak, use)
        self.samples += 1


@dataclass
class LeakFigures:
    """What one run of scenario 2 did."""

    wall: float
    worker_peak: int  # bytes
    done: int  # jobs that ended in "done"
    errors: int  # error texts recorded on any job
    recycled: int  # workers recycled, as the run report counts them
    pids: int  # distinct workers that ran a job
    samples: int


def measure_leak(
    jobs: int,
    leak_bytes: int = LEAK_BYTES,
    limit: float = LEAK_LIMIT,
    concurrency: int = 2,
    mp_context: str | None = None,
) -> LeakFigures:
    """Run ``jobs`` jobs that each leak ``leak_bytes`` under ``max_worker_memory=limit``."""
    run: Run[Leak, Job] = Run("memory-leak", Leak(leak_bytes), Job)
    for n in range(jobs):
        run.add_job(Job(n))
    states = [
        State("new", leak, concurrency=concurrency, max_worker_memory=limit),
        State("done", terminal=True),
    ]
    processor = Processor(None, states, mp_context=mp_context)
    with RssMonitor() as monitor:
        start = time.perf_counter()
        processor.exec(run)
        wall = time.perf_counter() - start
    report = processor.last_report
    assert report is not None
    return LeakFigures(
        wall=wall,
        worker_peak=monitor.worker_peak,
        done=sum(1 for job in run.jobs.values() if job.state == "done"),
        errors=sum(len(e) for job in run.jobs.values() for e in job.state_errors.values()),
        recycled=next(s.recycled for s in report.states if s.state == "new"),
        pids=len({job.context.pid for job in run.jobs.values()}),
        samples=monitor.samples,
    )


@dataclass
class RecyclingFigures:
    """What one run of scenario 3 did: its wall time, and jobs per worker pid."""

    wall: float
    per_pid: Counter[int] = field(default_factory=Counter)
    recycled: int = 0

    def pids_change_every(self, every: int, concurrency: int) -> bool:
        """No pid ran more than ``every`` jobs, and all but the last ``concurrency``
        workers (those the run's end left unfinished) ran exactly ``every``."""
        counts = list(self.per_pid.values())
        return max(counts) <= every and sum(c < every for c in counts) <= concurrency


def measure_recycling(
    jobs: int,
    every: int | None,
    spins: int,
    concurrency: int = 2,
    mp_context: str | None = None,
) -> RecyclingFigures:
    """Run ``jobs`` CPU jobs of ``spins`` each with ``max_jobs_per_worker=every``."""
    run: Run[Spins, Job] = Run("memory-recycling", Spins(spins), Job)
    for n in range(jobs):
        run.add_job(Job(n))
    states = [
        State("new", cpu, concurrency=concurrency, max_jobs_per_worker=every),
        State("done", terminal=True),
    ]
    processor = Processor(None, states, mp_context=mp_context)
    start = time.perf_counter()
    processor.exec(run)
    wall = time.perf_counter() - start
    report = processor.last_report
    assert report is not None
    return RecyclingFigures(
        wall,
        Counter(job.context.pid for job in run.jobs.values()),
        next(s.recycled for s in report.states if s.state == "new"),
    )


def scenario_leak(quick: bool, rounds: int) -> list[Row]:
    """Scenario 2 (one run: its figures are maxima and counts, not a pace)."""
    jobs = 40 if quick else 200
    figures = measure_leak(jobs)
    title = (
        f"memory 2: a leak ({LEAK_BYTES / 1e6:.0f} MB/job x {jobs}, "
        f"max_worker_memory={LEAK_LIMIT / 1e6:.0f} MB)"
    )
    extra = {"wall_seconds": round(figures.wall, 2), "pids": figures.pids}
    extra["rss_samples"] = figures.samples
    return [
        Row(
            f"{title}: peak worker RSS",
            figures.worker_peak / 1e6,
            "MB",
            target=f"<= {LEAK_TARGET_BYTES / 1e6:.0f} MB",
            ok=figures.worker_peak <= LEAK_TARGET_BYTES,
            extra=extra,
        ),
        Row(
            f"{title}: jobs done, no error recorded",
            figures.done,
            "jobs",
            target=f"all {jobs}, 0 errors",
            ok=figures.done == jobs and not figures.errors,
            extra={"errors": figures.errors},
        ),
        Row(f"{title}: workers recycled", figures.recycled, "workers"),
    ]


def scenario_every_ten(quick: bool, rounds: int) -> list[Row]:
    """Scenario 3: recycled against not, median walls of ``rounds`` each."""
    jobs, concurrency = (40 if quick else 100), 2
    spins = calibrate(RECYCLE_JOB_MS)
    walls: dict[int | None, list[float]] = {EVERY: [], None: []}
    pids_ok = True
    per_pid: Counter[int] = Counter()
    recycled = 0
    for round_ in range(rounds):
        for every in in_turn(round_, [EVERY, None]):
            figures = measure_recycling(jobs, every, spins, concurrency)
            walls[every].append(figures.wall)
            if every is not None:
                pids_ok = pids_ok and figures.pids_change_every(every, concurrency)
                per_pid, recycled = figures.per_pid, figures.recycled
    recycling, plain = statistics.median(walls[EVERY]), statistics.median(walls[None])
    title = (
        f"memory 3: max_jobs_per_worker={EVERY} x {jobs} ({RECYCLE_JOB_MS:g} ms CPU, "
        f"concurrency {concurrency})"
    )
    ratio = plain / recycling
    return [
        Row(
            f"{title}: wall vs no recycling",
            recycling,
            "s",
            "no recycling",
            plain,
            ratio,
            f"within {RECYCLE_TARGET}x",
            ratio >= 1 / RECYCLE_TARGET,
            {"walls": {str(k): [round(w, 3) for w in v] for k, v in walls.items()}},
        ),
        Row(
            f"{title}: worker pids",
            len(per_pid),
            "pids",
            target=f"a new pid every {EVERY} jobs",
            ok=pids_ok,
            extra={"jobs_per_pid": sorted(per_pid.values()), "recycled": recycled},
        ),
    ]


# The scenarios, in the order they run.
def scenario_fat(quick: bool, rounds: int) -> list[Row]:
    """Scenario 1, in `jorbmp.bench._memory_fat` (which imports `RssMonitor` from here)."""
    from ._memory_fat import scenario_fat

    return scenario_fat(quick, rounds)


def scenario_cow(quick: bool, rounds: int) -> list[Row]:
    """Figures 4, in `jorbmp.bench._memory_cow`: a recycled worker's cost at 1M jobs."""
    from ._memory_cow import scenario_cow

    return scenario_cow(quick, rounds)


SCENARIOS: list[Callable[[bool, int], list[Row]]] = [
    scenario_fat,
    scenario_leak,
    scenario_every_ten,
    scenario_cow,
]


def scenario(quick: bool, rounds: int) -> list[Row]:
    rows: list[Row] = []
    for fn in SCENARIOS:
        rows.extend(fn(quick, rounds))
    return rows
