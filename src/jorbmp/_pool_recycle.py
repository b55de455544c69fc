"""Worker recycling (`Recycler`): when a `jorbmp._pool.ProcessPool` replaces a worker
that has run ``max_jobs_per_worker`` jobs, or whose RSS exceeds ``max_worker_memory``
bytes once a batch's results are all back (``State(...)``).

The policy answers three questions; the pool does the rest:

- `allowance`: how many more jobs a worker may be sent. The pool caps a batch at it
  and gives the rest back to the queue, so a batch never straddles the job count;
- `sent`: jobs went to a worker; True once its allowance is spent;
- `over_memory`: whether a worker's RSS (psutil) is over the limit, asked when a
  batch's results are all back, and before a worker that runs a batch is sent a
  second one to queue behind it (one over the limit gets none).

A worker found to be over either limit takes no more work, and goes (the pool lets
it go: `jorbmp._pool_exits`) once what it holds is back: nothing it ran is lost,
re-run or charged, and its exit is no death. It no longer counts against the
state's concurrency, so its replacement starts as soon as jobs wait for it, while
the old worker finishes.

So a worker's RSS overshoots the limit by what the batches it holds leak: those
sent before its RSS was seen over the limit (one, or two while a second is queued
behind the running one, see `jorbmp._pool.PIPELINE_SECONDS`).
"""

from __future__ import annotations

import logging

import psutil

from ._pool_worker import Worker

__all__ = ["Recycler"]

log = logging.getLogger("jorbmp")


class Recycler:
    """When the workers of state ``state`` are replaced: after ``max_jobs`` jobs each,
    or once one's RSS exceeds ``max_memory`` bytes (None: no such limit)."""

    __slots__ = ("max_jobs", "max_memory", "state", "warned")

    def __init__(self, state: str, max_jobs: int | None, max_memory: float | None) -> None:
        self.state = state
        self.max_jobs = max_jobs
        self.max_memory = max_memory
        self.warned = False  # (the warning of `_over_at_once`, once per run)

    def __repr__(self) -> str:
        return f"<Recycler {self.state!r} max_jobs={self.max_jobs} max_memory={self.max_memory}>"

    def allowance(self, worker: Worker) -> int | None:
        """Jobs ``worker`` may still be sent (at least 1 while it takes work); None: any."""
        if self.max_jobs is None:
            return None
        return self.max_jobs - worker.sent

    def sent(self, worker: Worker, jobs: int) -> bool:
        """``jobs`` jobs went to ``worker``; True when it may be sent no more."""
        worker.sent += jobs
        return self.max_jobs is not None and worker.sent >= self.max_jobs

    def over_memory(self, worker: Worker) -> bool:
        """Whether ``worker``'s RSS is over the limit (False without one)."""
        if self.max_memory is None:
            return False
        try:
            if worker.rss_probe is None:  # (made once: making one costs twice a read)
                worker.rss_probe = psutil.Process(worker.pid)
            rss = worker.rss_probe.memory_info().rss
        except psutil.Error:
            return False  # gone: its death is the pool's business, not a recycle
        if rss <= self.max_memory:
            return False
        if worker.completed == 0:
            self._over_at_once(rss)
        return True

    def _over_at_once(self, rss: int) -> None:
        """A worker was over the limit in its first batch: every worker will be
        replaced after every batch, which costs a start each, and is most likely a
        limit below what a fresh worker holds (under fork, the coordinator's heap)."""
        if self.warned:
            return
        self.warned = True
        log.warning(
            "state %r: a worker's RSS was %d bytes in its first batch, over "
            "max_worker_memory=%d: workers will be replaced after every batch. A forked "
            "worker starts with the coordinator's memory; raise max_worker_memory, or use "
            "mp_context='forkserver' (workers start small)",
            self.state,
            rss,
            self.max_memory,
        )
