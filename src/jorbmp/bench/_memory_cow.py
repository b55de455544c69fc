"""Figures of ``--only memory`` for the README: what a recycled worker costs with a big
run loaded in the coordinator (issue 18: "what that costs at 1M jobs").

A run of `COW_JOBS` jobs (1,000,000; 100,000 with ``--quick``), all but `STARTS` of
them already terminal, is loaded; the `STARTS` others run with a fresh worker each
(``max_jobs_per_worker=1``, ``concurrency=1``) and without recycling, under ``fork``
and under ``forkserver`` (preloading jorbmp). Each exec reports its worker's RSS and
USS (psutil). Rows, figures only: the coordinator's RSS, ``os.fork()`` of it, the cost
of one worker start (the difference of the two runs' walls, per start; the median of
the rounds), and a fresh worker's RSS and USS: under fork, RSS counts the
coordinator's pages it shares.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from typing import Any

import msgspec
import psutil

from ..processor import Processor
from ..run import Run
from ..state import State
from .suite import Row

__all__ = ["scenario_cow"]

COW_JOBS = 1_000_000
QUICK_COW_JOBS = 100_000
STARTS = 20  # jobs run, each in a fresh worker when recycling
FORKS = 5  # os.fork() timings, the least of which is reported


class Probe(msgspec.Struct):
    """A job context about the size of a real one (a path), and what its worker saw."""

    n: int
    path: str = ""
    rss: int = 0
    uss: int = 0


def probe(ac: Any, oc: Any, jc: Probe) -> tuple[Probe, str]:
    info = psutil.Process().memory_full_info()
    jc.rss, jc.uss = info.rss, info.uss
    return jc, "done"


def _fork_seconds() -> float:
    """The least of `FORKS` bare ``os.fork()`` calls of this process (a child that exits)."""
    best = float("inf")
    for _ in range(FORKS):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        best = min(best, time.perf_counter() - start)
        os.waitpid(pid, 0)
    return best


def _runs(run: Run[None, Probe], method: str) -> tuple[float, int, int]:
    """(seconds per worker start, largest worker RSS, largest USS) under ``method``."""
    walls: dict[int | None, float] = {}
    for every in (None, 1):
        for job in run.jobs.values():
            if job.context.rss:  # (the probes of the previous run go back to "new")
                job.state, job.context.rss, job.context.uss = "new", 0, 0
        states = [
            State("new", probe, max_jobs_per_worker=every),
            State("done", terminal=True),
        ]
        start = time.perf_counter()
        Processor(None, states, mp_context=method).exec(run)
        walls[every] = time.perf_counter() - start
    probed = [job.context for job in run.jobs.values() if job.context.rss]
    per_start = (walls[1] - walls[None]) / (STARTS - 1)
    return per_start, max(c.rss for c in probed), max(c.uss for c in probed)


def scenario_cow(quick: bool, rounds: int) -> list[Row]:
    jobs = QUICK_COW_JOBS if quick else COW_JOBS
    run: Run[None, Probe] = Run("memory-cow", None, Probe)
    for n in range(jobs - STARTS):
        run.add_job(Probe(n, f"/data/in/file-{n:07d}.txt"), state="done")
    for n in range(STARTS):
        run.add_job(Probe(n))
    coordinator = psutil.Process().memory_info().rss
    title = f"memory 4: a recycled worker with {jobs:,} jobs loaded"
    rows = [
        Row(f"{title}: coordinator RSS", coordinator / 1e6, "MB"),
        Row(f"{title}: os.fork() of the coordinator", _fork_seconds() * 1000, "ms"),
    ]
    # As the README advises for leaky states: the server imports jorbmp once, not each
    # worker (only if no forkserver has started in this process yet, as in the bench).
    multiprocessing.set_forkserver_preload(["jorbmp"])
    for method in ("fork", "forkserver"):
        figures = [_runs(run, method) for _ in range(rounds)]
        per_start = statistics.median(f[0] for f in figures)
        rss, uss = max(f[1] for f in figures), max(f[2] for f in figures)
        rows += [
            Row(f"{title}: {method}, one worker start", per_start * 1000, "ms"),
            Row(f"{title}: {method}, a fresh worker's RSS", rss / 1e6, "MB"),
            Row(f"{title}: {method}, a fresh worker's own memory (USS)", uss / 1e6, "MB"),
        ]
    return rows
