"""Dask worker deaths: which job is charged, and isolating the suspects.

A Dask worker that dies (the scheduler's ``remove-worker``, not expected) takes the
tasks of ours it held, running or queued behind the running one: the scheduler does
not say which one killed it.

- One task of one job, and nothing else of ours that could have been running there:
  that job is charged ``"worker died (...)"``, a failed attempt.
- Otherwise the jobs are suspects: they go back to the front of the queue uncharged,
  and run again in batches `SPLIT` times smaller than the one they died in, as many
  tasks at once as the state's slots allow (the cluster's width): a death with no
  culprit among hundreds of jobs costs a few tasks, not one task per job, and a job
  that kills workers ends up alone in its task in a few deaths. A suspect that dies
  again alone on its worker, one job in one task, is charged.
- A suspect that died in a one-job task among other tasks of ours runs with nothing
  else of the state beside it, so that it dies alone if it is the one.
- Tasks given up on (a timeout, a death) may still run somewhere: Dask may have
  restarted one elsewhere before our cancel arrived, and cannot stop a running exec.
  For `ABANDONED_SUSPECT_SECONDS` after, a job dying alone while isolating is charged
  only on its second such death.
- A worker that a pool of this process restarted (a hung exec) killed nobody: what
  it held goes back uncharged. Only that removal: a worker on a fixed port comes back
  at the same address, and its next death is a job's doing. Nor did the workers a
  ``client.restart()`` restarts, for a while after it cancelled our tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._protocol import FAILED_ATTEMPT, Outcome, Results
from .run import Job

if TYPE_CHECKING:
    from ._dask_pool import DaskPool, Task

__all__ = ["ABANDONED_SUSPECT_SECONDS", "Deaths", "Suspect"]

# Seconds after abandoning a task during which a worker death may be its doing.
ABANDONED_SUSPECT_SECONDS = 10.0
# Deaths in a one-job task among other tasks of ours after which a suspect runs
# with nothing else of the state beside it. Each death costs a worker restart (and
# the results it held that were not gathered yet): one is enough to narrow it down.
CROWD_DEATHS = 1
# How much smaller than the batch it died in a suspect's next batch is.
SPLIT = 8


class Suspect:
    """A job lost with a worker, not known to be innocent or guilty yet."""

    __slots__ = ("batch", "crowd")

    def __init__(self, batch: int) -> None:
        self.batch = batch  # the most jobs it may share a task with, itself included
        self.crowd = 0  # deaths in a one-job task among other tasks of ours


class Deaths:
    """The worker deaths of one `DaskPool`: charges, suspects and abandoned tasks."""

    __slots__ = ("abandoned", "abandoned_at", "alone", "pool", "strikes", "suspects")

    def __init__(self, pool: DaskPool) -> None:
        self.pool = pool
        self.suspects: dict[str, Suspect] = {}  # by job id
        self.alone: set[str] = set()  # suspects with CROWD_DEATHS: they run alone
        self.strikes: dict[str, int] = {}  # suspect id -> deaths alone, maybe not its own
        # Tasks given up on, key -> when (oldest first; only the recent ones are kept).
        self.abandoned: dict[str, float] = {}
        self.abandoned_at = -ABANDONED_SUSPECT_SECONDS

    def __repr__(self) -> str:
        return f"<Deaths suspects={len(self.suspects)} alone={len(self.alone)}>"

    def free(self, slots: int) -> int:
        """How many tasks may start, given ``slots`` not held by hung execs."""
        running = len(self.pool.tasks)
        if self.alone:  # a death must point at one job: nothing beside it
            return 0 if running or slots <= 0 else 1
        return max(0, slots - running)

    def worker_died(self, worker: str, keys: set[str], restarted: bool) -> None:
        """A Dask worker died while processing ``keys``: take ours. ``restarted``: a
        pool of this process restarted it (this removal, not an earlier one)."""
        pool = self.pool
        lost = {key: task for key in keys if (task := pool.tasks.pop(key, None)) is not None}
        if not lost:
            return
        if restarted or pool.cluster_restarting():
            for key, task in lost.items():
                self.abandon(key, task)
            pool.sink.unrun([job for task in lost.values() for job in task.jobs])
            return
        # One task of ours on the dead worker may still not be the killer: a task we
        # abandoned may have been running there.
        now = pool.loop.time()
        ghost = now - self.abandoned_at < ABANDONED_SUSPECT_SECONDS
        ghost = ghost or bool(keys & self.abandoned.keys() - lost.keys())
        ghost = ghost or any(hung.worker == worker for hung in pool.timeouts.hung.values())
        jobs = [job for task in lost.values() for job in task.jobs]
        certain = len(jobs) == 1 and not ghost
        if len(jobs) == 1 and ghost and self.suspects:
            strikes = self.strikes[jobs[0].id] = self.strikes.get(jobs[0].id, 0) + 1
            certain = strikes >= 2
        for key, task in lost.items():
            self.abandon(key, task)  # Dask would run it again elsewhere
        self.lost(list(lost.values()), f"worker died (Dask worker {worker} lost)", certain)

    def lost(self, tasks: list[Task], reason: str, certain: bool) -> None:
        """Tasks died with their worker: charge the job if it is certain it was the one."""
        pool = self.pool
        jobs = [job for task in tasks for job in task.jobs]
        if pool.sink.halting():
            pool.sink.unrun(jobs)
            return
        if certain:
            now = pool.loop.time()
            self.charge(jobs, reason, [task.slot_seconds(now) for task in tasks])
            return
        for task in tasks:
            size = len(task.jobs)
            for job in task.jobs:
                suspect = self.suspects.get(job.id)
                if suspect is None:
                    suspect = self.suspects[job.id] = Suspect(size)
                if size > 1:
                    suspect.batch = max(1, min(suspect.batch, size) // SPLIT)
                elif len(jobs) > 1:
                    suspect.crowd += 1
                    if suspect.crowd >= CROWD_DEATHS:
                        self.alone.add(job.id)
        self._limit()
        pool.log.debug(
            "state %r: %s; rerunning %d jobs in batches of up to %d (%d alone)",
            pool.state,
            reason,
            len(jobs),
            pool.max_batch,
            len(self.alone),
        )
        pool.sink.unrun(jobs)

    def _limit(self) -> None:
        """Batches no bigger than the smallest any suspect may share."""
        pool, suspects = self.pool, self.suspects
        smallest = min((s.batch for s in suspects.values()), default=pool.batch_max)
        pool.max_batch = min(pool.batch_max, smallest)

    def charge(self, jobs: list[Job[Any]], reason: str, seconds: list[float]) -> None:
        """``jobs`` failed an attempt with ``reason``, having held their slot ``seconds``."""
        self.settled(jobs)
        outcomes = [Outcome(FAILED_ATTEMPT, error=reason, seconds=s) for s in seconds]
        self.pool.sink.done(jobs, Results.of(outcomes))

    def settled(self, jobs: list[Job[Any]]) -> None:
        """These jobs ran (or were charged): they are no longer suspects."""
        if self.suspects:
            for job in jobs:
                self.suspects.pop(job.id, None)
                self.alone.discard(job.id)
                self.strikes.pop(job.id, None)
            self._limit()

    def abandon(self, key: str, task: Task) -> None:
        """Give up on ``task`` (cancel it); for a while, a death may be its doing."""
        now = self.pool.loop.time()
        horizon = now - ABANDONED_SUSPECT_SECONDS
        for old, at in list(self.abandoned.items()):
            if at > horizon:
                break
            del self.abandoned[old]
        self.abandoned[key] = now
        self.abandoned_at = now
        self.pool.connection.cancel(task.future)
