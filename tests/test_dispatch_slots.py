"""The process pool's slot bookkeeping stays exact (issue 16, item 2).

The pool keeps its free slots, the choice of worker and the executing count up to
date as workers change instead of walking every worker per job. These tests run real
pools through worker deaths, timeouts and stops, at concurrency 1, 2 and 64, and an
async state in the same run audits the pool between events (an async exec runs on
the coordinator's loop, so it sees the pool as the coordinator does): the counts
must always equal what a walk over the workers says.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import FAILED, Processor, Run, State, Stopped, _fds
from jorbmp._comms import CoordinatorEnd, socket_pair
from jorbmp._pool import MAX_DEPTH, ProcessPool

CONCURRENCY = pytest.mark.parametrize("concurrency", [1, 2, 64])


class Task(msgspec.Struct):
    n: int
    action: str = ""  # "die": os._exit on the first attempt; "hang": sleep 30 s first
    sleep: float = 0.0


class Dir(msgspec.Struct):
    path: str


def _first_time(oc: Dir, name: str) -> bool:
    try:
        os.close(os.open(Path(oc.path) / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def work(ac: object, oc: Dir, jc: Task) -> tuple[Task, str]:
    if jc.action == "die" and _first_time(oc, f"die-{jc.n}"):
        os._exit(7)
    if jc.action == "hang" and _first_time(oc, f"hang-{jc.n}"):
        time.sleep(30)
    time.sleep(jc.sleep)
    (Path(oc.path) / f"end-{jc.n}").touch()
    return jc, "done"


def problems(pool: ProcessPool) -> list[str]:
    """How the pool's bookkeeping differs from a walk over its workers."""
    if pool.closing:
        return []
    depth = pool._depth()
    found = []
    free = sum(max(0, depth - len(w.batches)) for w in pool.workers if w.takes_work())
    if pool.free() != free:
        found.append(f"free() {pool.free()} != {free}")
    busy = sum(1 for w in pool.workers if w.batches)
    if pool.executing() != busy:
        found.append(f"executing() {pool.executing()} != {busy}")
    if busy > pool.concurrency:
        found.append(f"{busy} executing at concurrency {pool.concurrency}")
    listed = {w: n for n, bucket in enumerate(pool.slots.by_load) for w in bucket}
    want = {
        w: len(w.batches) for w in pool.workers if w.takes_work() and len(w.batches) < MAX_DEPTH
    }
    if listed != want:
        found.append(f"listed {sorted(listed.values())} != {sorted(want.values())}")
    return found


class Audit:
    """The AC of the audit state: what the audits found, and how many ran."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.checks = 0
        self.saw_work = False
        self.saw_polling = False  # the pool's poller was polling on its timer


async def audit(ac: Audit, oc: object, jc: Task) -> tuple[Task, str]:
    """Check the run's process pool every millisecond until its jobs are all done, it
    closes, or a stop has let its last exec finish."""
    pool = None
    while pool is None:
        pools = [o for o in gc.get_objects() if type(o) is ProcessPool and not o.closing]
        pool = pools[0] if len(pools) == 1 else None
        await asyncio.sleep(0.001)
    lane: Any = pool.sink
    while lane.count and not pool.closing:
        if lane.coord.stopping and not pool.executing():
            break
        ac.found += problems(pool)
        ac.checks += 1
        ac.saw_work = ac.saw_work or pool.executing() > 0
        ac.saw_polling = ac.saw_polling or (pool.poller is not None and not pool.poller.woken)
        await asyncio.sleep(0.001)
    return jc, "done"


def audited(tmp_path: Path, tasks: list[Task]) -> Run[Dir, Task]:
    run: Run[Dir, Task] = Run("slots", Dir(str(tmp_path)), Task)
    run.add_job(Task(-1), state="audit")
    for task in tasks:
        run.add_job(task, state="work")
    return run


def states(concurrency: int, **kwargs: Any) -> list[State]:
    return [
        State("audit", audit, kind="async"),
        State("work", work, concurrency=concurrency, **kwargs),
        State("done", terminal=True),
    ]


def check(ac: Audit) -> None:
    assert ac.checks > 10 and ac.saw_work, vars(ac)
    assert ac.found == [], ac.found[:5]


@pytest.mark.timeout(120)
@CONCURRENCY
def test_slots_stay_exact_through_worker_deaths(tmp_path: Path, concurrency: int) -> None:
    # Short jobs (workers then hold a second batch) with deaths among them.
    tasks = [Task(i, "die" if i % 37 == 5 else "", sleep=0.002) for i in range(600)]
    ac = Audit()
    run = audited(tmp_path, tasks)
    Processor(ac, states(concurrency)).exec(run)
    check(ac)
    died = [t.n for t in tasks if t.action == "die"]
    for n in died:
        errors = run.jobs[str(n + 1)].state_errors["work"]
        assert errors == ["worker died (exit code 7)"], errors
    assert all(job.state == "done" for job in run.jobs.values())


@pytest.mark.timeout(120)
@CONCURRENCY
def test_slots_stay_exact_through_timeouts(tmp_path: Path, concurrency: int) -> None:
    hangs = 2 if concurrency == 1 else 4
    tasks = [Task(i, "hang" if i < hangs else "", sleep=0.002) for i in range(300)]
    ac = Audit()
    run = audited(tmp_path, tasks)
    Processor(ac, states(concurrency, timeout=0.5, max_retries=0)).exec(run)
    check(ac)
    failed = sorted(int(job.id) - 1 for job in run.jobs.values() if job.state == FAILED)
    assert failed == list(range(hangs))
    assert sum(job.state == "done" for job in run.jobs.values()) == len(tasks) - hangs + 1


@pytest.mark.timeout(120)
@CONCURRENCY
def test_slots_stay_exact_through_a_stop(tmp_path: Path, concurrency: int) -> None:
    # Execs of 0.2 s: a stop finds some running; the run must end exactly when the
    # last of them finished (the executing count reached 0), with every result applied.
    tasks = [Task(i, sleep=0.2) for i in range(20 * concurrency)]
    ac = Audit()
    run = audited(tmp_path, tasks)
    proc = Processor(ac, states(concurrency))

    def stop_after_first_results() -> None:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("end-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.stop()

    threading.Thread(target=stop_after_first_results, daemon=True).start()
    with pytest.raises(Stopped):
        proc.exec(run)
    check(ac)
    ended = {int(p.name[4:]) for p in tmp_path.glob("end-*")}
    done = {int(job.id) - 1 for job in run.jobs.values() if job.state == "done"} - {-1}
    assert ended == done and 0 < len(done) < len(tasks)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("concurrency", "polls"), [(2, False), (64, True)])
def test_busy_workers_results_are_polled_and_all_arrive(
    tmp_path: Path, concurrency: int, polls: bool
) -> None:
    # 20 ms jobs: workers hold a second batch. 64 of them send a result every 0.3 ms,
    # so the pool polls their sockets on a timer instead of waking for each; 2 of
    # them, every 10 ms, would leave most polls empty, so it does not. Every result
    # arrives either way, with deaths among them, and the slots stay exact.
    tasks = [Task(i, "die" if i % 50 == 7 else "", sleep=0.02) for i in range(10 * concurrency)]
    ac = Audit()
    run = audited(tmp_path, tasks)
    started = time.monotonic()
    Processor(ac, states(concurrency)).exec(run)
    wall = time.monotonic() - started
    check(ac)
    assert ac.saw_polling == polls
    assert all(job.state == "done" for job in run.jobs.values())
    assert wall < 30, wall


@pytest.mark.timeout(10)
def test_a_link_closed_by_eof_unregisters_its_fd() -> None:
    # The coordinator's end of a worker's socket is closed by the worker's EOF, often
    # before the pool hears that the worker is gone. Its number must leave the
    # registry of fds forked workers close at once: reused by the next worker's
    # socket or sentinel pipe, a stale entry made that worker close its own (its
    # sentinel then said it had exited while it ran, and the coordinator hung).
    async def close_by_eof() -> int:
        ours, theirs = socket_pair()
        _fds.register(ours.fileno())
        closed = asyncio.Event()
        loop = asyncio.get_running_loop()
        link = CoordinatorEnd(ours, loop, lambda data: None, closed.set, lambda exc: None)
        theirs.close()
        await asyncio.wait_for(closed.wait(), 5)
        assert link.closed
        return link.fd

    fd = asyncio.run(close_by_eof())
    assert fd not in _fds._registered
