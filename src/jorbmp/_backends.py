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
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import msgspec

from ._execute import ContextCodec, execute_async, from_exception, run_batch
from ._protocol import Outcome, Results, WorkerSpec
from .run import Job


class Sink(Protocol):
    """Where a backend reports; implemented by the coordinator's per-state lane."""

    def done(self, jobs: list[Job[Any]], results: Results) -> None:
        """These jobs ran (their outcomes in ``results``, same order); their slot is free
        again."""

    def unrun(self, jobs: list[Job[Any]]) -> None:
        """These jobs were handed out but never ran: put them back at the front."""

    def freed(self) -> None:
        """Capacity became available without a job finishing (a worker is ready)."""

    def halting(self) -> bool:
        """The run is stopping (or a stop signal just arrived): start no new workers."""

    def fatal(self, exc: BaseException) -> None:
        """The backend cannot go on (e.g. workers fail to start): end the run with ``exc``."""


class Backend(ABC):
    """Runs the jobs of one state, at most ``concurrency`` at once."""

    #: Largest batch `submit` accepts; the coordinator sizes batches up to this.
    max_batch = 1
    #: Wall time of work the coordinator aims to put in one batch: the longer a
    #: backend's round trip, the more work a batch needs to hide it.
    batch_seconds = 0.02
    #: How the run report names where this backend runs execs, when not by the state's
    #: kind (e.g. "dask": the cores are not this machine's).
    label: str | None = None
    #: True when `pids` are processes started for this run (their CPU time counts from
    #: zero): the coordinator then needs no baseline sample of them at the start.
    started_pids = False

    def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (processes, threads); called inside the running loop."""

    @abstractmethod
    def free(self) -> int:
        """How many batches `submit` can take right now."""

    @abstractmethod
    def executing(self) -> int:
        """How many jobs are executing right now (at most ``concurrency``)."""

    @abstractmethod
    def submit(self, jobs: list[Job[Any]]) -> None:
        """Start executing ``jobs`` (at most `max_batch`) in one free slot."""

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
        self.sink = sink
        self.running = 0
        self.closed = False
        self.codec = ContextCodec(job_type)
        self._decode = msgspec.msgpack.Decoder(job_type).decode

    def copy(self, context: Any) -> Any:
        return self._decode(self.codec.encode(context))

    def free(self) -> int:
        return self.concurrency - self.running

    def executing(self) -> int:
        return self.running

    def run(self, job: Job[Any]) -> Results:
        """Run the exec on a copy of ``job``'s context, here and now."""
        context = self.copy(job.context)
        return run_batch(self.state, self.fn, self.ac, self.oc, [context], self.codec)

    def report(self, job: Job[Any], results: Results) -> None:
        self.running -= 1
        if not self.closed:
            self.sink.done([job], results)


class AsyncBackend(_InProcess):
    """``kind="async"``: each job is a task on the coordinator's loop."""

    def __init__(self, *args: Any, timeout: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self.tasks: set[asyncio.Task[Outcome]] = set()

    def submit(self, jobs: list[Job[Any]]) -> None:
        for job in jobs:
            self.running += 1
            coro = execute_async(
                self.state, self.fn, self.ac, self.oc, self.copy(job.context), self.codec,
                self.timeout,
            )  # fmt: skip
            task = asyncio.get_running_loop().create_task(coro)
            self.tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: Job[Any], task: asyncio.Task[Outcome]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            self.running -= 1
            return
        exc = task.exception()
        # An exotic BaseException escaped the exec: still a failed attempt, never a
        # job left "executing" forever.
        outcome = task.result() if exc is None else from_exception(self.state, exc, 0.0)
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

    def _finished_in_thread(self, job: Job[Any], fut: Future[Results]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            results = fut.result()
        else:
            results = Results.of([from_exception(self.state, exc, 0.0)])
        # RuntimeError: the loop is closed, the run was abandoned while this exec ran.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.report, job, results)

    def close(self, abandon: bool) -> None:
        self.closed = True
        if hasattr(self, "pool"):
            # A thread cannot be killed: when abandoning, running execs finish on their
            # own and their results are dropped.
            self.pool.shutdown(wait=not abandon, cancel_futures=True)


class InlineRunner:
    """The single slot all inline process states share: one job at a time, in the loop thread."""

    def __init__(self) -> None:
        self.busy = False
        self.backends: list[InlineBackend] = []


class InlineBackend(_InProcess):
    """A process state under ``inline=True``: its exec runs in the coordinator's thread."""

    def __init__(self, *args: Any, runner: InlineRunner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = runner
        runner.backends.append(self)

    def free(self) -> int:
        return 0 if self.runner.busy or self.closed else 1

    def submit(self, jobs: list[Job[Any]]) -> None:
        (job,) = jobs
        self.runner.busy = True
        self.running += 1
        # call_soon, not a direct call: the coordinator is in the middle of dispatching.
        asyncio.get_running_loop().call_soon(self._run, job)

    def _run(self, job: Job[Any]) -> None:
        if self.closed:
            self.running -= 1
            self.runner.busy = False
            return
        results = self.run(job)
        self.runner.busy = False
        # Offer the free slot to the other inline states first (round robin), so one
        # state that keeps itself busy cannot starve the rest.
        for other in self.runner.backends:
            if other is not self and not other.closed:
                other.sink.freed()
        self.report(job, results)

    def close(self, abandon: bool) -> None:
        self.closed = True
