"""Scenario 1 of ``--only memory``: fat jobs under ``Processor(memory_limit=...)``.

Each job touches `FAT_BYTES` (300 MB: allocated and every page written) and holds it
for `FAT_HOLD_SECONDS` (200 ms). ``concurrency=16`` with ``memory_limit=1.5e9`` against
the fixed ``concurrency=4`` run without a limit (the most that fits), 60 jobs each, the
two taking turns first each round. Targets:

- what this process and all its workers use together (its RSS plus each worker's
  own memory, USS: what the limit governs), sampled every 20 ms or as fast as the USS
  reads allow (`jorbmp.bench.memory.RssMonitor`), stays at most 10% over the limit
  (their RSS summed, which counts the pages they share once per process, is
  reported beside it);
- no worker is killed by the kernel (no job records "worker died");
- throughput at least 0.8 of the fixed run's (median walls).

The limited run also reports how many workers the governor took back.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from ..processor import Processor
from ..run import Run
from ..state import State
from .memory import RssMonitor
from .suite import Row, in_turn

__all__ = ["FatFigures", "measure_fat", "scenario_fat"]

FAT_BYTES = 300_000_000
FAT_HOLD_SECONDS = 0.2
FAT_LIMIT = 1.5e9
FAT_CONCURRENCY = 16
FIXED_CONCURRENCY = 4  # the most 300 MB jobs that fit in 1.5 GB beside their workers
OVER_TARGET = 1.10  # the tree's peak RSS may exceed the limit by at most 10%
THROUGHPUT_TARGET = 0.8
PAGE = 4096


class Fat(msgspec.Struct):
    """The overall context: bytes each job touches and seconds it holds them."""

    nbytes: int = FAT_BYTES
    hold: float = FAT_HOLD_SECONDS


class FatJob(msgspec.Struct):
    n: int


def fat(ac: Any, oc: Fat, jc: FatJob) -> tuple[FatJob, str]:
    """Touch ``oc.nbytes`` (every page written, so all of it is resident), hold it."""
    block = bytearray(oc.nbytes)
    for i in range(0, len(block), PAGE):
        block[i] = 1
    time.sleep(oc.hold)
    return jc, "done"


class _TakenBack(logging.Handler):
    """Counts the governor's WARNINGs that it took a worker back."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "taking back worker" in record.getMessage():
            self.count += 1


@dataclass
class FatFigures:
    """One run: wall, the tree's peak use and RSS, kernel kills and governor kills."""

    wall: float
    use_peak: int  # this process's RSS plus its workers' USS
    tree_peak: int  # RSS summed
    died: int  # errors that say "worker died": the kernel's OOM kills, say
    errors: int
    taken_back: int
    done: int


def measure_fat(
    jobs: int,
    concurrency: int,
    limit: float | None,
    nbytes: int = FAT_BYTES,
    hold: float = FAT_HOLD_SECONDS,
) -> FatFigures:
    """Run ``jobs`` jobs of ``nbytes`` held ``hold`` seconds under ``memory_limit=limit``."""
    run: Run[Fat, FatJob] = Run("memory-fat", Fat(nbytes, hold), FatJob)
    for n in range(jobs):
        run.add_job(FatJob(n))
    states = [State("new", fat, concurrency=concurrency), State("done", terminal=True)]
    processor = Processor(None, states, memory_limit=limit)
    counter = _TakenBack()
    logger = logging.getLogger("jorbmp")
    logger.addHandler(counter)
    try:
        with RssMonitor(own=True) as monitor:
            start = time.perf_counter()
            processor.exec(run)
            wall = time.perf_counter() - start
    finally:
        logger.removeHandler(counter)
    texts = [t for job in run.jobs.values() for e in job.state_errors.values() for t in e]
    return FatFigures(
        wall=wall,
        use_peak=monitor.use_peak,
        tree_peak=monitor.tree_peak,
        died=sum("worker died" in t for t in texts),
        errors=len(texts),
        taken_back=counter.count,
        done=sum(job.state == "done" for job in run.jobs.values()),
    )


def scenario_fat(quick: bool, rounds: int) -> list[Row]:
    """Scenario 1: limited against fixed, ``rounds`` each, taking turns first."""
    jobs = 20 if quick else 60
    figures: dict[str, list[FatFigures]] = {"limited": [], "fixed": []}
    for round_ in range(rounds):
        for kind in in_turn(round_, ["limited", "fixed"]):
            if kind == "limited":
                figures[kind].append(measure_fat(jobs, FAT_CONCURRENCY, FAT_LIMIT))
            else:
                figures[kind].append(measure_fat(jobs, FIXED_CONCURRENCY, None))
    limited, fixed = figures["limited"], figures["fixed"]
    peak = max(f.use_peak for f in limited)
    rate = jobs / statistics.median(f.wall for f in limited)
    fixed_rate = jobs / statistics.median(f.wall for f in fixed)
    title = (
        f"memory 1: fat jobs ({FAT_BYTES / 1e6:.0f} MB x {jobs}, concurrency "
        f"{FAT_CONCURRENCY}, memory_limit={FAT_LIMIT / 1e9:g} GB)"
    )
    died = sum(f.died for f in limited)
    return [
        Row(
            f"{title}: peak use of the tree (RSS + workers' USS) / limit",
            peak / FAT_LIMIT,
            "x",
            target=f"<= {OVER_TARGET:g}",
            ok=peak <= OVER_TARGET * FAT_LIMIT,
            extra={
                "peak_mb": [round(f.use_peak / 1e6) for f in limited],
                "fixed_peak_mb": [round(f.use_peak / 1e6) for f in fixed],
                "rss_peak_mb": [round(f.tree_peak / 1e6) for f in limited],
            },
        ),
        Row(
            f"{title}: workers killed by the kernel",
            died,
            "workers",
            target="0",
            ok=died == 0 and all(f.done == jobs for f in limited),
            extra={
                "errors": sum(f.errors for f in limited),
                "taken_back": [f.taken_back for f in limited],
            },
        ),
        Row(
            f"{title}: throughput",
            rate,
            "jobs/s",
            f"fixed concurrency={FIXED_CONCURRENCY}, no limit",
            fixed_rate,
            rate / fixed_rate,
            f">= {THROUGHPUT_TARGET:g}x",
            rate / fixed_rate >= THROUGHPUT_TARGET,
            {
                "walls": [round(f.wall, 2) for f in limited],
                "fixed_walls": [round(f.wall, 2) for f in fixed],
            },
        ),
    ]
