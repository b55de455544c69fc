"""The process pool's parts through their own interfaces: when the `Spawner` starts
workers and gives up, and how `jorbmp._pool_deaths` settles a worker's death from
what its status slot says. (End to end, with real workers dying, see
test_engine_reliability.py, test_dispatch_start.py and test_dispatch_slots.py.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

import pytest

from jorbmp._pool_deaths import NO_BLAME, kill_if_overdue, killed_by_stop, settle
from jorbmp._pool_spawner import MAX_BARREN_DEATHS, MAX_STARTUP_FAILURES, Spawner
from jorbmp._pool_worker import Worker
from jorbmp._protocol import (
    DECODING,
    EXECUTING,
    SENDING,
    SLOT_BATCH,
    SLOT_INDEX,
    SLOT_PHASE,
    SLOT_SIZE,
    SLOT_STARTED,
    Results,
)
from jorbmp.run import Job


class Sink:
    """What a pool's part reports to the coordinator's lane, recorded."""

    def __init__(self) -> None:
        self.fatals: list[BaseException] = []
        self.charged: list[tuple[str, str | None, float]] = []  # (job id, error, seconds)
        self.requeued: list[str] = []
        self.isolated: list[str] = []
        self.stopping = False

    def done(self, jobs: list[Job[Any]], results: Results) -> None:
        for job, outcome in zip(jobs, results.outcomes(), strict=True):
            self.charged.append((job.id, outcome.error, outcome.seconds))

    def unrun(self, jobs: list[Job[Any]], isolate: list[Job[Any]] | None = None) -> None:
        self.requeued += [job.id for job in jobs]
        self.isolated += [job.id for job in isolate or []]

    def freed(self) -> None:
        pass

    def halting(self) -> bool:
        return self.stopping

    def fatal(self, exc: BaseException) -> None:
        self.fatals.append(exc)

    def batch_scale(self) -> int:
        return 1


def spawner(concurrency: int, launch_seconds: float = 0.0) -> tuple[Spawner, Sink, list[int]]:
    """A spawner whose launches are recorded (and take ``launch_seconds`` each)."""
    sink = Sink()
    workers: list[int] = []

    def launch(number: int) -> None:
        time.sleep(launch_seconds)
        workers.append(number)

    def guard(fn: Any, *args: Any) -> None:
        fn(*args)

    return Spawner("work", concurrency, sink, workers, launch, guard), sink, workers


async def spawned(s: Spawner) -> None:
    """Let the loop run until the spawner has started all the workers it wants."""
    while s.to_spawn:
        await asyncio.sleep(0)


@pytest.mark.timeout(30)
def test_the_spawner_starts_one_worker_then_one_per_waiting_job_in_slices() -> None:
    async def go() -> None:
        s, _, workers = spawner(256, launch_seconds=0.002)
        s.start(asyncio.get_running_loop())
        assert workers == [1] and s.unready == 1  # at once, whatever the queue
        s.demand(10)  # the starting worker takes one of them
        assert s.to_spawn == 9
        s.demand(10)  # the same 10 jobs: already covered
        assert s.to_spawn == 9
        await asyncio.sleep(0)
        # The loop ran between slices: a slice forks for 5 ms, 2 ms per worker.
        assert 2 <= len(workers) <= 4, workers
        await spawned(s)
        assert workers == list(range(1, 11)) and s.unready == 10
        for _ in workers:
            s.ready()
        s.demand(1000)  # never beyond concurrency
        await spawned(s)
        assert len(workers) == 256
        s.demand(1000)
        assert s.to_spawn == 0

    asyncio.run(go())


@pytest.mark.timeout(30)
def test_barren_deaths_space_replacements_out_then_end_the_run() -> None:
    async def go() -> None:
        s, sink, workers = spawner(4)
        s.start(asyncio.get_running_loop())
        s.ready()
        s.replace(ready=True, charged=False, reason="worker died (exit code 1)")
        assert len(workers) == 2  # the first barren death: replaced at once
        s.replace(ready=True, charged=False, reason="worker died (exit code 1)")
        assert len(workers) == 2 and s.respawns == 1  # the second: after a delay
        s.demand(100)  # the delayed replacement counts as a worker
        assert s.to_spawn == 4 - len(workers) - 1
        s.progress = True  # a result since: the next death is not barren
        s.replace(ready=True, charged=False, reason="worker died (exit code 1)")
        assert s.barren_deaths == 0
        for _ in range(MAX_BARREN_DEATHS):
            assert not sink.fatals
            s.replace(ready=True, charged=False, reason="worker died (exit code 1)")
        assert [str(e) for e in sink.fatals] == [
            f"state 'work': {MAX_BARREN_DEATHS} worker processes in a row died without "
            "finishing or failing a job (the last: worker died (exit code 1))"
        ]
        s.close()

    asyncio.run(go())


@pytest.mark.timeout(30)
def test_workers_dying_before_ready_end_the_run_unless_one_got_ready() -> None:
    async def go() -> None:
        s, sink, workers = spawner(4)
        s.start(asyncio.get_running_loop())
        s.replace(ready=False, charged=False, reason="worker died (exit code 3)")
        s.ready()  # the replacement started: the count begins again
        for _ in range(MAX_STARTUP_FAILURES - 1):
            s.replace(ready=False, charged=False, reason="worker died (exit code 3)")
        assert not sink.fatals
        started = (len(workers), s.respawns)
        s.replace(ready=False, charged=False, reason="worker died (exit code 3)")
        assert [str(e) for e in sink.fatals] == [
            f"state 'work': {MAX_STARTUP_FAILURES} worker processes in a row died while "
            "starting (worker died (exit code 3))"
        ]
        assert (len(workers), s.respawns) == started  # the last is not replaced
        s.close()

    asyncio.run(go())


def dead_worker(
    batches: list[list[str]], phase: float, index: int, batch: int = 0, started: float = 1.0
) -> tuple[Worker, list[list[Job[Any]]]]:
    """A worker (never started) that held ``batches`` of job ids, its slot saying it
    was at ``phase`` on job ``index`` of its batch number ``batch``."""
    worker = Worker(multiprocessing.get_context().Process(target=print), [0.0] * SLOT_SIZE)
    worker.slot[SLOT_PHASE] = phase
    worker.slot[SLOT_INDEX] = index
    worker.slot[SLOT_BATCH] = batch
    worker.slot[SLOT_STARTED] = started
    worker.since = time.monotonic() - 0.5
    worker.batches.extend([Job(i, None) for i in ids] for ids in batches)
    return worker, list(worker.batches)


@pytest.mark.timeout(10)
def test_a_death_in_an_exec_charges_that_job_and_requeues_the_rest() -> None:
    sink = Sink()
    worker, batches = dead_worker([["a", "b", "c"], ["d"]], EXECUTING, 2)
    worker.reported = 1  # the result of "a" came back
    assert settle(sink, worker, batches, "died", 9)
    assert [(job, error) for job, error, _ in sink.charged] == [("c", "died")]
    assert sink.charged[0][2] >= 0.5  # the time its slot was busy since the last result
    assert sink.requeued == ["b", "d"] and sink.isolated == []


@pytest.mark.timeout(10)
def test_a_death_outside_an_exec_isolates_the_suspects_or_charges_the_one() -> None:
    sink = Sink()
    worker, batches = dead_worker([["a", "b", "c"], ["d"]], DECODING, 0)
    assert not settle(sink, worker, batches, "died", 9)
    assert sink.charged == [] and sink.requeued == ["a", "b", "c", "d"]
    assert sink.isolated == ["a", "b", "c"]

    sink = Sink()
    worker, batches = dead_worker([["a", "b"]], SENDING, 0)
    assert settle(sink, worker, batches, "died", 9)
    assert [(job, error) for job, error, _ in sink.charged] == [
        ("a", "worker died while sending its results (exit code 9)")
    ]
    assert sink.requeued == ["b"] and sink.isolated == []


@pytest.mark.timeout(10)
def test_a_slot_of_a_finished_batch_or_a_kill_blaming_nobody_charges_nobody() -> None:
    for batch, mark in [(1, None), (0, NO_BLAME)]:
        sink = Sink()
        worker, batches = dead_worker([["a", "b"]], EXECUTING, 0, batch=batch)
        worker.kill_mark = mark
        assert not settle(sink, worker, batches, "died", 9)
        assert sink.charged == [] and sink.requeued == ["a", "b"]


@pytest.mark.timeout(10)
def test_a_timeout_charges_the_exec_it_timed_out_and_not_the_next() -> None:
    worker, batches = dead_worker([["a", "b"]], EXECUTING, 0, started=time.monotonic() - 2)
    assert not kill_if_overdue(worker, time.monotonic(), 5.0)
    assert kill_if_overdue(worker, time.monotonic(), 1.0)
    assert not kill_if_overdue(worker, time.monotonic(), 1.0)  # marked already
    assert worker.kill_reason == "timed out after 1s (worker killed)"
    sink = Sink()
    assert settle(sink, worker, batches, worker.kill_reason, -9)
    assert [job for job, _, _ in sink.charged] == ["a"] and sink.requeued == ["b"]
    # "a" ended before the kill landed and "b" started: nobody is charged.
    worker.slot[SLOT_INDEX], worker.slot[SLOT_STARTED] = 1, time.monotonic()
    sink = Sink()
    assert not settle(sink, worker, batches, worker.kill_reason, -9)
    assert sink.charged == [] and sink.requeued == ["a", "b"]


@pytest.mark.timeout(10)
def test_only_a_stop_signal_s_exit_codes_are_a_stop() -> None:
    assert killed_by_stop(-15, False) and killed_by_stop(-2, False)
    assert not killed_by_stop(-9, False) and not killed_by_stop(None, False)
    assert killed_by_stop(255, True) and not killed_by_stop(255, False)
