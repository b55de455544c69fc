"""`DaskPool`: the backend of one Dask state for one execution.

It submits batches as Dask tasks and hands their results to the lane. Its parts:
`Connection` holds the client (connecting off the coordinator's loop, telling its
loss, closing), `Deaths` judges lost workers, `Timeouts` the timeouts and hung execs,
`Echoes` the batches a worker decoded differently, and `jorbmp._dask_watch` brings the
scheduler's events. The coordinator's loop runs every method here except the
coroutines, which run in the client's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ._backends import Backend, Sink
from ._dask_checks import Echoes, check_travels
from ._dask_connection import Connection
from ._dask_deaths import Deaths
from ._dask_timeouts import Timeouts
from ._dask_watch import EXEC_TOPIC, watch
from ._execute import describe
from ._protocol import Results, WorkerSpec
from .run import Job

if TYPE_CHECKING:
    from .dask import DaskBackend

__all__ = ["DaskPool", "Task"]

# While tasks are in flight, the scheduler is asked every PING_SECONDS whether it is
# there; no answer within PING_TIMEOUT ends the run.
PING_SECONDS = 2.0
PING_TIMEOUT = 20.0
# Seconds after a client.restart() was seen (our tasks cancelled by it) during which a
# worker death is the restart's doing: the workers it restarts may die under tasks
# submitted again meanwhile.
CLUSTER_RESTART_SECONDS = 10.0


class Task:
    """One Dask task of ours in flight: a batch of jobs."""

    __slots__ = ("ended", "frozen", "future", "jobs", "started", "submitted", "worker")

    def __init__(self, jobs: list[Job[Any]], future: Any, submitted: float) -> None:
        self.jobs = jobs
        self.future = future
        self.submitted = submitted
        # With a timeout: when the worker said the exec started (loop time), where,
        # and whether it said the exec ended (its thread is free again); ``frozen``:
        # its worker held it without a word (see `Timeouts`).
        self.started: float | None = None
        self.worker = ""
        self.ended = False
        self.frozen = False

    def slot_seconds(self, now: float) -> float:
        """Seconds this task has held its slot: from its reported start, else its
        submission (the metrics of a timed-out or lost exec)."""
        return now - (self.started if self.started is not None else self.submitted)


class DaskPool(Backend):
    """The backend of one state on a Dask cluster: tasks in flight, keyed by Dask key."""

    label = "dask"
    log = logging.getLogger("jorbmp")

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
        self.limit = concurrency  # an adaptive state's current limit (`set_limit`)
        self.sink = sink
        self.timeout = timeout
        # With a timeout, one job per task: the one charged is then the one that hung.
        self.batch_max = 1 if timeout is not None else config.max_batch
        self.max_batch = self.batch_max
        self.batch_seconds = config.batch_seconds
        self.name = f"jorbmp-{spec.state}-{uuid.uuid4().hex[:8]}"  # plugin and key prefix
        self.counter = itertools.count()
        self.tasks: dict[str, Task] = {}
        self.deaths = Deaths(self)
        self.timeouts = Timeouts(self)
        self.echoes = Echoes(self)
        self.connection = Connection(self)
        self.closing = False  # see `Connection.lock`
        self.ready = False  # connected and the plugin registered (see `start`)
        self.pinged: concurrent.futures.Future[None] | None = None  # a ping in flight
        self.pinged_at = 0.0
        self.cluster_restarted_at = -CLUSTER_RESTART_SECONDS  # see `_cancelled`
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_results = msgspec.msgpack.Decoder(Results).decode

    def __repr__(self) -> str:
        return f"<DaskPool {self.state!r} {self.config.address()!r} tasks={len(self.tasks)}>"

    # -- connecting ---------------------------------------------------------------------

    def start(self) -> None:
        """Check what can be checked here, then connect and register the worker plugin
        in a thread of their own (`Connection.open`): the coordinator's loop stays free
        meanwhile, so Ctrl-C, SIGTERM and `Processor.stop` work at once, and
        ``connect_timeout`` holds even against a peer that never answers. Until then the
        state takes no jobs."""
        check_travels(self.spec)
        self.config.check_client()
        self.loop = asyncio.get_running_loop()
        self.connection.open()

    def tell(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)`` in the coordinator's loop (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the coordinator's loop has closed
            self.loop.call_soon_threadsafe(fn, *args)

    def connected(self) -> None:
        """In the coordinator's loop: connected and registered; take jobs."""
        if self.closing:
            return
        self.ready = True
        connection = self.connection
        # The address, for messages, while the client still knows it.
        known = getattr(connection.client.scheduler, "address", "")
        connection.address = str(known or connection.address)
        watch(connection.client).add(self, timed=self.timeout is not None)
        self.sink.freed()

    def start_failed(self, exc: BaseException) -> None:
        """In the coordinator's loop: connecting or registering failed with ``exc``."""
        if not self.closing:
            self.sink.fatal(exc)

    # -- Backend ----------------------------------------------------------------------

    def free(self) -> int:
        if self.closing or not self.ready:
            return 0
        return self.deaths.free(self.limit - len(self.timeouts.hung))

    def executing(self) -> int:
        return len(self.tasks)

    def pids(self) -> list[int]:
        return []  # the work runs on other machines: no local CPU or memory to report

    def submit(self, jobs: list[Job[Any]]) -> None:
        from ._dask_worker import run_batch

        connection = self.connection
        if not connection.running():  # first: nothing is dispatched again
            self.sink.unrun(jobs)
            return
        key = f"{self.name}-{next(self.counter)}"
        payload = self._encode([job.context for job in jobs])
        topic = EXEC_TOPIC if self.timeout is not None else ""
        submit = connection.client.submit
        future = submit(run_batch, self.name, payload, topic, key, key=key, pure=False)
        self.tasks[key] = Task(jobs, future, self.loop.time())
        connection.run(self._collect(key, future))

    def check_timeouts(self, now: float) -> None:
        if self.closing:
            return
        if not self.ready:
            self.connection.check_deadline(now)
            return
        if not self.connection.running():
            return
        idle = self.pinged is None or self.pinged.done()
        if (self.tasks or self.timeouts.hung) and idle and now - self.pinged_at >= PING_SECONDS:
            # A scheduler can also go away without the client noticing (seen with one
            # closed gracefully in this process): ask it, rather than wait forever.
            self.pinged_at = now
            self.pinged = self.connection.run(self._ping())
        self.timeouts.check(now)

    def close(self, abandon: bool) -> None:
        connection = self.connection
        client = connection.shut()
        if client is None:
            return  # still connecting: that thread closes what it opens
        for task in self.tasks.values():
            connection.cancel(task.future)
        self.tasks.clear()
        if self.ready:
            watch(client).discard(self)
        # A hung exec's worker may not answer: nobody waits for the plugin's removal.
        connection.close(abandon, wait=not abandon and not self.timeouts.hung)

    # -- the scheduler's events (in the coordinator's loop) ---------------------------

    def worker_removed(self, worker: str, died: set[str], restarted: bool) -> None:
        """A Dask worker left; ``died``: the keys it was processing, if it died;
        ``restarted``: the removal a restart by this process waited for."""
        if self.closing:
            return
        if died:  # first: it asks who was hung there
            self.deaths.worker_died(worker, died, restarted)
        self.timeouts.worker_gone(worker)
        self.echoes.worker_gone(worker)

    # -- results and failures -------------------------------------------------------------

    async def _ping(self) -> None:
        """In the client's loop: check that the scheduler answers."""
        try:
            await asyncio.wait_for(self.connection.client.scheduler.identity(), PING_TIMEOUT)
        except Exception as exc:
            self.tell(self.connection.scheduler_lost, f"it did not answer: {describe(exc)}")

    async def _collect(self, key: str, future: Any) -> None:
        """In the client's loop: wait for one task, then hand the result to `_finished`."""
        data: Any = None
        error: BaseException | None = None
        try:
            data = await self.connection.client.gather(future, asynchronous=True)
        except BaseException as exc:  # cancelled, lost, or failed outside the exec
            error = exc
        self.tell(self._finished, key, data, error)

    def _finished(self, key: str, data: Any, error: BaseException | None) -> None:
        task = self.tasks.pop(key, None)
        if task is None or self.closing:
            return  # abandoned already (timeout, lost worker, stop)
        try:
            if error is None and isinstance(data, tuple):
                self.echoes.judge(task, *data)
            elif error is None:
                results = self._decode_results(data)
                self.deaths.settled(task.jobs)
                self.sink.done(task.jobs, results)
            elif type(error).__name__ == "KilledWorker":
                reason = f"worker died (Dask gave up: {describe(error)})"
                self.deaths.lost([task], reason, certain=len(task.jobs) == 1)
            elif isinstance(error, (asyncio.CancelledError, _cancelled_error())):
                self._cancelled(task, error)
            elif type(error).__name__ == "CommClosedError":
                # The gather's own call to the scheduler failed before the client
                # cancelled its futures. (Data a worker fails to send is asked of the
                # scheduler instead, so only the scheduler's connection ends up here.)
                self.connection.scheduler_lost(describe(error))
            else:
                self.fatal(
                    f"a Dask task failed outside the exec ({describe(error)}); are jorbmp, "
                    "the exec's module and the context types importable on the workers?"
                )
        except Exception as exc:
            self.sink.fatal(exc)

    def _cancelled(self, task: Task, error: BaseException) -> None:
        """Our task was cancelled, and not by us: say by whom, as far as it is known."""
        reason = getattr(error, "reason", "")
        connection = self.connection
        status = connection.client.status
        if reason == "scheduler-connection-lost" or status == "connecting":
            connection.scheduler_lost(describe(error))
        elif status != "running":
            connection.gone(status)
        elif reason == "scheduler-restart":
            # client.restart(): every task forgotten, the workers restarted. Nobody
            # was at fault: the jobs run again on the new workers (and the deaths of
            # the workers it restarts are not theirs, see `cluster_restarting`).
            self.cluster_restarted_at = self.loop.time()
            self.log.warning(
                "state %r: the Dask cluster was restarted (client.restart()): its tasks "
                "were cancelled, their jobs run again",
                self.state,
            )
            self.sink.unrun(task.jobs)
        else:
            self.fatal(
                f"a Dask task of the state was cancelled from outside jorbmp ({describe(error)}"
                "; client.cancel() on its futures?)"
            )

    def cluster_restarting(self) -> bool:
        """Whether a client.restart() was seen lately: the workers it restarts die
        under whatever of ours reached them meanwhile, killed by nobody."""
        return self.loop.time() - self.cluster_restarted_at < CLUSTER_RESTART_SECONDS

    def fatal(self, what: str) -> None:
        """End the run: ``what`` went wrong with the state on the cluster."""
        address = self.connection.address
        self.sink.fatal(RuntimeError(f"state {self.state!r}: {what} (scheduler {address!r})"))


def _cancelled_error() -> type[BaseException]:
    from distributed.client import FutureCancelledError

    return FutureCancelledError
