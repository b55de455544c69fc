"""Settling a `jorbmp._pool.ProcessPool` worker's death: which job is charged, and
what goes back to the queue.

A worker's shared status slot (`jorbmp._protocol`, ``SLOT_*``) says what it was
doing when it died, and in which of its batches:

- Executing a job: that job is charged (a failed attempt, with the time the worker's
  slot was busy since its last result); the rest of its work goes back to the front
  of the queue, uncharged, also the jobs of the running chunk that finished but whose
  results died with it (at-least-once).
- Decoding a batch or sending results: some job among those it was decoding (the
  whole batch) or sending (the chunk so far) killed it. One such job is charged;
  several are suspects, requeued to run one at a time (`Sink.unrun`'s ``isolate``),
  so that the culprit is charged and the others go on.
- Nothing (between batches), or killed by the pool blaming nobody (`NO_BLAME`):
  everything goes back uncharged.

A worker the pool kills on purpose carries a kill mark first, so that the slot's
state is judged against the exec that was meant: a timeout's mark names the exec it
timed out (`kill_if_overdue`); if that exec ended before the kill landed, the job
that started next is not charged with its timeout.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from ._backends import Sink
from ._pool_worker import KillMark, Worker
from ._protocol import (
    DECODING,
    EXECUTING,
    FAILED_ATTEMPT,
    SENDING,
    SLOT_BATCH,
    SLOT_INDEX,
    SLOT_PHASE,
    SLOT_STARTED,
    Outcome,
    Results,
)
from .run import Job

__all__ = [
    "NO_BLAME",
    "charge",
    "kill_blaming_nobody",
    "kill_for",
    "kill_if_overdue",
    "killed_by_stop",
    "settle",
]

# The kill mark of a kill that blames nobody (the worker could not be sent its work).
NO_BLAME: KillMark = (-1.0, -1.0, -1.0)


def killed_by_stop(code: int | None, forkserver: bool) -> bool:
    """Whether exit code ``code`` is that of a worker killed by a stop signal itself (a
    Ctrl-C or SIGTERM sent to the whole process group): such a worker did nothing
    wrong, and while the run stops its jobs are not charged."""
    if code in (-signal.SIGTERM, -signal.SIGINT):
        return True
    # Under forkserver the server died with it: the worker's own code is lost.
    return forkserver and code == 255


def settle(
    sink: Sink, worker: Worker, batches: list[list[Job[Any]]], reason: str, code: int | None
) -> bool:
    """Charge and requeue the jobs a dead worker held (``batches``, not empty); True
    if a job was charged."""
    slot = worker.slot
    front = batches[0][worker.reported :]
    later = [job for batch in batches[1:] for job in batch]
    phase, started = slot[SLOT_PHASE], slot[SLOT_STARTED]
    at = int(slot[SLOT_INDEX]) - worker.reported  # in ``front``
    if slot[SLOT_BATCH] != worker.completed or (phase != DECODING and not 0 <= at < len(front)):
        phase = 0.0  # the slot describes a batch that is done: nothing was running
    mark = worker.kill_mark
    if phase == EXECUTING and (
        mark is None or mark == (slot[SLOT_BATCH], slot[SLOT_INDEX], started)
    ):
        # Jobs before ``at`` ran, but their results (at most a chunk's worth) died
        # with the worker: they run again (at-least-once), without being charged.
        sink.unrun(front[:at] + front[at + 1 :] + later)
        charge(sink, front[at], reason, worker)
        return True
    if mark is None and phase in (DECODING, SENDING):
        # Died outside an exec: some job of those it was decoding (the whole batch)
        # or sending (the chunk up to ``at``) killed it, but which one?
        suspects = front if phase == DECODING else front[: at + 1]
        rest = front[len(suspects) :] + later
        if len(suspects) == 1:
            sink.unrun(rest)
            what = "decoding its job context" if phase == DECODING else "sending its results"
            charge(sink, suspects[0], f"worker died while {what} (exit code {code})", worker)
            return True
        sink.unrun(suspects + rest, isolate=suspects)
        return False
    # Nothing was running (or a kill that blames nobody): nothing to charge.
    sink.unrun(front + later)
    return False


def charge(sink: Sink, job: Job[Any], reason: str, worker: Worker) -> None:
    """Fail ``job``'s attempt with ``reason``, charging it the time ``worker``'s slot
    was busy since its last result (what metrics count as its exec time)."""
    seconds = max(0.0, time.monotonic() - worker.since)
    sink.done([job], Results.of([Outcome(FAILED_ATTEMPT, error=reason, seconds=seconds)]))


def kill_if_overdue(worker: Worker, now: float, timeout: float) -> bool:
    """Kill ``worker`` if its exec has run longer than ``timeout`` (and it is not being
    killed already); True if it was. The caller stops giving it work."""
    slot = worker.slot
    started = slot[SLOT_STARTED]
    if not (
        worker.batches
        and started
        and now - started > timeout
        and worker.kill_mark is None
        and slot[SLOT_PHASE] == EXECUTING
    ):
        return False
    kill_for(worker, f"timed out after {timeout:g}s (worker killed)")
    return True


def kill_for(worker: Worker, reason: str) -> None:
    """Kill ``worker``, charging the exec it runs now with ``reason`` (a timeout, the
    memory limit). Marked with what was running: if that exec ends before the kill
    lands, the job that started next is not charged with it."""
    slot = worker.slot
    worker.kill_mark = (slot[SLOT_BATCH], slot[SLOT_INDEX], slot[SLOT_STARTED])
    worker.kill_reason = reason
    worker.kill()


def kill_blaming_nobody(worker: Worker) -> None:
    """Kill ``worker`` so that its death charges no job (all it held goes back)."""
    worker.kill_mark = NO_BLAME
    worker.kill()
