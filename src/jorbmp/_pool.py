"""The worker-process pool of one process state (`ProcessPool`).

One pool per state, ``concurrency`` workers, each with its own socket (framing in
`jorbmp._comms`, conversation in `jorbmp._protocol`). The pool never blocks the
coordinator on a busy worker and never hangs on a dead one: the socket and the
process sentinel are both watched by the event loop, so a worker that exits, is
killed or segfaults is noticed at once, the job it was running is charged with the
failure, the rest of its work goes back to the front of the queue, and a
replacement starts. A worker that dies outside an exec (decoding a batch, encoding
results) cannot say which job killed it: those jobs are retried one at a time, so
that the culprit is charged and the others go on. Replacements that die without
any job getting anywhere are spaced out and, past `MAX_BARREN_DEATHS`, end the run.

While a state's jobs are short (mean under `PIPELINE_SECONDS`), each worker holds
a second batch queued behind the one it runs, so it never waits a round trip for
work; long jobs get one batch per worker, so a free worker can always take the
next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any

import msgspec

from . import _comms, _fds
from ._backends import Backend, Sink
from ._comms import CoordinatorEnd, socket_pair
from ._protocol import (
    DECODING,
    EXECUTING,
    FAILED_ATTEMPT,
    SENDING,
    SLOT_BATCH,
    SLOT_CLOSING,
    SLOT_INDEX,
    SLOT_PHASE,
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
# Worker deaths in a row in which no job got anywhere (none finished, none was
# charged) before the run gives up: workers that die while idle, or whose messages
# cannot be sent, would otherwise be replaced forever. Replacements after the
# first such deaths wait `RESPAWN_DELAY` * 2**n, at most `MAX_RESPAWN_DELAY`.
MAX_BARREN_DEATHS = 8
RESPAWN_DELAY = 0.01
MAX_RESPAWN_DELAY = 1.0
# Seconds to wait for a worker to exit on its own before it is killed.
EXIT_WAIT = 2.0
# A kill that blames nobody (the worker could not be sent its work).
_NO_BLAME = (-1.0, -1.0, -1.0)


class _Worker:
    __slots__ = (
        "batches",
        "completed",
        "exit_timer",
        "kill_mark",
        "kill_reason",
        "link",
        "pid",
        "process",
        "ready",
        "reported",
        "slot",
    )

    def __init__(self, process: multiprocessing.process.BaseProcess, slot: Any) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.slot = slot
        self.link: CoordinatorEnd
        self.batches: deque[list[Job[Any]]] = deque()  # sent, results not all back yet
        self.reported = 0  # jobs of the first batch whose results are back
        self.completed = 0  # batches whose results are all back (the next one's number)
        self.ready = False
        self.kill_reason: str | None = None
        # (batch, index, start time) of the exec a timeout killed, or _NO_BLAME.
        self.kill_mark: tuple[float, float, float] | None = None
        self.exit_timer: asyncio.TimerHandle | None = None

    def takes_work(self) -> bool:
        """Ready, and not being killed (a timeout's kill may not have landed yet)."""
        return self.ready and self.kill_mark is None

    def kill(self) -> None:
        """SIGKILL the worker and its process group (what its exec started)."""
        if self.pid:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()  # not yet a group leader (or not on this OS)


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
        # Forked and spawned workers are children of this process: they can tell when
        # it is gone. Under forkserver their parent is the server.
        parent = os.getpid() if ctx.get_start_method() in ("fork", "spawn") else 0
        self.forkserver = ctx.get_start_method() == "forkserver"
        self.spec = msgspec.structs.replace(spec, parent_pid=parent)
        self.concurrency = concurrency
        self.ctx = ctx
        self.sink = sink
        self.timeout = timeout
        self.workers: list[_Worker] = []
        self.closing = False
        self.closed_at = 0.0  # monotonic time of `close`
        self.startup_failures = 0
        self.barren_deaths = 0  # deaths in a row with no job getting anywhere
        self.progress = False  # a result arrived since the last death
        self.respawn: asyncio.TimerHandle | None = None
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
        with contextlib.suppress(OSError):
            # The worker does the same: whichever comes first, a kill of its group
            # from here on reaches what its exec starts.
            os.setpgid(process.pid, process.pid)
        worker = _Worker(process, slot)
        worker.link = CoordinatorEnd(
            parent,
            self.loop,
            lambda data: self._guard(self._message, worker, data),
            lambda: self._guard(self._link_closed, worker),
            lambda exc: self._guard(self._send_failed, worker, exc),
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
        # The same workers as `submit` takes: counting one it would refuse made the
        # pump ask again and again, never returning to the loop.
        return sum(max(0, depth - len(w.batches)) for w in self.workers if w.takes_work())

    def executing(self) -> int:
        if self.closing:
            return 0  # what workers still hold was abandoned: it will never finish
        return sum(1 for w in self.workers if w.batches)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def submit(self, jobs: list[Job[Any]]) -> None:
        ready = [w for w in self.workers if w.takes_work()]
        if not ready:  # a worker died since `free` said there was room
            self.sink.unrun(jobs)
            return
        # The ready worker with the least work: an idle one if there is one.
        worker = min(ready, key=lambda w: len(w.batches))
        data = self._encode([job.context for job in jobs])
        limit = min(self.batch_bytes, _comms.MAX_PAYLOAD)
        while len(jobs) > 1 and len(data) > limit:
            # Too many bytes for one message: send what fits, give back the rest.
            keep = max(1, min(len(jobs) - 1, int(len(jobs) * limit / len(data))))
            self.sink.unrun(jobs[keep:])
            jobs = jobs[:keep]
            data = self._encode([job.context for job in jobs])
        per_job = len(data) / len(jobs)
        self.job_bytes = per_job if not self.job_bytes else 0.8 * self.job_bytes + 0.2 * per_job
        if len(data) > _comms.MAX_PAYLOAD:
            error = (
                f"job context of {len(data)} bytes cannot be sent to a worker (the limit "
                f"of one message is {_comms.MAX_PAYLOAD} bytes)"
            )
            self.sink.done(jobs, Results.of([Outcome(FAILED_ATTEMPT, error=error)]))
            return
        worker.batches.append(jobs)
        worker.link.send(data)

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
        results = self._decode_results(data)
        n = len(results.plain)
        batch, start = worker.batches[0], worker.reported
        end = start + n
        if end >= len(batch):
            worker.batches.popleft()
            worker.reported = 0
            worker.completed += 1
            jobs = batch if start == 0 else batch[start:]
        else:
            worker.reported = end
            jobs = batch[start:end]
        self.progress = True
        batch_mean = sum(results.seconds) / n
        mean = self.mean_seconds
        self.mean_seconds = batch_mean if mean is None else 0.8 * mean + 0.2 * batch_mean
        self.sink.done(jobs, results)

    def _send_failed(self, worker: _Worker, exc: OSError) -> None:
        # The worker may be alive but will never get its batch: replace it, blaming
        # nobody (its jobs go back to the queue).
        log.warning("state %r: cannot send to a worker (%s): replacing it", self.spec.state, exc)
        worker.kill_mark = _NO_BLAME
        worker.kill()

    def _link_closed(self, worker: _Worker) -> None:
        # EOF: the worker is exiting. Its sentinel says when it is gone (and with what
        # exit code); waiting for that here would block the loop.
        if worker.exit_timer is None and worker in self.workers:
            worker.exit_timer = self.loop.call_later(EXIT_WAIT, worker.kill)

    def _exited(self, worker: _Worker) -> None:
        # Results the worker sent before it died may still sit in the socket: take
        # them first, so that only the job it died in is charged.
        worker.link.drain()
        self._lost(worker)

    def _detach(self, worker: _Worker) -> None:
        """Stop watching a worker and close its socket (EOF: an idle worker exits)."""
        if worker.exit_timer is not None:
            worker.exit_timer.cancel()
            worker.exit_timer = None
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(worker.process.sentinel)
        _fds.unregister(worker.link.fd)  # before the close: the number may be reused
        worker.link.close()

    def _release(self, worker: _Worker) -> None:
        """Detach a gone worker and reap it: its fds close now, not whenever the
        garbage collector gets to them."""
        self._detach(worker)
        worker.process.join(0.1 if worker.process.exitcode is None else None)
        if worker.process.exitcode is None:
            worker.kill()
            worker.process.join()

    def _lost(self, worker: _Worker) -> None:
        """A worker is gone: charge the job it died in, requeue the rest, replace it."""
        if worker not in self.workers:
            return  # already handled
        self.workers.remove(worker)
        self._release(worker)
        code = worker.process.exitcode
        worker.process.close()
        batches = list(worker.batches)
        worker.batches.clear()
        if self.closing:
            return
        reason = worker.kill_reason or f"worker died (exit code {code})"
        # Stopping: a worker killed by the stop signal itself (a Ctrl-C or SIGTERM sent
        # to the whole process group) did nothing wrong; its jobs are not charged.
        stop_signals: tuple[int, ...] = (-signal.SIGTERM, -signal.SIGINT)
        if self.forkserver and code == 255:
            stop_signals += (255,)  # the server died with it: the worker's code is lost
        if self.sink.halting() and batches and code in stop_signals:
            self.sink.unrun([job for batch in batches for job in batch])
            return
        log.debug("state %r: %s (pid %s)", self.spec.state, reason, worker.pid)
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
        charged = self._settle_death(worker, batches, reason, code) if batches else False
        if charged or self.progress:
            self.barren_deaths = 0
        else:
            self.barren_deaths += 1
        self.progress = False
        if self.barren_deaths >= MAX_BARREN_DEATHS:
            self.sink.fatal(
                RuntimeError(
                    f"state {self.spec.state!r}: {self.barren_deaths} worker processes in a "
                    f"row died without finishing or failing a job (the last: {reason})"
                )
            )
            return
        if not self.sink.halting():
            self._replace()  # no replacement while stopping: nothing new is dispatched

    def _replace(self) -> None:
        """Start a replacement worker: now, or after a delay that grows with the deaths
        in a row that got no job anywhere."""
        n = self.barren_deaths
        if n < 2:
            self._spawn()
            return
        delay = min(MAX_RESPAWN_DELAY, RESPAWN_DELAY * 2**n)
        self.loop.call_later(delay, self._guard, self._spawn_later)

    def _spawn_later(self) -> None:
        if not self.closing and not self.sink.halting():
            self._spawn()

    def _settle_death(
        self, worker: _Worker, batches: list[list[Job[Any]]], reason: str, code: int | None
    ) -> bool:
        """Charge and requeue the jobs a dead worker held; True if a job was charged."""
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
            self.sink.unrun(front[:at] + front[at + 1 :] + later)
            self._charge(front[at], reason)
            return True
        if mark is None and phase in (DECODING, SENDING):
            # Died outside an exec: some job of those it was decoding (the whole batch)
            # or sending (the chunk up to ``at``) killed it, but which one?
            suspects = front if phase == DECODING else front[: at + 1]
            rest = front[len(suspects) :] + later
            if len(suspects) == 1:
                self.sink.unrun(rest)
                what = "decoding its job context" if phase == DECODING else "sending its results"
                self._charge(suspects[0], f"worker died while {what} (exit code {code})")
                return True
            self.sink.unrun(suspects + rest, isolate=suspects)
            return False
        # Nothing was running (or a kill that blames nobody): nothing to charge.
        self.sink.unrun(front + later)
        return False

    def _charge(self, job: Job[Any], reason: str) -> None:
        self.sink.done([job], Results.of([Outcome(FAILED_ATTEMPT, error=reason)]))

    def check_timeouts(self, now: float) -> None:
        if self.timeout is None:
            return
        for worker in self.workers:
            slot = worker.slot
            started = slot[SLOT_STARTED]
            if (
                worker.batches
                and started
                and now - started > self.timeout
                and worker.kill_mark is None
                and slot[SLOT_PHASE] == EXECUTING
            ):
                # Marked with what was running: if that exec ends before the kill lands,
                # the job that started next is not charged with its timeout.
                worker.kill_mark = (slot[SLOT_BATCH], slot[SLOT_INDEX], started)
                worker.kill_reason = f"timed out after {self.timeout:g}s (worker killed)"
                worker.kill()

    def close(self, abandon: bool) -> None:
        self.closing = True
        self.closed_at = time.monotonic()
        for worker in self.workers:
            if abandon:
                worker.kill()
            else:
                worker.slot[SLOT_CLOSING] = 1.0  # the EOF that follows is no death
            self._detach(worker)

    def wait_closed(self) -> None:
        """Reap the workers `close` sent away; kill any still there after `EXIT_WAIT`."""
        deadline = self.closed_at + EXIT_WAIT
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.exitcode is None:
                worker.kill()
                worker.process.join()
            worker.process.close()
        self.workers.clear()
