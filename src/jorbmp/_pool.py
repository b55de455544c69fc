"""The worker-process pool of one process state (`ProcessPool`).

One pool per state, ``concurrency`` workers each with its own pipe; the protocol is
described in `jorbmp._protocol`. The pool never blocks the coordinator on a busy
worker (a worker holds at most one batch) and never hangs on a dead one: both the
pipe and the process sentinel are watched by the event loop, so a worker that
exits, is killed or segfaults is noticed at once, its job is charged with the
failure, the rest of its batch goes back to the queue, and a replacement starts.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

import msgspec

from . import _fds
from ._backends import Backend, Sink
from ._protocol import (
    FAILED_ATTEMPT,
    SLOT_INDEX,
    SLOT_SIZE,
    SLOT_STARTED,
    Outcome,
    Startup,
    WorkerSpec,
)
from ._worker import worker_main
from .run import Job

log = logging.getLogger("jorbmp")

# Largest batch of jobs sent to one worker in one message. Bigger batches amortise
# pipe and encoding overhead for tiny jobs; smaller ones return results sooner and
# lose less work when a worker dies. The coordinator sizes batches below this by
# the queue's depth and the state's mean exec time (see Lane.batch_limit).
MAX_BATCH = 256
# Workers that die before they are ready, in a row, before the run gives up: a worker
# that cannot start (bad ac_factory, import error under spawn) would otherwise be
# replaced forever.
MAX_STARTUP_FAILURES = 3
# Seconds to wait for a worker to exit on its own before it is killed.
EXIT_WAIT = 2.0


class _Worker:
    __slots__ = ("conn", "jobs", "kill_reason", "process", "ready", "slot")

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection, slot: Any):
        self.process = process
        self.conn = conn
        self.slot = slot
        self.jobs: list[Job[Any]] | None = None
        self.ready = False
        self.kill_reason: str | None = None


class ProcessPool(Backend):
    """``kind="process"``: ``concurrency`` worker processes, each fed batches over a pipe."""

    max_batch = MAX_BATCH

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
        self.idle: list[_Worker] = []
        self.busy = 0
        self.closing = False
        self.startup_failures = 0
        self.spawned = 0
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_outcomes = msgspec.msgpack.Decoder(list[Outcome]).decode
        self._decode_startup = msgspec.msgpack.Decoder(Startup).decode

    def __repr__(self) -> str:
        return (
            f"<ProcessPool {self.spec.state!r} workers={len(self.workers)} "
            f"idle={len(self.idle)} busy={self.busy}>"
        )

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for _ in range(self.concurrency):
            self._spawn()

    def _spawn(self) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        slot = self.ctx.RawArray("d", SLOT_SIZE)
        self.spawned += 1
        process = self.ctx.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(child, self.spec, slot),
            name=f"jorbmp-{self.spec.state}-{self.spawned}",
        )
        _fds.register(parent.fileno())  # before start: the child must not keep it either
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
        worker = _Worker(process, parent, slot)
        self.workers.append(worker)
        self.loop.add_reader(parent.fileno(), self._readable, worker)
        self.loop.add_reader(process.sentinel, self._exited, worker)

    def free(self) -> int:
        return 0 if self.closing else len(self.idle)

    def executing(self) -> int:
        return self.busy

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def submit(self, jobs: list[Job[Any]]) -> None:
        worker = self.idle.pop()
        worker.jobs = jobs
        self.busy += 1
        try:
            worker.conn.send_bytes(self._encode([job.context for job in jobs]))
        except OSError:
            # Died just now; its jobs never started. Deferred: we are inside a pump.
            self.loop.call_soon(self._exited, worker)

    def _readable(self, worker: _Worker) -> None:
        # Called by the event loop, which would only log an exception: anything
        # unexpected here must end the run instead of leaving it waiting forever.
        try:
            self._receive(worker)
        except Exception as exc:
            self.sink.fatal(exc)

    def _exited(self, worker: _Worker) -> None:
        try:
            self._lost(worker)
        except Exception as exc:
            self.sink.fatal(exc)

    def _receive(self, worker: _Worker) -> None:
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._lost(worker)
            return
        if not worker.ready:
            startup = self._decode_startup(data)
            if startup.error is not None:
                self.sink.fatal(RuntimeError(f"state {self.spec.state!r}: {startup.error}"))
                return
            worker.ready = True
            self.startup_failures = 0
            self.idle.append(worker)
            self.sink.freed()
            return
        jobs, worker.jobs = worker.jobs, None
        self.busy -= 1
        self.idle.append(worker)
        assert jobs is not None
        self.sink.done(jobs, self._decode_outcomes(data))

    def _lost(self, worker: _Worker) -> None:
        """A worker is gone: charge its current job, requeue the rest, replace it."""
        if worker not in self.workers:
            return  # already handled (EOF and sentinel both fire)
        self.workers.remove(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        self.loop.remove_reader(worker.conn.fileno())
        self.loop.remove_reader(worker.process.sentinel)
        worker.process.join(EXIT_WAIT)
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()
        _fds.unregister(worker.conn.fileno())
        worker.conn.close()
        reason = worker.kill_reason or f"worker died (exit code {worker.process.exitcode})"
        jobs, worker.jobs = worker.jobs, None
        if self.closing:
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
        self._spawn()
        if not jobs:
            return
        self.busy -= 1
        if worker.slot[SLOT_STARTED] == 0.0:
            # Died before starting the batch or after finishing it: no job to blame.
            self.sink.unrun(jobs)
            return
        i = min(int(worker.slot[SLOT_INDEX]), len(jobs) - 1)
        # Jobs before i ran but their results died with the worker: they run again
        # (at-least-once), without being charged.
        self.sink.unrun(jobs[:i] + jobs[i + 1 :])
        self.sink.done([jobs[i]], [Outcome(FAILED_ATTEMPT, error=reason)])

    def check_timeouts(self, now: float) -> None:
        if self.timeout is None:
            return
        for worker in self.workers:
            started = worker.slot[SLOT_STARTED]
            if worker.jobs and started and now - started > self.timeout and not worker.kill_reason:
                worker.kill_reason = f"timed out after {self.timeout:g}s (worker killed)"
                worker.process.kill()

    def close(self, abandon: bool) -> None:
        self.closing = True
        for worker in self.workers:
            self.loop.remove_reader(worker.conn.fileno())
            self.loop.remove_reader(worker.process.sentinel)
            if abandon:
                worker.process.kill()
            _fds.unregister(worker.conn.fileno())
            worker.conn.close()  # EOF: an idle worker exits at once
        deadline = time.monotonic() + EXIT_WAIT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
        self.workers.clear()
        self.idle.clear()
