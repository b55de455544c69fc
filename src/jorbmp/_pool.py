"""The worker-process pool of one process state (`ProcessPool`).

One pool per state, ``concurrency`` workers, each with its own socket (framing in
`jorbmp._comms`, conversation in `jorbmp._protocol`). The pool never blocks the
coordinator on a busy worker and never hangs on a dead one: the socket and the
process sentinel are both watched by the event loop, so a worker that exits, is
killed or segfaults is noticed at once, the job it was running is charged with the
failure, the rest of its work goes back to the front of the queue, and a
replacement starts.

While a state's jobs are short (mean under `PIPELINE_SECONDS`), each worker holds
a second batch queued behind the one it runs, so it never waits a round trip for
work; long jobs get one batch per worker, so a free worker can always take the
next job.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any

import msgspec

from . import _fds
from ._backends import Backend, Sink
from ._comms import CoordinatorEnd, socket_pair
from ._protocol import (
    FAILED_ATTEMPT,
    SLOT_INDEX,
    SLOT_SIZE,
    SLOT_STARTED,
    Outcome,
    Results,
    Startup,
    WorkerSpec,
)
from ._worker import worker_main
from .run import Job

log = logging.getLogger("jorbmp")

# Largest batch of jobs sent to one worker in one message. Bigger batches amortise
# the cost of a message for tiny jobs; smaller ones return results sooner and send
# less work back when a worker dies. The coordinator sizes batches below this by
# the queue's depth and the state's mean exec time (see Lane.batch_limit).
MAX_BATCH = 256
# Mean exec time under which workers get a second batch queued behind the running
# one. Above it the round trip is negligible and queueing would only make a job
# wait behind another instead of going to the next free worker. Not lower: when the
# workers keep every core busy, the coordinator itself may wait a scheduler slice or
# two before it can answer, and at 5 ms (the previous value) 10 ms jobs lost 5-8% of
# their throughput to that wait.
PIPELINE_SECONDS = 0.05
# Workers that die before they are ready, in a row, before the run gives up: a worker
# that cannot start (bad ac_factory, import error under spawn) would otherwise be
# replaced forever.
MAX_STARTUP_FAILURES = 3
# Seconds to wait for a worker to exit on its own before it is killed.
EXIT_WAIT = 2.0


class _Worker:
    __slots__ = ("batches", "kill_reason", "link", "process", "ready", "slot")

    def __init__(self, process: multiprocessing.process.BaseProcess, slot: Any) -> None:
        self.process = process
        self.slot = slot
        self.link: CoordinatorEnd
        self.batches: deque[list[Job[Any]]] = deque()  # sent, results not back yet
        self.ready = False
        self.kill_reason: str | None = None


class ProcessPool(Backend):
    """``kind="process"``: ``concurrency`` worker processes, each fed batches over a socket."""

    max_batch = MAX_BATCH
    started_pids = True

    def __init__(
        self,
        spec: WorkerSpec,
        concurrency: int,
        ctx: BaseContext,
        sink: Sink,
        timeout: float | None,
    ) -> None:
        self.spec = spec
        self.concurrency = concurrency
        self.ctx = ctx
        self.sink = sink
        self.timeout = timeout
        self.workers: list[_Worker] = []
        self.closing = False
        self.closed_at = 0.0  # monotonic time of `close`
        self.startup_failures = 0
        self.spawned = 0
        self.mean_seconds: float | None = None  # recent mean exec time
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_results = msgspec.msgpack.Decoder(Results).decode
        self._decode_startup = msgspec.msgpack.Decoder(Startup).decode

    def __repr__(self) -> str:
        ready = sum(w.ready for w in self.workers)
        return (
            f"<ProcessPool {self.spec.state!r} workers={len(self.workers)} ready={ready} "
            f"executing={self.executing()} depth={self._depth()}>"
        )

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for _ in range(self.concurrency):
            self._spawn()

    def _spawn(self) -> None:
        parent, child = socket_pair()
        slot = self.ctx.RawArray("d", SLOT_SIZE)
        self.spawned += 1
        process = self.ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(child, self.spec, slot),
            name=f"jorbmp-{self.spec.state}-{self.spawned}",
        )
        _fds.register(parent.fileno())  # before start: a forked child must not keep it
        try:
            process.start()
        except Exception as exc:
            _fds.unregister(parent.fileno())
            parent.close()
            child.close()
            raise RuntimeError(
                f"state {self.spec.state!r}: cannot start a worker process "
                f"({type(exc).__name__}: {exc}); under the 'spawn' and 'forkserver' start "
                "methods the app and overall contexts must be picklable (or pass "
                "ac_factory= to build the app context in each worker)"
            ) from exc
        child.close()  # the worker holds the only other end: EOF means it is gone
        worker = _Worker(process, slot)
        worker.link = CoordinatorEnd(
            parent,
            self.loop,
            lambda data: self._guard(self._message, worker, data),
            lambda: self._guard(self._lost, worker),
        )
        self.workers.append(worker)
        self.loop.add_reader(process.sentinel, self._guard, self._exited, worker)

    def _guard(self, fn: Any, *args: Any) -> None:
        # Event-loop callbacks: the loop would only log an exception, so anything
        # unexpected must end the run here instead of leaving it waiting forever.
        try:
            fn(*args)
        except Exception as exc:
            self.sink.fatal(exc)

    def _depth(self) -> int:
        mean = self.mean_seconds
        return 2 if mean is not None and mean < PIPELINE_SECONDS else 1

    def free(self) -> int:
        if self.closing:
            return 0
        depth = self._depth()
        return sum(max(0, depth - len(w.batches)) for w in self.workers if w.ready)

    def executing(self) -> int:
        if self.closing:
            return 0  # what workers still hold was abandoned: it will never finish
        return sum(1 for w in self.workers if w.batches)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def submit(self, jobs: list[Job[Any]]) -> None:
        # The ready worker with the least work: an idle one if there is one.
        worker = min((w for w in self.workers if w.ready), key=lambda w: len(w.batches))
        worker.batches.append(jobs)
        worker.link.send(self._encode([job.context for job in jobs]))

    def _message(self, worker: _Worker, data: bytes) -> None:
        if not worker.ready:
            startup = self._decode_startup(data)
            if startup.error is not None:
                self.sink.fatal(RuntimeError(f"state {self.spec.state!r}: {startup.error}"))
                return
            worker.ready = True
            self.startup_failures = 0
            self.sink.freed()
            return
        jobs = worker.batches.popleft()
        results = self._decode_results(data)
        batch_mean = sum(results.seconds) / len(jobs)
        mean = self.mean_seconds
        self.mean_seconds = batch_mean if mean is None else 0.8 * mean + 0.2 * batch_mean
        self.sink.done(jobs, results)

    def _exited(self, worker: _Worker) -> None:
        # Results the worker sent before it died may still sit in the socket: take
        # them first, so that only the job it died in is charged.
        worker.link.drain()
        self._lost(worker)

    def _lost(self, worker: _Worker) -> None:
        """A worker is gone: charge its current job, requeue the rest, replace it."""
        if worker not in self.workers:
            return  # already handled (EOF and sentinel both report it)
        self.workers.remove(worker)
        worker.link.close()
        _fds.unregister(worker.link.fd)
        self.loop.remove_reader(worker.process.sentinel)
        worker.process.join(EXIT_WAIT)
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()
        code = worker.process.exitcode
        reason = worker.kill_reason or f"worker died (exit code {code})"
        batches = list(worker.batches)
        worker.batches.clear()
        if self.closing:
            return
        # Stopping: a worker killed by the stop signal itself (a Ctrl-C or SIGTERM sent
        # to the whole process group) did nothing wrong; its jobs are not charged.
        stop_signals = (-signal.SIGTERM, -signal.SIGINT)
        if self.sink.halting() and batches and code in stop_signals:
            self.sink.unrun([job for batch in batches for job in batch])
            return
        log.debug("state %r: %s (pid %s)", self.spec.state, reason, worker.process.pid)
        if not worker.ready:
            self.startup_failures += 1
            if self.startup_failures >= MAX_STARTUP_FAILURES:
                self.sink.fatal(
                    RuntimeError(
                        f"state {self.spec.state!r}: {self.startup_failures} worker processes "
                        f"in a row died while starting ({reason})"
                    )
                )
                return
        if not self.sink.halting():
            self._spawn()  # no replacement while stopping: nothing new is dispatched
        if not batches:
            return
        current, later = batches[0], [job for batch in batches[1:] for job in batch]
        if worker.slot[SLOT_STARTED] == 0.0:
            # Died before starting its batch or after finishing it: nobody to blame.
            self.sink.unrun(current + later)
            return
        i = min(int(worker.slot[SLOT_INDEX]), len(current) - 1)
        # Jobs before i ran, but their results died with the worker: they run again
        # (at-least-once), without being charged.
        self.sink.unrun(current[:i] + current[i + 1 :] + later)
        self.sink.done([current[i]], Results.of([Outcome(FAILED_ATTEMPT, error=reason)]))

    def check_timeouts(self, now: float) -> None:
        if self.timeout is None:
            return
        for worker in self.workers:
            started = worker.slot[SLOT_STARTED]
            if (
                worker.batches
                and started
                and now - started > self.timeout
                and not worker.kill_reason
            ):
                worker.kill_reason = f"timed out after {self.timeout:g}s (worker killed)"
                worker.process.kill()

    def close(self, abandon: bool) -> None:
        self.closing = True
        self.closed_at = time.monotonic()
        for worker in self.workers:
            self.loop.remove_reader(worker.process.sentinel)
            if abandon:
                worker.process.kill()
            _fds.unregister(worker.link.fd)
            worker.link.close()  # EOF: an idle worker exits at once

    def wait_closed(self) -> None:
        """Reap the workers `close` sent away; kill any still there after `EXIT_WAIT`."""
        deadline = self.closed_at + EXIT_WAIT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
        self.workers.clear()
