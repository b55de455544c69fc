"""Big pools start cheaply (issue 16, item 5): workers start as the queue needs them,
up to ``concurrency``, and the first ones get work while the rest are forked."""

from __future__ import annotations

import os
import time

import msgspec
import psutil
import pytest

from jorbmp import Processor, Run, State


class Seen(msgspec.Struct):
    """What an exec saw: its worker, and how many workers the coordinator had."""

    n: int
    sleep: float = 0.0
    pid: int = 0
    workers: int = 0


def look(ac: object, oc: object, jc: Seen) -> tuple[Seen, str]:
    jc.pid = os.getpid()
    coordinator = psutil.Process(os.getppid())  # fork: the coordinator is the parent
    jc.workers = sum(1 for p in coordinator.children() if p.name() == psutil.Process().name())
    time.sleep(jc.sleep)
    return jc, "done"


def seen_run(jobs: int, sleep: float) -> Run[None, Seen]:
    run: Run[None, Seen] = Run("start", None, Seen)
    for i in range(jobs):
        run.add_job(Seen(i, sleep))
    return run


def states(concurrency: int) -> list[State]:
    return [State("new", look, concurrency=concurrency), State("done", terminal=True)]


@pytest.mark.timeout(60)
def test_ten_jobs_at_concurrency_256_start_at_most_ten_workers() -> None:
    run = seen_run(10, 0.05)
    Processor(None, states(256), mp_context="fork").exec(run)
    jobs = list(run.jobs.values())
    assert all(job.state == "done" for job in jobs)
    assert len({job.context.pid for job in jobs}) <= 10
    # (+1: the multiprocessing resource tracker, a child too, when it runs.)
    assert max(job.context.workers for job in jobs) <= 11, [j.context.workers for j in jobs]


@pytest.mark.timeout(120)
def test_first_jobs_run_while_the_other_workers_start() -> None:
    # 1,024 jobs of 20 ms at concurrency 256: the first exec starts long before the
    # 256th worker is forked (each fork takes a few ms of the coordinator's time).
    run = seen_run(1024, 0.02)
    started = time.monotonic()
    Processor(None, states(256), mp_context="fork").exec(run)
    wall = time.monotonic() - started
    jobs = list(run.jobs.values())
    assert all(job.state == "done" for job in jobs)
    first = min(job.context.workers for job in jobs)
    assert first < 200, first
    # Started while the queue needed them: many, never more than the concurrency.
    assert 16 < len({job.context.pid for job in jobs}) <= 256
    assert wall < 60, wall


class Span(msgspec.Struct):
    """When an exec ran, as its worker saw it."""

    n: int
    start: float = 0.0
    end: float = 0.0


def flaky_ac() -> dict[str, int]:
    """An AC factory whose 2nd and 3rd calls in workers die (calls are numbered through
    files in $JORBMP_TEST_ACDIR; call 0 is the coordinator's, 1 the eager worker's)."""
    where = os.environ["JORBMP_TEST_ACDIR"]
    k = 0
    while True:
        try:
            os.close(os.open(os.path.join(where, str(k)), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            k += 1
    if k in (2, 3):
        os._exit(1)
    return {"k": k}


def span(ac: object, oc: object, jc: Span) -> tuple[Span, str]:
    jc.start = time.time()
    time.sleep(0.5)
    jc.end = time.time()
    return jc, "done"


@pytest.mark.timeout(120)
def test_workers_dying_at_start_never_leave_more_execs_than_concurrency(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two deaths in a row put the replacement on a delay; the queue's demand must not
    # start another worker meanwhile (there were 9 execs at once at concurrency 8).
    monkeypatch.setenv("JORBMP_TEST_ACDIR", str(tmp_path))
    run: Run[None, Span] = Run("flaky", None, Span)
    for i in range(24):
        run.add_job(Span(i))
    states = [State("new", span, concurrency=8), State("done", terminal=True)]
    Processor(None, states, ac_factory=flaky_ac, mp_context="fork").exec(run)
    jobs = list(run.jobs.values())
    assert all(job.state == "done" for job in jobs)
    edges = sorted(
        [(job.context.start, 1) for job in jobs] + [(job.context.end, -1) for job in jobs]
    )
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most <= 8, most
