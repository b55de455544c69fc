"""`DaskBackend`: run a process state's execs on a Dask distributed cluster.

The coordinator keeps owning the run: its checkpoint, retries, kicks, rate limits and
status stay here, and only execs move to the cluster::

    State("render", render, concurrency=64, backend=DaskBackend("tcp://scheduler:8786"))

- Once per execution a worker plugin carries the state's exec, AC (or ``ac_factory``,
  which then runs on each Dask worker) and OC to every worker, including workers that
  join later; per task only a batch of encoded job contexts goes out and encoded
  outcomes come back (`jorbmp._dask_worker`).
- ``concurrency`` caps the state's tasks on the cluster; a task runs its batch one
  job at a time, so at most ``concurrency`` execs run at once, as with the local pool.
  Batches hold about ``batch_seconds`` of work, to amortise the scheduler's cost per task.
- A Dask worker that dies (the scheduler's ``remove-worker`` event) costs the tasks
  of this state it held. When that was one task of one job, the job gets the error
  ``"worker died (...)"`` and counts as a failed attempt. Otherwise the scheduler
  cannot say which job was running (a worker also holds tasks queued behind the
  running one), so the jobs go back to the front of the queue uncharged and run one
  at a time, one job per task, until each has run: a job that kills workers is then
  the one charged, and no other. (Dask may restart a task elsewhere before our cancel
  arrives, and cannot stop a running one: for 10 s after giving up on a task, a job
  dying alone is charged only on its second death in a row.) A task Dask gave up on
  (``KilledWorker``) counts as a death with that task alone.
- Losing the scheduler ends the run with an error naming it; the checkpoint holds
  every transition that came back (executing jobs re-run on the next exec).
- ``timeout``: counted from submission; the task is abandoned (cancelled) and the job
  charged, but Dask cannot interrupt the thread still running the exec.

``distributed`` is an optional dependency (``pip install 'jorbmp[dask]'``); this module
imports it only when a state with a `DaskBackend` starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from ._backends import Backend, Sink
from ._execute import describe
from ._protocol import FAILED_ATTEMPT, Outcome, Results, WorkerSpec
from .run import Job

__all__ = ["DaskBackend"]

log = logging.getLogger("jorbmp")

# Largest batch of jobs in one Dask task. A task costs the scheduler about a
# millisecond, so tiny jobs need big batches; batch_seconds normally decides first.
MAX_BATCH = 1000
# Seconds of work per task: long against the scheduler's round trip (a few ms) and
# short enough that results stream on and a lost worker costs little.
BATCH_SECONDS = 0.2
# Seconds after abandoning a task during which a worker death may be its doing.
ABANDONED_SUSPECT_SECONDS = 10.0
# While tasks are in flight, the scheduler is asked every PING_SECONDS whether it is
# there; no answer within PING_TIMEOUT ends the run.
PING_SECONDS = 2.0
PING_TIMEOUT = 20.0
# Seconds `close` waits for the cluster to drop the state's worker plugin.
CLOSE_TIMEOUT = 10.0


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise RuntimeError(
            "DaskBackend needs the 'distributed' package: pip install 'jorbmp[dask]'"
        ) from None
    return distributed


class DaskBackend:
    """Runs a process state's execs on a Dask cluster while the coordinator keeps the run.

    ``cluster`` is a scheduler address (``"tcp://host:8786"``), a synchronous
    ``distributed.Client`` (left open at the end) or a cluster object such as
    ``LocalCluster`` (its ``scheduler_address`` is used). The exec's module, the job
    and context types, and jorbmp itself must be importable on the workers.
    """

    def __init__(
        self,
        cluster: Any,
        *,
        batch_seconds: float = BATCH_SECONDS,
        max_batch: int = MAX_BATCH,
        connect_timeout: float = 30.0,
    ) -> None:
        usable = isinstance(cluster, str) or hasattr(cluster, "scheduler_address")
        if not (usable or hasattr(cluster, "submit")):
            raise TypeError(
                "DaskBackend needs a scheduler address, a distributed.Client or a "
                f"cluster object, got {type(cluster).__name__}"
            )
        if batch_seconds <= 0 or max_batch < 1:
            raise ValueError("DaskBackend: batch_seconds must be > 0 and max_batch >= 1")
        self.cluster = cluster
        self.batch_seconds = batch_seconds
        self.max_batch = max_batch
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        return f"DaskBackend({self.address()!r})"

    def address(self) -> str:
        """The scheduler's address, as far as it is known without connecting."""
        cluster = self.cluster
        if isinstance(cluster, str):
            return cluster
        if hasattr(cluster, "scheduler_address"):
            return str(cluster.scheduler_address)
        return str(getattr(getattr(cluster, "scheduler", None), "address", cluster))

    def create(
        self, spec: WorkerSpec, concurrency: int, sink: Sink, timeout: float | None
    ) -> Backend:
        """The backend of one state for one execution (see `BackendFactory`)."""
        return DaskPool(self, spec, concurrency, sink, timeout)

    def connect(self) -> tuple[Any, bool]:
        """A running synchronous client, and whether this backend made it (and closes it)."""
        distributed = _distributed()
        cluster = self.cluster
        if isinstance(cluster, distributed.Client):
            if cluster.asynchronous:
                raise ValueError(
                    "DaskBackend needs a synchronous distributed.Client (or the scheduler "
                    "address): the coordinator runs its own event loop"
                )
            return cluster, False
        address = self.address()
        try:
            client = distributed.Client(address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(
                f"cannot connect to the Dask scheduler at {address!r}: {describe(exc)}"
            ) from None
        return client, True


class _Task:
    __slots__ = ("future", "jobs", "submitted")

    def __init__(self, jobs: list[Job[Any]], future: Any, submitted: float) -> None:
        self.jobs = jobs
        self.future = future
        self.submitted = submitted


class DaskPool(Backend):
    """The backend of one state on a Dask cluster: tasks in flight, keyed by Dask key."""

    label = "dask"

    def __init__(
        self,
        config: DaskBackend,
        spec: WorkerSpec,
        concurrency: int,
        sink: Sink,
        timeout: float | None,
    ) -> None:
        self.config = config
        self.spec = spec
        self.state = spec.state
        self.concurrency = concurrency
        self.sink = sink
        self.timeout = timeout
        # With a timeout, one job per task: the one charged is then the one that hung.
        self.batch_max = 1 if timeout is not None else config.max_batch
        self.max_batch = self.batch_max
        self.batch_seconds = config.batch_seconds
        self.name = f"jorbmp-{spec.state}-{uuid.uuid4().hex[:8]}"  # plugin and key prefix
        self.counter = itertools.count()
        self.tasks: dict[str, _Task] = {}
        # Jobs lost with a worker without knowing which one ran: run alone, one at a
        # time, until each has run.
        self.suspects: set[str] = set()
        # Tasks given up on after a worker death or a timeout: keys and the latest
        # time. Dask may have restarted one elsewhere before the cancel arrived, and a
        # cancel cannot stop a running exec: for a while, another death may be theirs.
        self.abandoned: set[str] = set()
        self.abandoned_at = -ABANDONED_SUSPECT_SECONDS
        self.strikes: dict[str, int] = {}  # suspect job id -> uncertain deaths alone
        self.client: Any = None
        self.own_client = False
        self.closing = False
        self.pinged: concurrent.futures.Future[None] | None = None  # a ping in flight
        self.pinged_at = 0.0
        self.lost = False  # the scheduler is gone: nothing to tidy up there
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_results = msgspec.msgpack.Decoder(Results).decode

    def __repr__(self) -> str:
        return f"<DaskPool {self.state!r} {self.config.address()!r} tasks={len(self.tasks)}>"

    def start(self) -> None:
        from ._dask_worker import StatePlugin

        self.loop = asyncio.get_running_loop()
        self.client, self.own_client = self.config.connect()
        self.client_loop = self.client.loop.asyncio_loop
        try:
            self.client.register_plugin(StatePlugin(self.name, self.spec), name=self.name)
        except Exception as exc:
            raise RuntimeError(
                f"state {self.state!r}: cannot set up the Dask workers at "
                f"{self.config.address()!r}: {describe(exc)} (the workers must import "
                "jorbmp and the modules defining the exec and the context types; types "
                "defined in a script's __main__ cannot travel)"
            ) from exc
        _watch(self.client).add(self)

    # -- Backend ----------------------------------------------------------------------

    def free(self) -> int:
        if self.closing or self.client is None:
            return 0
        if self.suspects:  # isolating: a death must point at one job
            return 0 if self.tasks else 1
        return self.concurrency - len(self.tasks)

    def executing(self) -> int:
        return len(self.tasks)

    def pids(self) -> list[int]:
        return []  # the work runs on other machines: no local CPU or memory to report

    def submit(self, jobs: list[Job[Any]]) -> None:
        from ._dask_worker import run_batch

        status = self.client.status
        if status != "running":
            self._fatal(f"the Dask client is {status}")  # first: nothing is dispatched again
            self.sink.unrun(jobs)
            return
        key = f"{self.name}-{next(self.counter)}"
        payload = self._encode([job.context for job in jobs])
        future = self.client.submit(run_batch, self.name, payload, key=key, pure=False)
        self.tasks[key] = _Task(jobs, future, self.loop.time())
        asyncio.run_coroutine_threadsafe(self._collect(key, future), self.client_loop)

    def check_timeouts(self, now: float) -> None:
        if self.client is None or self.closing:
            return
        status = self.client.status
        if status != "running":
            # The connection to the scheduler broke: whatever it ran for us is lost.
            self._scheduler_lost(f"client {status}")
            return
        idle = self.pinged is None or self.pinged.done()
        if self.tasks and idle and now - self.pinged_at >= PING_SECONDS:
            # A scheduler can also go away without the client noticing (seen with one
            # closed gracefully in this process): ask it, rather than wait forever.
            self.pinged_at = now
            self.pinged = asyncio.run_coroutine_threadsafe(self._ping(), self.client_loop)
        if self.timeout is None:
            return
        for key, task in list(self.tasks.items()):
            if now - task.submitted > self.timeout and self.tasks.pop(key, None) is not None:
                self._abandon(key, task)
                reason = f"timed out after {self.timeout:g}s (Dask task abandoned)"
                self._charge(task.jobs, reason)

    def close(self, abandon: bool) -> None:
        self.closing = True
        client = self.client
        if client is None:
            return
        for task in self.tasks.values():
            self._cancel(task.future)
        self.tasks.clear()
        _watch(client).discard(self)
        if client.status == "running" and not self.lost:
            try:
                # In the client's loop with a timeout: the public, blocking call would
                # wait forever for a scheduler that went away unnoticed.
                unregister = client._unregister_worker_plugin(name=self.name, nanny=None)
                run = asyncio.run_coroutine_threadsafe(unregister, self.client_loop)
                run.result(CLOSE_TIMEOUT)
            except Exception as exc:  # the workers keep an idle plugin: nothing lost
                log.debug("state %r: unregistering Dask plugin: %s", self.state, describe(exc))
        if self.own_client:
            with contextlib.suppress(Exception):
                client.close(timeout=CLOSE_TIMEOUT)

    # -- results and failures (in the coordinator's loop) -------------------------------

    async def _ping(self) -> None:
        """In the client's loop: check that the scheduler answers."""
        try:
            await asyncio.wait_for(self.client.scheduler.identity(), PING_TIMEOUT)
        except Exception as exc:
            with contextlib.suppress(RuntimeError):
                what = f"it did not answer: {describe(exc)}"
                self.loop.call_soon_threadsafe(self._scheduler_lost, what)

    async def _collect(self, key: str, future: Any) -> None:
        """In the client's loop: wait for one task, then hand the result to `_finished`."""
        data: bytes | None = None
        error: BaseException | None = None
        try:
            data = await self.client.gather(future, asynchronous=True)
        except BaseException as exc:  # cancelled, lost, or failed outside the exec
            error = exc
        with contextlib.suppress(RuntimeError):  # the coordinator's loop has closed
            self.loop.call_soon_threadsafe(self._finished, key, data, error)

    def _finished(self, key: str, data: bytes | None, error: BaseException | None) -> None:
        task = self.tasks.pop(key, None)
        if task is None or self.closing:
            return  # abandoned already (timeout, lost worker, stop)
        try:
            if error is None:
                assert data is not None
                results = self._decode_results(data)
                self._settled(task.jobs)
                self.sink.done(task.jobs, results)
            elif type(error).__name__ == "KilledWorker":
                reason = f"worker died (Dask gave up: {describe(error)})"
                self._lost([task], reason, certain=len(task.jobs) == 1)
            elif isinstance(error, (asyncio.CancelledError, _cancelled_error())) or (
                # The gather's own call to the scheduler failed before the client
                # cancelled its futures. (Data a worker fails to send is asked of the
                # scheduler instead, so only the scheduler's connection ends up here.)
                type(error).__name__ == "CommClosedError"
            ):
                self._scheduler_lost(describe(error))
            else:
                self._fatal(
                    f"a Dask task failed outside the exec ({describe(error)}); are jorbmp, "
                    "the exec's module and the context types importable on the workers?"
                )
        except Exception as exc:
            self.sink.fatal(exc)

    def _worker_lost(self, worker: str, keys: set[str]) -> None:
        """A Dask worker died with some of our tasks on it."""
        if self.closing:
            return
        lost = {key: task for key in keys if (task := self.tasks.pop(key, None)) is not None}
        if not lost:
            return
        # One task of ours on the dead worker may still not be the killer: a task we
        # abandoned may have been running there. While isolating, a job that dies alone
        # twice in a row is charged all the same, so a job that kills workers always is.
        recent = self.loop.time() - self.abandoned_at < ABANDONED_SUSPECT_SECONDS
        ghost = recent or bool(keys & self.abandoned - lost.keys())
        jobs = [job for task in lost.values() for job in task.jobs]
        certain = len(jobs) == 1 and not ghost
        if len(jobs) == 1 and ghost and self.suspects:
            strikes = self.strikes[jobs[0].id] = self.strikes.get(jobs[0].id, 0) + 1
            certain = strikes >= 2
        for key, task in lost.items():
            self._abandon(key, task)  # Dask would run it again elsewhere
        self._lost(list(lost.values()), f"worker died (Dask worker {worker} lost)", certain)

    def _lost(self, tasks: list[_Task], reason: str, certain: bool) -> None:
        """Tasks died with their worker: charge the job if it is certain it was the one."""
        jobs = [job for task in tasks for job in task.jobs]
        if self.sink.halting():
            self.sink.unrun(jobs)
        elif certain:
            self._charge(jobs, reason)
        else:
            log.debug(
                "state %r: %s; rerunning %d jobs one at a time", self.state, reason, len(jobs)
            )
            self.suspects.update(job.id for job in jobs)
            self.max_batch = 1
            self.sink.unrun(jobs)

    def _charge(self, jobs: list[Job[Any]], reason: str) -> None:
        self._settled(jobs)
        self.sink.done(jobs, Results.of([Outcome(FAILED_ATTEMPT, error=reason) for _ in jobs]))

    def _settled(self, jobs: list[Job[Any]]) -> None:
        """These jobs ran (or were charged): they are no longer suspects."""
        if self.suspects:
            for job in jobs:
                self.suspects.discard(job.id)
                self.strikes.pop(job.id, None)
            if not self.suspects:
                self.max_batch = self.batch_max

    def _scheduler_lost(self, what: str) -> None:
        self.lost = True
        self._fatal(f"lost the Dask scheduler ({what})")

    def _fatal(self, what: str) -> None:
        self.sink.fatal(
            RuntimeError(f"state {self.state!r}: {what} (scheduler {self.config.address()!r})")
        )

    def _abandon(self, key: str, task: _Task) -> None:
        now = self.loop.time()
        if now - self.abandoned_at >= ABANDONED_SUSPECT_SECONDS:
            self.abandoned.clear()  # long gone, one way or another: keep the set small
        self.abandoned.add(key)
        self.abandoned_at = now
        self._cancel(task.future)

    def _cancel(self, future: Any) -> None:
        coro = self.client.cancel([future], asynchronous=True)
        with contextlib.suppress(RuntimeError):  # the client's loop has stopped
            asyncio.run_coroutine_threadsafe(coro, self.client_loop)


def _cancelled_error() -> type[BaseException]:
    from distributed.client import FutureCancelledError

    return FutureCancelledError


class _Watch:
    """One client's subscription to the scheduler's events, shared by every `DaskPool`
    using that client (the client keeps one handler per topic)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pools: set[DaskPool] = set()
        self.lock = threading.Lock()
        self.previous: Callable[[Any], Any] | None = None

    def add(self, pool: DaskPool) -> None:
        with self.lock:
            first = not self.pools
            self.pools.add(pool)
        if first:
            handlers = getattr(self.client, "_event_handlers", {})
            self.previous = handlers.get("all")
            self.client.subscribe_topic("all", self.event)

    def discard(self, pool: DaskPool) -> None:
        with self.lock:
            self.pools.discard(pool)
            last = not self.pools
        if last:
            _watches.pop(id(self.client), None)
            with contextlib.suppress(Exception):
                if self.previous is not None:
                    self.client.subscribe_topic("all", self.previous)
                else:
                    self.client.unsubscribe_topic("all")

    def event(self, event: tuple[float, Any]) -> Any:
        """In the client's loop: pass an unexpected worker death on to the pools."""
        msg = event[1]
        died = (
            isinstance(msg, dict)
            and msg.get("action") == "remove-worker"
            and not msg.get("expected")
            and msg.get("processing-tasks")
        )
        if died:
            with self.lock:
                pools = list(self.pools)
            keys = {str(key) for key in msg["processing-tasks"]}
            for pool in pools:  # each takes the keys it owns
                with contextlib.suppress(RuntimeError):
                    pool.loop.call_soon_threadsafe(pool._worker_lost, str(msg.get("worker")), keys)
        if self.previous is not None:
            return self.previous(event)
        return None


_watches: dict[int, _Watch] = {}


def _watch(client: Any) -> _Watch:
    watch = _watches.get(id(client))
    if watch is None:
        watch = _watches[id(client)] = _Watch(client)
    return watch
