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
- ``timeout``: counted from the exec's start, which the worker reports (an event on a
  topic of the state's own), so a task queued on a busy worker is never charged. The
  job is charged and the task abandoned (cancelled), but Dask cannot interrupt the
  thread still running the exec: the task keeps its slot until the worker reports the
  exec's end or the worker leaves, and a worker still running it ``restart_hung_after``
  seconds later is restarted (through its nanny; without one the slot stays held).
- Connecting and registering the plugin run in a thread of their own: the
  coordinator's loop (Ctrl-C, SIGTERM, `Processor.stop`) stays free, and
  ``connect_timeout`` holds against a peer that never answers. Job, OC and exec types
  that would travel by value (``__main__``) are refused before that, and the first
  batches check that the workers decode contexts to the same values.

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
import msgspec.inspect

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
# Seconds a timed-out exec may go on running on its Dask worker (holding its slot)
# before that worker is restarted (`DaskBackend(restart_hung_after=...)`).
HUNG_RESTART_SECONDS = 5.0
# Seconds past ``connect_timeout`` before the coordinator gives up on a connection
# itself (distributed's own error, which says more, normally comes first).
CONNECT_SLACK = 0.5


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise RuntimeError(
            "DaskBackend needs the 'distributed' package: pip install 'jorbmp[dask]'"
        ) from None
    return distributed


def _fields(value: Any, where: str = "$") -> set[str]:
    """The paths of every map key in plain decoded data (list items share one path)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}"
            paths.add(path)
            paths |= _fields(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= _fields(item, f"{where}[]")
    return paths


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
        restart_hung_after: float | None = HUNG_RESTART_SECONDS,
    ) -> None:
        usable = isinstance(cluster, str) or hasattr(cluster, "scheduler_address")
        if not (usable or hasattr(cluster, "submit")):
            raise TypeError(
                "DaskBackend needs a scheduler address, a distributed.Client or a "
                f"cluster object, got {type(cluster).__name__}"
            )
        if batch_seconds <= 0 or max_batch < 1:
            raise ValueError("DaskBackend: batch_seconds must be > 0 and max_batch >= 1")
        if restart_hung_after is not None and not restart_hung_after >= 0:
            raise ValueError("DaskBackend: restart_hung_after must be >= 0 or None")
        self.cluster = cluster
        self.batch_seconds = batch_seconds
        self.max_batch = max_batch
        self.connect_timeout = connect_timeout
        self.restart_hung_after = restart_hung_after

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

    def check_client(self) -> None:
        """Refuse an asynchronous Client (before anything starts)."""
        distributed = _distributed()
        cluster = self.cluster
        if isinstance(cluster, distributed.Client) and cluster.asynchronous:
            raise ValueError(
                "DaskBackend needs a synchronous distributed.Client (or the scheduler "
                "address): the coordinator runs its own event loop"
            )

    def connect(self) -> tuple[Any, bool]:
        """A running synchronous client, and whether this backend made it (and closes it).

        Blocks (`DaskPool` calls it off the coordinator's loop). A scheduler address is
        first asked for distributed's handshake within ``connect_timeout``: a peer that
        accepts the connection and never answers would hold ``distributed.Client``
        forever, whatever its timeout."""
        distributed = _distributed()
        self.check_client()
        cluster = self.cluster
        if isinstance(cluster, distributed.Client):
            return cluster, False
        address = self.address()
        try:
            asyncio.run(_probe(address, self.connect_timeout))
            client = distributed.Client(address, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            raise RuntimeError(
                f"cannot connect to the Dask scheduler at {address!r}: {describe(exc)}"
            ) from None
        return client, True


class _Task:
    __slots__ = ("check", "ended", "future", "jobs", "started", "submitted", "worker")

    def __init__(self, jobs: list[Job[Any]], future: Any, submitted: float, check: bool) -> None:
        self.jobs = jobs
        self.future = future
        self.submitted = submitted
        self.check = check  # the worker first checks that it decodes the contexts alike
        # With a timeout: when the worker said the exec started (loop time), where,
        # and whether it said the exec ended (its thread is free again).
        self.started: float | None = None
        self.worker = ""
        self.ended = False


class _Hung:
    """A timed-out exec that may still run in its Dask worker's thread: it keeps its
    slot until it ends, or its worker is gone."""

    __slots__ = ("restarting", "since", "worker")

    def __init__(self, worker: str, since: float) -> None:
        self.worker = worker
        self.since = since
        self.restarting = False


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
        # (key -> when; only those of the last ABANDONED_SUSPECT_SECONDS are kept.)
        self.abandoned: dict[str, float] = {}
        self.abandoned_at = -ABANDONED_SUSPECT_SECONDS
        # Timed-out execs whose thread may still be busy, by key (at most concurrency).
        self.hung: dict[str, _Hung] = {}
        self.topic = f"{self.name}-execs"  # the workers' start and end events
        self.strikes: dict[str, int] = {}  # suspect job id -> uncertain deaths alone
        self.client: Any = None
        self.own_client = False
        self.closing = False
        self.ready = False  # connected and the plugin registered (see `start`)
        self.connect_lock = threading.Lock()  # client and closing, with the connecting thread
        self.connect_deadline = 0.0
        self.pinged: concurrent.futures.Future[None] | None = None  # a ping in flight
        self.pinged_at = 0.0
        self.lost = False  # the scheduler is gone: nothing to tidy up there
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_results = msgspec.msgpack.Decoder(Results).decode
        self._decode_checked = msgspec.msgpack.Decoder(tuple[bool, bytes]).decode
        # Until a worker has decoded a batch of contexts to the same values as this
        # process, every task asks its worker to check that first (see `_dask_worker`).
        self.verified = False

    def __repr__(self) -> str:
        return f"<DaskPool {self.state!r} {self.config.address()!r} tasks={len(self.tasks)}>"

    def start(self) -> None:
        """Check what can be checked here, then connect and register the worker plugin
        in a thread of their own: the coordinator's loop stays free meanwhile, so Ctrl-C,
        SIGTERM and `Processor.stop` work at once, and ``connect_timeout`` holds even
        against a peer that never answers. Until then the state takes no jobs."""
        _check_travels(self.spec)
        self.config.check_client()
        self.loop = asyncio.get_running_loop()
        self.connect_deadline = self.loop.time() + self.config.connect_timeout + CONNECT_SLACK
        threading.Thread(
            target=self._connect, name=f"jorbmp-dask-connect-{self.state}", daemon=True
        ).start()

    def _connect(self) -> None:
        """In the connecting thread: connect, register the plugin, tell the loop."""
        from ._dask_worker import StatePlugin

        try:
            client, own = self.config.connect()
        except BaseException as exc:
            self._tell(self._start_failed, exc)
            return
        with self.connect_lock:
            closing = self.closing
            if not closing:
                self.client, self.own_client = client, own
                self.client_loop = client.loop.asyncio_loop
        if closing:  # the run ended (Ctrl-C, stop, the deadline) while we connected
            if own:
                with contextlib.suppress(Exception):
                    client.close(timeout=CLOSE_TIMEOUT)
            return
        try:
            client.register_plugin(StatePlugin(self.name, self.spec), name=self.name)
        except BaseException as exc:
            error = RuntimeError(
                f"state {self.state!r}: cannot set up the Dask workers at "
                f"{self.config.address()!r}: {describe(exc)} (the workers must import "
                "jorbmp and the modules defining the exec and the context types; types "
                "defined in a script's __main__ cannot travel)"
            )
            error.__cause__ = exc
            self._tell(self._start_failed, error)
            return
        self._tell(self._ready)

    def _tell(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the coordinator's loop has closed
            self.loop.call_soon_threadsafe(fn, *args)

    def _ready(self) -> None:
        """In the coordinator's loop: connected and registered; take jobs."""
        if self.closing:
            return
        self.ready = True
        _watch(self.client).add(self)
        if self.timeout is not None:
            # Before any task: events and submissions share one ordered connection.
            self.client.subscribe_topic(self.topic, self._event)
        self.sink.freed()

    def _start_failed(self, exc: BaseException) -> None:
        if not self.closing:
            self.sink.fatal(exc)

    # -- Backend ----------------------------------------------------------------------

    def free(self) -> int:
        if self.closing or not self.ready:
            return 0
        slots = self.concurrency - len(self.hung)
        if self.suspects:  # isolating: a death must point at one job
            return 0 if self.tasks or slots <= 0 else 1
        return max(0, slots - len(self.tasks))

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
        check = not self.verified
        topic = self.topic if self.timeout is not None else ""
        future = self.client.submit(
            run_batch, self.name, payload, check, topic, key, key=key, pure=False
        )
        self.tasks[key] = _Task(jobs, future, self.loop.time(), check)
        asyncio.run_coroutine_threadsafe(self._collect(key, future), self.client_loop)

    def check_timeouts(self, now: float) -> None:
        if self.closing:
            return
        if not self.ready:
            if self.client is None and now > self.connect_deadline:
                self.closing = True  # the connecting thread drops what it gets later
                self.sink.fatal(
                    RuntimeError(
                        f"cannot connect to the Dask scheduler at {self.config.address()!r}: "
                        f"no answer within connect_timeout={self.config.connect_timeout:g}s"
                    )
                )
            return
        status = self.client.status
        if status != "running":
            # The connection to the scheduler broke: whatever it ran for us is lost.
            self._scheduler_lost(f"client {status}")
            return
        idle = self.pinged is None or self.pinged.done()
        if (self.tasks or self.hung) and idle and now - self.pinged_at >= PING_SECONDS:
            # A scheduler can also go away without the client noticing (seen with one
            # closed gracefully in this process): ask it, rather than wait forever.
            self.pinged_at = now
            self.pinged = asyncio.run_coroutine_threadsafe(self._ping(), self.client_loop)
        if self.timeout is None:
            return
        for key, task in list(self.tasks.items()):
            # From the exec's start on the worker, not from submission: a task queued
            # behind another (on a busy worker) has not used any of its time.
            started = task.started
            if started is None or now - started <= self.timeout:
                continue
            del self.tasks[key]
            self._abandon(key, task)
            if not task.ended:
                self.hung[key] = _Hung(task.worker, now)
            reason = f"timed out after {self.timeout:g}s (Dask task abandoned)"
            self._charge(task.jobs, reason)
        restart = self.config.restart_hung_after
        if restart is not None:
            for hung in self.hung.values():
                if not hung.restarting and now - hung.since >= restart and hung.worker:
                    self._restart(hung)

    def close(self, abandon: bool) -> None:
        with self.connect_lock:
            self.closing = True
            client = self.client
        if client is None:
            return  # still connecting: that thread closes what it opens
        for task in self.tasks.values():
            self._cancel(task.future)
        self.tasks.clear()
        if self.ready:
            _watch(client).discard(self)
            if self.timeout is not None:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(self.topic)
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
                if task.check:
                    same, data = self._decode_checked(data)
                    if not same:
                        self._mismatch(task, data)
                        return
                    self.verified = True
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

    def _event(self, event: tuple[float, Any]) -> None:
        """In the client's loop: a worker's start or end of an exec (see `run_batch`)."""
        msg = event[1]
        if isinstance(msg, (list, tuple)) and len(msg) >= 2:
            worker = str(msg[2]) if len(msg) > 2 else ""
            self._tell(self._exec_event, str(msg[0]), str(msg[1]), worker)

    def _exec_event(self, what: str, key: str, worker: str) -> None:
        if what == "start":
            task = self.tasks.get(key)
            if task is not None:  # its timeout counts from now (the latest start)
                task.started = self.loop.time()
                task.worker = worker
                task.ended = False
        elif what == "end":
            task = self.tasks.get(key)
            if task is not None:
                task.ended = True  # its result is on the way
            elif self.hung.pop(key, None) is not None:
                log.debug("state %r: timed-out Dask task %s ended", self.state, key)
                self.sink.freed()

    def _worker_gone(self, worker: str) -> None:
        """A Dask worker left (died, restarted, retired): its hung execs went with it."""
        gone = [key for key, hung in self.hung.items() if hung.worker == worker]
        for key in gone:
            del self.hung[key]
        if gone and not self.closing:
            self.sink.freed()

    def _restart(self, hung: _Hung) -> None:
        """Restart the Dask worker whose thread a timed-out exec still holds (a thread
        cannot be interrupted); its removal frees the slot. Without a nanny it cannot
        be: the slot stays held until the exec returns."""
        hung.restarting = True
        worker = hung.worker
        log.warning(
            "state %r: a timed-out exec still runs on Dask worker %s after %gs: restarting "
            "that worker",
            self.state,
            worker,
            self.config.restart_hung_after,
        )

        async def restart() -> None:
            try:
                result = await self.client._restart_workers(
                    workers=[worker], timeout=PING_TIMEOUT, raise_for_error=False
                )
                status = result.get(worker, "?") if isinstance(result, dict) else result
                if status not in ("OK", "removed"):
                    raise RuntimeError(f"restart: {status}")
            except Exception as exc:
                log.warning(
                    "state %r: cannot restart Dask worker %s (%s): the timed-out exec keeps "
                    "its slot until it returns",
                    self.state,
                    worker,
                    describe(exc),
                )

        with contextlib.suppress(RuntimeError):  # the client's loop has stopped
            asyncio.run_coroutine_threadsafe(restart(), self.client_loop)

    def _mismatch(self, task: _Task, echo: bytes) -> None:
        """A worker decoded the contexts of ``task`` to something else (its encoding of
        them, ``echo``, differs) and ran nothing. Equal values (a set's order differs
        between processes) are fine: the jobs go back uncharged and run unchecked.
        Otherwise the state cannot run on the cluster without losing data."""
        contexts = [job.context for job in task.jobs]
        try:
            decoded = msgspec.msgpack.Decoder(list[self.spec.job_type]).decode(echo)  # type: ignore[name-defined]
            # Equal values, and the same fields on the way back: a field the worker's
            # type lacks comes back missing, which a default here would hide.
            lost = _fields(msgspec.msgpack.decode(msgspec.msgpack.encode(contexts))) - _fields(
                msgspec.msgpack.decode(echo)
            )
            same = decoded == contexts and not lost
            seen = decoded[0] if decoded else None
            what = f"{_short(contexts[0])} arrives there as {_short(seen)}"
            if lost:
                what += f" without the field(s) {', '.join(sorted(lost)[:5])}"
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError, IndexError) as exc:
            same = False
            what = f"{_short(contexts[0])} does not survive the trip there ({describe(exc)})"
        if same:
            log.debug("state %r: the Dask workers encode contexts in another order", self.state)
            self.verified = True
            self.sink.unrun(task.jobs)
            return
        self._fatal(
            "the Dask workers decode job contexts differently from this process, so "
            f"every job would lose data: {what}. Are the job type and the types it uses "
            "defined in __main__, or differently on the workers? Define them in a module "
            "the workers import"
        )

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
        ghost = recent or bool(keys & self.abandoned.keys() - lost.keys())
        ghost = ghost or any(hung.worker == worker for hung in self.hung.values())
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
        # Long gone, one way or another: keep only the recent ones (oldest first).
        horizon = now - ABANDONED_SUSPECT_SECONDS
        for old, at in list(self.abandoned.items()):
            if at > horizon:
                break
            del self.abandoned[old]
        self.abandoned[key] = now
        self.abandoned_at = now
        self._cancel(task.future)

    def _cancel(self, future: Any) -> None:
        coro = self.client.cancel([future], asynchronous=True)
        with contextlib.suppress(RuntimeError):  # the client's loop has stopped
            asyncio.run_coroutine_threadsafe(coro, self.client_loop)


async def _probe(address: str, timeout: float) -> None:
    """Open a connection to the scheduler and complete distributed's handshake, within
    ``timeout`` seconds (its own handshake waits for an answer without one)."""
    connect = _distributed().comm.connect
    try:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
    except asyncio.TimeoutError:
        raise OSError(
            f"no answer within connect_timeout={timeout:g}s (the connection was accepted, "
            "distributed's handshake never completed)"
        ) from None
    await comm.close()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "...)"


_MAIN_MODULES = ("__main__", "__mp_main__")


def _by_value(obj: Any) -> bool:
    """Whether cloudpickle (which Dask uses) would send ``obj``, a class or function,
    by value: defined in ``__main__``, inside a function, or in a module registered
    with ``cloudpickle.register_pickle_by_value``. A msgspec Struct class sent by
    value arrives in the other process without its fields."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return False
    if module in _MAIN_MODULES or "<locals>" in qualname:
        return True
    try:
        import cloudpickle  # type: ignore[import-untyped]

        registered = set(cloudpickle.list_registry_pickle_by_value())
    except Exception:  # an old cloudpickle: nothing registered by value
        return False
    parts = module.split(".")
    return any(".".join(parts[:i]) in registered for i in range(1, len(parts) + 1))


def _types_in(tp: Any) -> list[Any]:
    """``tp`` and the classes its msgspec type information names (fields' types, items
    of containers, members of unions), each once."""
    try:
        info = msgspec.inspect.type_info(tp)
    except Exception:  # not a type msgspec knows: only itself
        return [tp]
    found: list[Any] = [tp]
    seen: set[int] = set()
    stack = [info]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "cls", None)
        if cls is not None and cls not in found:
            found.append(cls)
        for field in getattr(node, "fields", ()) or ():
            stack.append(field.type)
        for attr in ("item_type", "key_type", "value_type"):
            if (sub := getattr(node, attr, None)) is not None:
                stack.append(sub)
        for attr in ("types", "item_types"):
            stack.extend(getattr(node, attr, ()) or ())
    return found


def _check_travels(spec: WorkerSpec) -> None:
    """Refuse, before anything runs, a job type, OC type or exec that would reach the
    Dask workers by value (see `_by_value`): its contexts would silently lose data."""
    what: list[tuple[str, Any]] = [
        ("the job type" if tp is spec.job_type else "type", tp) for tp in _types_in(spec.job_type)
    ]
    if spec.overall is not None:
        oc_type = type(spec.overall)
        what += [("the OC type" if tp is oc_type else "type", tp) for tp in _types_in(oc_type)]
    what.append(("exec", spec.exec))
    for label, obj in what:
        if (isinstance(obj, type) or callable(obj)) and _by_value(obj):
            name = f"{obj.__module__}.{obj.__qualname__}"
            where = (
                "in __main__ (the script run)"
                if obj.__module__ in _MAIN_MODULES
                else (
                    "inside a function"
                    if "<locals>" in obj.__qualname__
                    else "in a module registered to pickle by value"
                )
            )
            raise ValueError(
                f"state {spec.state!r}: {label} {name} is defined {where}, so it would "
                "reach the Dask workers by value, where a msgspec Struct arrives "
                "without its fields (every context silently reset or failing): move "
                "it to an importable module that the Dask workers can import too"
            )


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
        if isinstance(msg, dict) and msg.get("action") == "remove-worker":
            with self.lock:
                pools = list(self.pools)
            for pool in pools:  # after `_worker_lost`, which asks who was hung there
                with contextlib.suppress(RuntimeError):
                    pool.loop.call_soon_threadsafe(pool._worker_gone, str(msg.get("worker")))
        if self.previous is not None:
            return self.previous(event)
        return None


_watches: dict[int, _Watch] = {}


def _watch(client: Any) -> _Watch:
    watch = _watches.get(id(client))
    if watch is None:
        watch = _watches[id(client)] = _Watch(client)
    return watch
