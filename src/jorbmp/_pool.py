"""The worker-process pool of one process state (`ProcessPool`).

One pool per state, up to ``concurrency`` workers, each with its own socket (framing
in `jorbmp._comms`, conversation in `jorbmp._protocol`). Workers start as the
state's queue needs them (`ProcessPool.demand`), a few milliseconds of forking at a
time, so that 10 jobs never fork 256 workers and the first workers get work while
the others start. Which workers can take a batch, and how many execs are running,
is kept up to date as workers change (`_Slots`): a dispatch costs the same with 256
workers as with 2.

The pool never blocks the coordinator on a busy worker and never hangs on a dead
one: the socket and the process sentinel are both watched by the event loop, so a
worker that exits, is killed or segfaults is noticed at once, the job it was
running is charged with the failure (and with the time it held its slot), the rest
of its work goes back to the front of the queue, and a replacement starts. A worker
that dies outside an exec (decoding a batch, encoding results) cannot say which job
killed it: those jobs are retried one at a time, so that the culprit is charged and
the others go on. Replacements that die without any job getting anywhere are spaced
out and, past `MAX_BARREN_DEATHS`, end the run.

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
    BATCH_HEADER,
    CHUNK_SECONDS,
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
# Batches a worker holds at most: the one it runs, and one queued behind it.
MAX_DEPTH = 2  # (`_Slots.free` counts for this depth without a loop)
# Mean exec time under which workers get a second batch queued behind the running
# one. Above it the round trip is negligible and queueing would only make a job
# wait behind another instead of going to the next free worker. Not lower: when the
# workers keep every core busy, the coordinator itself may wait a scheduler slice or
# two before it can answer, and at 5 ms (the previous value) 10 ms jobs lost 5-8% of
# their throughput to that wait.
PIPELINE_SECONDS = 0.05
# While workers hold a second batch (mean exec under PIPELINE_SECONDS), the pool's
# sockets are polled every POLL_SHARE of a mean exec, at most POLL_SECONDS, instead
# of waking the coordinator for each result (see `jorbmp._comms.Poller`): a worker's
# queued batch takes at least one mean exec, so it never runs dry for the wait, and
# each poll takes several results at once. Not longer: results, and the transitions
# and kicks they bring, wait up to that much more. Waits under MIN_POLL_SECONDS are
# not worth it (the event loop's timers are about that coarse), nor polls expected to
# find fewer than POLL_MIN_RESULTS results (few workers, or long execs): a poll that
# finds none costs a wake-up of its own (2 workers of 10 ms jobs on 2 busy cores lost
# ~3% of their throughput to such wake-ups).
POLL_SHARE = 1 / 8
POLL_SECONDS = 0.002
MIN_POLL_SECONDS = 0.001
POLL_MIN_RESULTS = 2.0
# Longest the coordinator forks workers in one go (at least one each time) before it
# lets the event loop run: forking 256 workers takes a second or more, and the workers
# already started get their work and send their results back meanwhile. Longer slices
# fork a little faster; shorter ones answer ready workers sooner.
SPAWN_SLICE_SECONDS = 0.005
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
        "since",
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
        # Monotonic time since which this worker's slot has been busy with work whose
        # time no result has accounted for yet: set when it gets work while idle and
        # at each result message. A job charged with its death is charged that time
        # (the slot-seconds the exec held, as async states count a timeout's).
        self.since = 0.0

    def takes_work(self) -> bool:
        """Ready, not being killed (a timeout's kill may not have landed yet) and not
        gone."""
        return self.ready and self.kill_mark is None and not self.link.closed

    def kill(self) -> None:
        """SIGKILL the worker and its process group (what its exec started)."""
        if self.pid:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()  # not yet a group leader (or not on this OS)


class _Slots:
    """Which of a pool's workers can take a batch now, and how many are executing,
    kept up to date as workers change, so that a dispatch or a result costs the same
    however many workers the pool has (a walk over 256 workers per job was a fifth
    of the coordinator's time).

    Invariants, between any two events: a worker is in ``by_load[n]`` exactly when it
    takes work (`_Worker.takes_work`) and holds ``n < MAX_DEPTH`` batches; ``busy`` is
    the number of the pool's live workers that hold any batch (each runs one exec at a
    time, so it is the number of execs running). The pool calls `offer` when a worker
    starts taking work, `withdraw` when it stops, `take` and then `put_back` to send
    one a batch, `returned` when a batch's results are all back, and `gone` when it
    loses a worker.
    """

    __slots__ = ("busy", "by_load")

    def __init__(self) -> None:
        # Per load, the workers at it: dicts used as ordered sets (O(1) add, discard
        # and pop). The most recently listed worker is taken first: which one does
        # not matter, and popping the last entry is the cheap end.
        self.by_load: tuple[dict[_Worker, None], ...] = tuple({} for _ in range(MAX_DEPTH))
        self.busy = 0

    def __repr__(self) -> str:
        loads = " ".join(f"load{n}={len(b)}" for n, b in enumerate(self.by_load))
        return f"<_Slots {loads} busy={self.busy}>"

    def free(self, depth: int) -> int:
        """Batches the listed workers can take, each holding at most ``depth``."""
        idle, loaded = self.by_load  # (MAX_DEPTH == 2; per dispatch: no loop here)
        return 2 * len(idle) + len(loaded) if depth == 2 else len(idle)

    def take(self, depth: int) -> _Worker | None:
        """The least loaded worker that can take a batch (an idle one if there is
        one), unlisted: the caller sends it a batch and then calls `put_back`."""
        for bucket in self.by_load[:depth]:
            if bucket:
                return bucket.popitem()[0]
        return None

    def offer(self, worker: _Worker) -> None:
        """``worker`` takes work (it just became ready): list it under its load."""
        n = len(worker.batches)
        if n < MAX_DEPTH and worker.takes_work():
            self.by_load[n][worker] = None

    def withdraw(self, worker: _Worker) -> None:
        """``worker`` takes no more work (it is being killed, or gone)."""
        n = len(worker.batches)
        if n < MAX_DEPTH:
            self.by_load[n].pop(worker, None)

    def put_back(self, worker: _Worker, before: int) -> None:
        """``worker``, taken when it held ``before`` batches, was sent one more (or, if
        its jobs could not be sent, none): list it again under its load."""
        if before == 0 and worker.batches:
            self.busy += 1
        self.offer(worker)

    def returned(self, worker: _Worker, before: int) -> None:
        """``worker`` held ``before`` batches and now holds one fewer."""
        if before < MAX_DEPTH:
            self.by_load[before].pop(worker, None)
        if before == 1:
            self.busy -= 1
        self.offer(worker)

    def gone(self, worker: _Worker) -> None:
        """``worker`` is no longer the pool's (call before its batches are cleared)."""
        self.withdraw(worker)
        if worker.batches:
            self.busy -= 1


class ProcessPool(Backend):
    """``kind="process"``: up to ``concurrency`` worker processes, each fed batches over
    a socket, started as the state's queue needs them."""

    max_batch = MAX_BATCH
    scale_with_load = True
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
        # The live workers, in the order they started (a dict as an ordered set: a
        # death removes one in O(1)).
        self.workers: dict[_Worker, None] = {}
        self.slots = _Slots()
        self.poller: _comms.Poller | None = None
        self.closing = False
        self.closed_at = 0.0  # monotonic time of `close`
        self.startup_failures = 0
        self.barren_deaths = 0  # deaths in a row with no job getting anywhere
        self.progress = False  # a result arrived since the last death
        # Replacements waiting out their delay (`_replace`): counted as workers, so that
        # the queue's demand neither starts one in their place nor exceeds concurrency.
        self.respawns = 0
        self.spawned = 0
        # Workers are started as the queue needs them (see `demand`): how many are
        # wanted and not started yet, how many started and not ready yet, and the
        # callback that starts the next slice of them.
        self.to_spawn = 0
        self.unready = 0
        self.spawner: asyncio.Handle | None = None
        self.mean_seconds: float | None = None  # recent mean exec time
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_results = msgspec.msgpack.Decoder(Results).decode
        self._decode_startup = msgspec.msgpack.Decoder(Startup).decode

    def __repr__(self) -> str:
        ready = sum(w.ready for w in self.workers)
        return (
            f"<ProcessPool {self.spec.state!r} workers={len(self.workers)} ready={ready} "
            f"executing={self.executing()} depth={self._depth()} {self.slots!r}>"
        )

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if _comms.Poller.available():
            self.poller = _comms.Poller(self.loop, self._poll_delay, self._guard)
        # One worker now, whatever the queue: a state whose workers cannot start (an
        # ac_factory that fails, an import error under spawn) is found at the start of
        # the run, not when its first job arrives. The first pump says how many more
        # its queue needs (`demand`).
        self._spawn()

    def demand(self, waiting: int) -> None:
        # One worker per job waiting beyond those the workers starting will take,
        # up to ``concurrency`` workers: 10 jobs never fork 256.
        have = len(self.workers) + self.to_spawn + self.respawns
        if have >= self.concurrency or self.closing:
            return
        want = min(self.concurrency - have, waiting - self.unready - self.to_spawn)
        if want <= 0:
            return
        self.to_spawn += want
        if self.spawner is None:
            self.spawner = self.loop.call_soon(self._guard, self._spawn_some)

    def _spawn_some(self) -> None:
        """Start wanted workers for at most `SPAWN_SLICE_SECONDS`, then let the loop
        run (results, dispatch to the workers that are ready) before the next slice."""
        self.spawner = None
        if self.closing or self.sink.halting():
            self.to_spawn = 0
            return
        deadline = time.monotonic() + SPAWN_SLICE_SECONDS
        while self.to_spawn:
            self.to_spawn -= 1
            self._spawn()
            if time.monotonic() >= deadline:
                break
        if self.to_spawn:
            self.spawner = self.loop.call_soon(self._guard, self._spawn_some)

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
            self.poller,
        )
        self.workers[worker] = None
        self.unready += 1
        self.loop.add_reader(process.sentinel, self._guard, self._exited, worker)

    def _guard(self, fn: Any, *args: Any) -> None:
        # Event-loop callbacks: the loop would only log an exception, so anything
        # unexpected must end the run here instead of leaving it waiting forever.
        try:
            fn(*args)
        except Exception as exc:
            self.sink.fatal(exc)

    def _poll_delay(self) -> float:
        """How long the workers' results may wait to be read (0: wake at once); see
        `POLL_SHARE`."""
        mean = self.mean_seconds
        if mean is None or mean >= PIPELINE_SECONDS or self.closing:
            return 0.0
        # Under load, batches (and so a worker's queued work) hold `scale` times more.
        scale = self.sink.batch_scale()
        delay = min(POLL_SECONDS * scale, mean * POLL_SHARE * scale)
        if delay < MIN_POLL_SECONDS or self.slots.busy * delay < POLL_MIN_RESULTS * mean:
            return 0.0
        return delay

    def _depth(self) -> int:
        mean = self.mean_seconds
        return 2 if mean is not None and mean < PIPELINE_SECONDS else 1

    def free(self) -> int:
        if self.closing:
            return 0
        # The same workers as `submit` takes: counting one it would refuse made the
        # pump ask again and again, never returning to the loop.
        return self.slots.free(self._depth())

    def executing(self) -> int:
        if self.closing:
            return 0  # what workers still hold was abandoned: it will never finish
        return self.slots.busy

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w.process.pid is not None]

    def submit(self, jobs: list[Job[Any]]) -> None:
        # The ready worker with the least work: an idle one if there is one.
        worker = self.slots.take(MAX_DEPTH)
        if worker is None:  # a worker died since `free` said there was room
            self.sink.unrun(jobs)
            return
        before = len(worker.batches)
        try:
            self._send(worker, jobs)
        finally:
            self.slots.put_back(worker, before)  # listed again, under its new load

    def _send(self, worker: _Worker, jobs: list[Job[Any]]) -> None:
        """Send ``jobs`` (or what fits in one message) to ``worker``, taken from the
        slots; the rest goes back to the queue."""
        data = self._encode([job.context for job in jobs])
        limit = min(self.batch_bytes, _comms.MAX_PAYLOAD - BATCH_HEADER.size)
        while len(jobs) > 1 and len(data) > limit:
            # Too many bytes for one message: send what fits, give back the rest.
            keep = max(1, min(len(jobs) - 1, int(len(jobs) * limit / len(data))))
            self.sink.unrun(jobs[keep:])
            jobs = jobs[:keep]
            data = self._encode([job.context for job in jobs])
        per_job = len(data) / len(jobs)
        self.job_bytes = per_job if not self.job_bytes else 0.8 * self.job_bytes + 0.2 * per_job
        if len(data) > _comms.MAX_PAYLOAD - BATCH_HEADER.size:
            error = (
                f"job context of {len(data)} bytes cannot be sent to a worker (the limit "
                f"of one message is {_comms.MAX_PAYLOAD - BATCH_HEADER.size} bytes)"
            )
            self.sink.done(jobs, Results.of([Outcome(FAILED_ATTEMPT, error=error)]))
            return
        if not worker.batches:
            worker.since = time.monotonic()
        worker.batches.append(jobs)
        # Results go back every CHUNK_SECONDS of exec time, so a death loses little
        # finished work; while the coordinator falls behind, a batch's come back whole:
        # a message per job is what it cannot afford then.
        scale = self.sink.batch_scale()
        chunk = CHUNK_SECONDS if scale == 1 else self.batch_seconds * scale
        worker.link.send(data, BATCH_HEADER.pack(chunk))

    def _message(self, worker: _Worker, data: bytes) -> None:
        if not worker.ready:
            startup = self._decode_startup(data)
            if startup.error is not None:
                self.sink.fatal(RuntimeError(f"state {self.spec.state!r}: {startup.error}"))
                return
            worker.ready = True
            self.unready -= 1
            self.slots.offer(worker)
            self.startup_failures = 0
            self.sink.freed()
            return
        results = self._decode_results(data)
        worker.since = time.monotonic()
        n = len(results.plain)
        batch, start = worker.batches[0], worker.reported
        end = start + n
        if end >= len(batch):
            worker.batches.popleft()
            self.slots.returned(worker, len(worker.batches) + 1)
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
        self.slots.withdraw(worker)
        worker.kill_mark = _NO_BLAME
        worker.kill()

    def _link_closed(self, worker: _Worker) -> None:
        # EOF: the worker is exiting. Its sentinel says when it is gone (and with what
        # exit code); waiting for that here would block the loop.
        if worker.exit_timer is None and worker in self.workers:
            self.slots.withdraw(worker)  # it takes no more work (`takes_work`)
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
        worker.link.close()  # (which unregisters its fd from `_fds` first)

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
        del self.workers[worker]
        self.slots.gone(worker)
        if not worker.ready:
            self.unready -= 1
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
        self.respawns += 1
        self.loop.call_later(delay, self._guard, self._spawn_later)

    def _spawn_later(self) -> None:
        self.respawns -= 1
        # (Never beyond concurrency, whatever started meanwhile.)
        full = len(self.workers) + self.to_spawn >= self.concurrency
        if not full and not self.closing and not self.sink.halting():
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
            self._charge(front[at], reason, worker)
            return True
        if mark is None and phase in (DECODING, SENDING):
            # Died outside an exec: some job of those it was decoding (the whole batch)
            # or sending (the chunk up to ``at``) killed it, but which one?
            suspects = front if phase == DECODING else front[: at + 1]
            rest = front[len(suspects) :] + later
            if len(suspects) == 1:
                self.sink.unrun(rest)
                what = "decoding its job context" if phase == DECODING else "sending its results"
                self._charge(suspects[0], f"worker died while {what} (exit code {code})", worker)
                return True
            self.sink.unrun(suspects + rest, isolate=suspects)
            return False
        # Nothing was running (or a kill that blames nobody): nothing to charge.
        self.sink.unrun(front + later)
        return False

    def _charge(self, job: Job[Any], reason: str, worker: _Worker) -> None:
        """Fail ``job``'s attempt with ``reason``, charging it the time ``worker``'s
        slot was busy since its last result (what metrics count as its exec time)."""
        seconds = max(0.0, time.monotonic() - worker.since)
        self.sink.done([job], Results.of([Outcome(FAILED_ATTEMPT, error=reason, seconds=seconds)]))

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
                self.slots.withdraw(worker)
                worker.kill_mark = (slot[SLOT_BATCH], slot[SLOT_INDEX], started)
                worker.kill_reason = f"timed out after {self.timeout:g}s (worker killed)"
                worker.kill()

    def close(self, abandon: bool) -> None:
        self.closing = True
        self.closed_at = time.monotonic()
        if self.spawner is not None:
            self.spawner.cancel()
            self.spawner = None
        self.to_spawn = 0
        for worker in self.workers:
            if abandon:
                worker.kill()
            else:
                worker.slot[SLOT_CLOSING] = 1.0  # the EOF that follows is no death
            self._detach(worker)
        if self.poller is not None:
            self.poller.close()

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
