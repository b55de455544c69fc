"""``Processor(memory_limit=...)`` under fork with a big coordinator (issue 18): a forked
worker's RSS counts every page it shares with the coordinator, so a limit summing RSS
counts the coordinator's heap once per worker. The governor counts each worker's own
memory (RSS less its shared pages), so a limit sized for what the processes really use
together runs the state at its concurrency, and that real use stays under the limit.
Pages the coordinator rewrites after the fork, left to the workers, are counted once.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import time
from typing import Any

import msgspec
import psutil
import pytest

from jorbmp import Processor, Run, State
from jorbmp.bench._sampler import Sampler

pytestmark = pytest.mark.timeout(120)

CTX = multiprocessing.get_context("fork")
MB = 1_000_000
PAGE = 4096
EXEC_MB = 30
WORKERS = 8

# Set before the workers fork, so that all of them share it: the coordinator's heap
# (``_BIG``) and (running now, the most seen) counted from inside the execs.
_BIG: Any = None
_COUNT: Any = None


class Job(msgspec.Struct):
    hold: float


def touching(ac: None, oc: None, jc: Job) -> tuple[Job, str]:
    running, peak = _COUNT
    with running.get_lock():
        running.value += 1
        peak.value = max(peak.value, running.value)
    block = bytearray(EXEC_MB * MB)
    for i in range(0, len(block), PAGE):
        block[i] = 1
    time.sleep(jc.hold)
    with running.get_lock():
        running.value -= 1
    return jc, "done"


class RealUse(Sampler):
    """While entered, samples the tree's real use on a thread: this process's RSS plus
    each child's USS (its private pages), the most seen in ``peak``."""

    def __init__(self) -> None:
        super().__init__(0.1)
        self.peak = 0

    def sample(self) -> None:
        total = self.me.memory_info().rss
        for child in self.me.children(recursive=True):
            try:
                total += child.memory_full_info().uss
            except psutil.Error:
                continue  # gone since it was listed
        self.peak = max(self.peak, total)


def test_a_big_coordinator_is_counted_once_not_once_per_forked_worker() -> None:
    global _BIG, _COUNT
    _BIG = [bytes([i % 251]) * MB for i in range(300)]  # 300 MB, every page resident
    _COUNT = (CTX.Value("i", 0), CTX.Value("i", 0))
    try:
        coordinator = psutil.Process().memory_info().rss
        # Room for the coordinator and 8 workers of (own memory ~20 MB + an exec of
        # 30 MB), and a margin; counting each worker at its RSS (the coordinator's,
        # ~400 MB) would leave room for one.
        limit = coordinator + WORKERS * (20 + EXEC_MB) * MB + 150 * MB
        run: Run[None, Job] = Run("shared", overall=None, job_type=Job)
        for _ in range(32):
            run.add_job(Job(hold=0.5))
        states = [State("new", touching, concurrency=WORKERS), State("done", terminal=True)]
        with RealUse() as use:
            Processor(None, states, mp_context=CTX, memory_limit=limit).exec(run)
        assert all(job.state == "done" and not job.state_errors for job in run.jobs.values())
        assert _COUNT[1].value > 4, (_COUNT[1].value, coordinator, limit)
        assert use.peak < limit, (use.peak, limit)
    finally:
        _BIG = _COUNT = None


_OBJECTS: Any = None  # many small objects, set before the workers fork


def walk(ac: None, oc: None, jc: Job) -> tuple[Job, str]:
    """In the coordinator (a thread state): wait for the workers to fork, then touch
    every object's reference count, which copies each page for the coordinator and
    leaves the old ones to the workers alone."""
    time.sleep(jc.hold)
    for obj in _OBJECTS:
        obj.__len__()
    return jc, "done"


def resting(ac: None, oc: None, jc: Job) -> tuple[Job, str]:
    time.sleep(jc.hold)
    return jc, "done"


def test_pages_the_coordinator_rewrote_after_the_fork_are_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Three workers share the coordinator's objects; it then rewrites their pages,
    # so the old ones are in no one's USS (each worker's shared pages no longer all
    # the coordinator's): the governor counts them once, and says so.
    global _OBJECTS
    _OBJECTS = [str(i) * 3 for i in range(2_500_000)]
    try:
        run: Run[None, Job] = Run("orphans", overall=None, job_type=Job)
        for _ in range(45):  # (4.5 s: the coordinator has had its turn since the walk)
            run.add_job(Job(hold=0.3))
        run.add_job(Job(hold=1.5), state="walk")
        states = [
            State("new", resting, concurrency=3),
            State("walk", walk, kind="thread"),
            State("done", terminal=True),
        ]
        with caplog.at_level(logging.DEBUG, logger="jorbmp"):
            Processor(None, states, mp_context=CTX, memory_limit=0.9).exec(run)
        assert all(job.state == "done" and not job.state_errors for job in run.jobs.values())
        counted = [
            int(m.group(1))
            for r in caplog.records
            if (m := re.search(r"the workers hold (\d+) bytes that the", r.getMessage()))
        ]
        assert counted and max(counted) > 100 * MB, counted
    finally:
        _OBJECTS = None
