"""Backends: what runs the jobs of one state. The coordinator sees only `Backend` and `Sink`.

- `ProcessPool` (in `jorbmp._pool`): ``kind="process"``, worker processes.
- `AsyncBackend`: ``kind="async"``, tasks on the coordinator's event loop.
- `ThreadBackend`: ``kind="thread"``, a thread pool in the coordinator.
- `InlineBackend`: process states under ``inline=True``, run in the coordinator one
  job at a time so that debuggers work.

In-process backends still pass each context through an encode/decode round trip,
so an exec that mutates its context and then raises leaves the job untouched, and
a context that will not survive a checkpoint fails now, not at the next restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import msgspec

from ._execute import ContextCodec, bad_context, execute_async, from_exception, run_batch
from ._protocol import CHUNK_BYTES, FAILED_ATTEMPT, Outcome, Results, WorkerSpec
from .run import Job


class BadContext(Exception):
    """A job's context does not survive the encode/decode round trip (the message says
    why); its job fails without running."""


class Sink(Protocol):
    """Where a backend reports; implemented by the coordinator's per-state lane."""

    def done(self, jobs: list[Job[Any]], results: Results) -> None:
        """These jobs ran (their outcomes in ``results``, same order); their slot is free
        again."""

    def unrun(self, jobs: list[Job[Any]], isolate: list[Job[Any]] | None = None) -> None:
        """These jobs were handed out but never ran (or their results were lost): put
        them back at the front. Those in ``isolate`` are suspects of killing a worker
        outside an exec: each of them is sent alone from now on, until it finishes."""

    def freed(self) -> None:
        """Capacity became available without a job finishing (a worker is ready)."""

    def halting(self) -> bool:
        """The run is stopping (or a stop signal just arrived): start no new workers."""

    def queued(self) -> int:
        """Jobs of this state waiting to be handed out (held by a rate limit included)."""
        return 0

    def rate_slots(self) -> int:
        """Slots the state's rate limit keeps in use: its rate times its mean exec time,
        rounded up (0 without a rate limit). A CPU budget keeps that many workers of it
        however small its share while it waits for a token."""
        return 0

    def recycled(self) -> None:
        """A worker was replaced by recycling (``max_jobs_per_worker``,
        ``max_worker_memory``): counted in the status and the run report."""

    def fatal(self, exc: BaseException) -> None:
        """The backend cannot go on (e.g. workers fail to start): end the run with ``exc``."""

    def batch_scale(self) -> int:
        """How many times `Backend.batch_seconds` of work batches hold now: above 1 while
        the coordinator falls behind (see `jorbmp._load`), for backends that
        `scale_with_load`."""
        return 1


class Backend(ABC):
    """Runs the jobs of one state, at most ``concurrency`` at once."""

    #: Largest batch `submit` accepts; the coordinator sizes batches up to this.
    max_batch = 1
    #: Wall time of work the coordinator aims to put in one batch: the longer a
    #: backend's round trip, the more work a batch needs to hide it.
    batch_seconds = 0.02
    #: Whether batches grow with the coordinator's load (`Sink.batch_scale`): for
    #: backends whose every message costs the coordinator (local worker processes).
    scale_with_load = False
    #: Encoded bytes of contexts the coordinator aims to put in one batch at most, and
    #: the mean encoded size of one context as the backend last saw it (0: unknown).
    batch_bytes: float = CHUNK_BYTES
    job_bytes: float = 0.0
    #: How the run report names where this backend runs execs, when not by the state's
    #: kind (e.g. "dask": the cores are not this machine's).
    label: str | None = None
    #: Execs at once the backend allows now (see `set_limit`): its concurrency, unless
    #: an adaptive state's controller set it lower.
    limit: int
    #: Whether the state's limit may move (`jorbmp.adaptive`): not for a backend that
    #: runs one exec at a time whatever its concurrency (inline).
    adapts = True
    #: True when `pids` are processes started for this run (their CPU time counts from
    #: zero): the coordinator then needs no baseline sample of them at the start.
    started_pids = False

    def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (processes, threads); called inside the running loop."""

    def starting(self) -> int:
        """Slots being brought up (worker processes starting): capacity the state has
        asked for and cannot use yet."""
        return 0

    def set_limit(self, limit: int) -> None:
        """From now on, at most ``limit`` execs at once (1 <= limit <= the backend's
        concurrency): an adaptive state's current limit (`jorbmp.adaptive`). Execs
        running above a lowered limit finish; `free` gives no slot until they have."""
        self.limit = limit

    @abstractmethod
    def free(self) -> int:
        """How many batches `submit` can take right now."""

    @abstractmethod
    def executing(self) -> int:
        """How many jobs are executing right now (at most ``concurrency``)."""

    @abstractmethod
    def submit(self, jobs: list[Job[Any]]) -> None:
        """Start executing ``jobs`` (at most `max_batch`) in one free slot."""

    def held_back(self) -> bool:
        """Whether a CPU budget shared with other states, not this state's own limit,
        keeps it from starting another exec now (its controller must not read that as
        a lack of capacity)."""
        return False

    def demand(self, waiting: int) -> None:  # noqa: B027 - optional hook
        """``waiting`` jobs are still queued once `free` ran out: a backend that starts
        its capacity as the queue needs it (worker processes) starts more for them."""

    def check_timeouts(self, now: float) -> None:  # noqa: B027 - optional hook
        """Abandon execs that exceeded the state's timeout (called by the housekeeping tick)."""

    def pids(self) -> list[int]:
        """Processes whose CPU and memory this state's metrics report."""
        return [os.getpid()]

    @abstractmethod
    def close(self, abandon: bool) -> None:
        """Release resources; with ``abandon``, give up on executing jobs now."""

    def wait_closed(self) -> None:  # noqa: B027 - optional hook
        """Wait until what `close` released is gone (worker processes have exited).

        Separate from `close` so that the coordinator closes every backend first and
        then waits for all of them at once: workers of all states exit in parallel.
        """


class BackendFactory(Protocol):
    """What ``State(backend=...)`` takes: builds the `Backend` of one process state for
    one execution (e.g. `jorbmp.dask.DaskBackend`)."""

    def create(
        self, spec: WorkerSpec, concurrency: int, sink: Sink, timeout: float | None
    ) -> Backend:
        """A backend running ``spec``'s exec, at most ``concurrency`` jobs at once."""
        ...


class _InProcess(Backend):
    """Shared parts of the backends that run execs inside the coordinator process."""

    def __init__(
        self,
        state: str,
        fn: Callable[..., Any],
        ac: Any,
        oc: Any,
        job_type: Any,
        concurrency: int,
        sink: Sink,
    ) -> None:
        self.state, self.fn, self.ac, self.oc = state, fn, ac, oc
        self.concurrency = concurrency
        self.limit = concurrency  # (see `set_limit`)
        self.sink = sink
        self.running = 0
        self.closed = False
        self.codec = ContextCodec(job_type)
        self.loop: asyncio.AbstractEventLoop | None = None  # set by `start`, for threads
        self._decode = msgspec.msgpack.Decoder(job_type).decode
        self._type_name = getattr(job_type, "__name__", "the job type")

    def copy(self, context: Any) -> Any:
        """A copy of ``context`` through the encode/decode a worker's would go through;
        `BadContext` if it does not survive it."""
        try:
            return self._decode(self.codec.encode(context))
        except (TypeError, msgspec.EncodeError, msgspec.ValidationError) as exc:
            raise BadContext(bad_context(self._type_name, exc)) from None

    def free(self) -> int:
        return max(0, self.limit - self.running)

    def executing(self) -> int:
        return self.running

    def run(self, job: Job[Any]) -> Results:
        """Run the exec on a copy of ``job``'s context, here and now."""
        try:
            context = self.copy(job.context)
        except BadContext as exc:
            return Results.of([Outcome(FAILED_ATTEMPT, error=str(exc))])
        return run_batch(self.state, self.fn, self.ac, self.oc, [context], self.codec)

    def report(self, job: Job[Any], results: Results) -> None:
        self.running -= 1
        if not self.closed:
            self.sink.done([job], results)

    def finished(self, job: Job[Any], results: Results) -> None:
        """An exec of ``job`` is over (on the loop's thread): report it."""
        self.report(job, results)

    def _finished_in_thread(self, job: Job[Any], fut: Future[Results]) -> None:
        # Called in the thread that ran the exec: hand the results to the loop.
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            results = fut.result()
        else:
            results = Results.of([from_exception(self.state, exc, 0.0)])
        # RuntimeError: the loop is closed, the run was abandoned while this exec ran.
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.finished, job, results)


class AsyncBackend(_InProcess):
    """``kind="async"``: each job is a task on the coordinator's loop.

    The state's timeout is a timer per task that cancels it, not ``asyncio.wait_for``:
    a ``TimeoutError`` or ``CancelledError`` that the exec raises itself is then an
    ordinary failed attempt, told apart from our own timeout and abandon by the
    task's entry in `timers` and by `closed`.
    """

    def __init__(self, *args: Any, timeout: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        # task -> its start time and timeout timer
        self.tasks: dict[asyncio.Task[Outcome], tuple[float, asyncio.TimerHandle | None]] = {}
        self.timed_out: set[asyncio.Task[Outcome]] = set()

    def submit(self, jobs: list[Job[Any]]) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            self.running += 1
            try:
                context = self.copy(job.context)
            except BadContext as exc:
                failed = Outcome(FAILED_ATTEMPT, error=str(exc))
                loop.call_soon(self.report, job, Results.of([failed]))
                continue
            coro = execute_async(self.state, self.fn, self.ac, self.oc, context, self.codec)
            task = loop.create_task(coro)
            timer = None
            if self.timeout is not None:
                timer = loop.call_later(self.timeout, self._time_out, task)
            self.tasks[task] = (time.perf_counter(), timer)
            task.add_done_callback(functools.partial(self._finished, job))

    def _time_out(self, task: asyncio.Task[Outcome]) -> None:
        if task in self.tasks and not task.done():
            self.timed_out.add(task)
            task.cancel()

    def _finished(self, job: Job[Any], task: asyncio.Task[Outcome]) -> None:
        started, timer = self.tasks.pop(task, (0.0, None))
        if timer is not None:
            timer.cancel()
        seconds = time.perf_counter() - started
        if task in self.timed_out:
            self.timed_out.discard(task)
            # Ours, whatever the exec made of the cancellation (even a return value).
            outcome = Outcome(
                FAILED_ATTEMPT, error=f"timed out after {self.timeout:g}s", seconds=seconds
            )
        elif task.cancelled():
            if self.closed:  # abandoned by our stop: the job stays where it was
                self.running -= 1
                return
            # The exec itself ended in CancelledError (cancelled something of its own,
            # or raised it): a failed attempt like any other exception.
            try:
                task.result()
            except asyncio.CancelledError as exc:
                outcome = from_exception(self.state, exc, seconds)
        else:
            error = task.exception()
            # An exotic BaseException escaped the exec: still a failed attempt, never a
            # job left "executing" forever.
            outcome = task.result() if error is None else from_exception(self.state, error, seconds)
        self.report(job, Results.of([outcome]))

    def close(self, abandon: bool) -> None:
        self.closed = True
        if abandon:
            for task in self.tasks:
                task.cancel()


class ThreadBackend(_InProcess):
    """``kind="thread"``: blocking execs in a pool of ``concurrency`` threads."""

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"jorbmp-{self.state}")

    def submit(self, jobs: list[Job[Any]]) -> None:
        for job in jobs:
            self.running += 1
            fut = self.pool.submit(self.run, job)
            fut.add_done_callback(functools.partial(self._finished_in_thread, job))

    def close(self, abandon: bool) -> None:
        self.closed = True
        if hasattr(self, "pool"):
            # A thread cannot be killed: when abandoning, running execs finish on their
            # own and their results are dropped.
            self.pool.shutdown(wait=not abandon, cancel_futures=True)


class InlineRunner:
    """The single slot all inline process states of one run share: one job at a time,
    in FIFO order, on one thread of the coordinator process (the run's own).

    Not on the event loop's thread: a blocking exec there would hold up the loop,
    and with it every async and thread state, status and checkpoints (an async exec
    beside a 240 ms inline exec took 720 ms). Debuggers work in that thread as in any.
    The thread is a daemon: leaving the program does not wait for an exec abandoned
    by a stop. Such an exec cannot be interrupted, so a later run's inline execs wait
    for it (`_abandoned`) instead of running beside it; a run started *by* an inline
    exec (a nested workflow) has a thread of its own and does not wait for its parent.
    """

    def __init__(self) -> None:
        self.busy = False
        self.backends: list[InlineBackend] = []
        self.thread: _InlineThread | None = None
        self.current: Future[Any] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watching = False  # waiting for an abandoned exec, with a callback set
        self.ac: Any = None
        self.ac_built = False

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        if self.thread is None:
            self.thread = _InlineThread()
        self.current = fut = self.thread.submit(fn)
        return fut

    def app_context(self, factory: Callable[[], Any]) -> Any:
        """The AC built by ``factory`` on this run's inline thread (a client may only
        work in the thread that made it), once."""
        if not self.ac_built:
            self.ac = self.submit(factory).result()
            self.ac_built = True
        return self.ac

    def blocked(self) -> bool:
        """True while an inline exec abandoned by an earlier run still runs; its end
        offers the slot again."""
        pending = [fut for fut in _abandoned if not fut.done()]
        if not pending:
            return False
        if not self.watching:
            self.watching = True
            for fut in pending:
                fut.add_done_callback(self._unblocked)
        return True

    def _unblocked(self, fut: Future[Any]) -> None:
        # In the thread that ran the abandoned exec.
        self.watching = False
        if self.loop is not None:
            for backend in self.backends:
                with contextlib.suppress(RuntimeError):  # this run is over too
                    self.loop.call_soon_threadsafe(backend.sink.freed)

    def close(self) -> None:
        """The run is over (every inline backend closed): let the thread go."""
        if self.thread is None or not all(b.closed for b in self.backends):
            return
        current = self.current
        if current is not None and not current.done():
            _abandoned.add(current)
            current.add_done_callback(_abandoned.discard)
        self.thread.stop()
        self.thread = None


# Inline execs abandoned by a stop that are still running (see `InlineRunner`).
_abandoned: set[Future[Any]] = set()


class _InlineThread:
    """One daemon thread that runs what it is given, in order, until `stop`."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._serve, name="jorbmp-inline", daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        self.queue.put((fn, fut))
        return fut

    def stop(self) -> None:
        self.queue.put(None)  # after what it is running, if anything

    def _serve(self) -> None:
        while (item := self.queue.get()) is not None:
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # reported to the loop, as a thread pool does
                fut.set_exception(exc)


class InlineBackend(_InProcess):
    """A process state under ``inline=True``: its exec runs in the coordinator process,
    on the inline runner's thread."""

    adapts = False  # one exec at a time, in FIFO order

    def __init__(self, *args: Any, runner: InlineRunner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner
        runner.backends.append(self)

    def start(self) -> None:
        self.loop = self.runner.loop = asyncio.get_running_loop()

    def free(self) -> int:
        runner = self.runner
        return 0 if runner.busy or self.closed or runner.blocked() else 1

    def submit(self, jobs: list[Job[Any]]) -> None:
        (job,) = jobs
        self.runner.busy = True
        self.running += 1
        fut = self.runner.submit(functools.partial(self.run, job))
        fut.add_done_callback(functools.partial(self._finished_in_thread, job))

    def finished(self, job: Job[Any], results: Results) -> None:
        self.runner.busy = False
        # Offer the free slot to the other inline states first (round robin), so one
        # state that keeps itself busy cannot starve the rest.
        for other in self.runner.backends:
            if other is not self and not other.closed:
                other.sink.freed()
        self.report(job, results)

    def close(self, abandon: bool) -> None:
        self.closed = True
        self.runner.close()
