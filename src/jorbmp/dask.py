"""`DaskBackend`: run a process state's execs on a Dask distributed cluster.

The coordinator keeps owning the run: its checkpoint, retries, kicks, rate limits and
status stay here, and only execs move to the cluster::

    State("render", render, concurrency=64, backend=DaskBackend("tcp://scheduler:8786"))

    coordinator (this process)                          Dask worker (each)
    --------------------------                          ------------------
    Connection.open: connect, register StatePlugin -->  plugin: spec, AC built there
    DaskPool.submit: Dask task run_batch(contexts) -->  re-encode = payload? exec each
    DaskPool._finished  <-- encoded Results, or the worker's encoding (nothing run)
    Watch  <-- scheduler events: remove-worker; exec start/end (states with a timeout)

- `DaskBackend` (here) is the configuration a `State` holds; each execution builds a
  `jorbmp._dask_pool.DaskPool` from it, the backend of one state for one run.
- Once per execution a worker plugin carries the state's exec, AC (or ``ac_factory``,
  which then runs on each Dask worker) and OC to every worker, including workers that
  join later; per task only a batch of encoded job contexts goes out and encoded
  outcomes come back (`jorbmp._dask_worker`).
- ``concurrency`` caps the state's tasks on the cluster; a task runs its batch one
  job at a time, so at most ``concurrency`` execs run at once, as with the local pool.
  Batches hold about ``batch_seconds`` of work, to amortise the scheduler's cost per task.
- Contexts reach the workers intact, or the state fails with no job changed
  (`jorbmp._dask_checks`): types that would travel by value are refused before
  anything runs, and every worker checks every batch it decodes.
- Worker deaths charge the job that died alone on its worker, and isolate the
  suspects otherwise (`jorbmp._dask_deaths`).
- ``timeout`` counts from the exec's start, which the worker reports; hung execs keep
  their slot and their worker is restarted (`jorbmp._dask_timeouts`).
- Losing the scheduler ends the run with an error naming it; the checkpoint holds
  every transition that came back (executing jobs re-run on the next exec). A closed
  Client, a ``client.restart()`` and a cancel from elsewhere are told apart.
- Connecting and registering the plugin run in a thread of their own: the
  coordinator's loop (Ctrl-C, SIGTERM, `Processor.stop`) stays free, and
  ``connect_timeout`` holds against a peer that never answers
  (`jorbmp._dask_connection`).

``distributed`` is an optional dependency (``pip install 'jorbmp[dask]'``); this module
imports it only when a state with a `DaskBackend` starts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._backends import Backend, Sink
from ._dask_pool import DaskPool
from ._execute import describe
from ._protocol import WorkerSpec

__all__ = ["DaskBackend"]

# Largest batch of jobs in one Dask task. A task costs the scheduler about a
# millisecond, so tiny jobs need big batches; batch_seconds normally decides first.
MAX_BATCH = 1000
# Seconds of work per task: long against the scheduler's round trip (a few ms) and
# short enough that results stream on and a lost worker costs little.
BATCH_SECONDS = 0.2
# Seconds a timed-out exec may go on running on its Dask worker (holding its slot)
# before that worker is restarted (`DaskBackend(restart_hung_after=...)`).
HUNG_RESTART_SECONDS = 5.0


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

        Blocks (`jorbmp._dask_connection.Connection` calls it off the coordinator's
        loop). A scheduler address is first asked for distributed's handshake within
        ``connect_timeout``: a peer that accepts the connection and never answers would
        hold ``distributed.Client`` forever, whatever its timeout."""
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
