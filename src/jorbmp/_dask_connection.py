"""`Connection`: one `DaskPool`'s Dask client, from connecting to closing.

- `open` connects and registers the state's worker plugin in a thread of its own:
  the coordinator's loop stays free meanwhile (Ctrl-C, SIGTERM, `Processor.stop`),
  and `check_deadline` holds ``connect_timeout`` even against a peer that never
  answers. The thread tells the pool how it went (`DaskPool.connected`,
  `DaskPool.start_failed`).
- While the state runs, `running` and `gone` tell why the client stopped: the
  scheduler is lost (the client reconnects, or it is one made here), or a user's
  Client was closed under the run. Either ends the run with an error naming it.
- `run` and `cancel` hand work to the client's loop, from the coordinator's.
- `shut` then `close`: the connecting thread drops what it gets later, the plugin
  is dropped from the workers and a client made here is closed.

``closing`` lives on the pool (every part of it reads it); `lock` guards it together
with `client` against the connecting thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ._execute import describe

if TYPE_CHECKING:
    from ._dask_pool import DaskPool

__all__ = ["Connection"]

# Seconds `close` waits for the cluster to drop the state's worker plugin (not at
# all when abandoning: a second Ctrl-C, a failed run, a hung exec).
CLOSE_TIMEOUT = 10.0
# Seconds past ``connect_timeout`` before the coordinator gives up on a connection
# itself (distributed's own error, which says more, normally comes first).
CONNECT_SLACK = 0.5
# Tries at registering the state's worker plugin when a connection closes under it (a
# worker restarting), REGISTER_RETRY_SECONDS times the tries so far apart.
REGISTER_TRIES = 5
REGISTER_RETRY_SECONDS = 0.5


class Connection:
    """The Dask client of one `DaskPool`: connecting, telling its loss, closing."""

    def __init__(self, pool: DaskPool) -> None:
        self.pool = pool
        self.client: Any = None  # set by the connecting thread, under `lock`
        self.own = False  # made here: closed here
        self.client_loop: Any = None  # the client's event loop, with the client
        self.lock = threading.Lock()  # client and pool.closing, with the connecting thread
        self.deadline = 0.0  # coordinator loop time; see `check_deadline`
        self.reconnecting = False  # the client was seen reconnecting to the scheduler
        self.lost = False  # the scheduler is gone: nothing to tidy up there
        self.address = pool.config.address()  # the scheduler's, for messages

    def __repr__(self) -> str:
        status = "not connected yet" if self.client is None else self.client.status
        return f"<Connection {self.address!r} {status} own={self.own} lost={self.lost}>"

    # -- connecting ---------------------------------------------------------------------

    def open(self) -> None:
        """Connect and register the worker plugin in a thread of their own (in the
        coordinator's loop, which `check_deadline` then watches)."""
        pool = self.pool
        self.deadline = pool.loop.time() + pool.config.connect_timeout + CONNECT_SLACK
        threading.Thread(
            target=self._connect, name=f"jorbmp-dask-connect-{pool.state}", daemon=True
        ).start()

    def _connect(self) -> None:
        """In the connecting thread: connect, register the plugin, tell the loop."""
        from ._dask_worker import StatePlugin

        pool = self.pool
        try:
            client, own = pool.config.connect()
        except BaseException as exc:
            pool.tell(pool.start_failed, exc)
            return
        with self.lock:
            closing = pool.closing
            if not closing:
                self.client, self.own = client, own
                self.client_loop = client.loop.asyncio_loop
        if closing:  # the run ended (Ctrl-C, stop, the deadline) while we connected
            if own:
                _close_quietly(client)
            return
        try:
            self._register(client, StatePlugin(pool.name, pool.spec))
        except BaseException as exc:
            error = RuntimeError(
                f"state {pool.state!r}: cannot set up the Dask workers at "
                f"{pool.config.address()!r}: {describe(exc)} (the workers must import "
                "jorbmp and the modules defining the exec and the context types; types "
                "defined in a script's __main__ cannot travel)"
            )
            error.__cause__ = exc
            pool.tell(pool.start_failed, error)
            return
        pool.tell(pool.connected)

    def _register(self, client: Any, plugin: Any) -> None:
        """In the connecting thread: register the worker plugin. A worker that leaves
        meanwhile (another run restarting its frozen worker, a death) fails the call
        with a closed connection: it is retried, `REGISTER_TRIES` times at most, within
        ``connect_timeout``."""
        pool = self.pool
        deadline = time.monotonic() + pool.config.connect_timeout
        for tries in itertools.count(1):
            try:
                client.register_plugin(plugin, name=pool.name)
                return
            except OSError as exc:  # distributed's CommClosedError is one
                wait = min(REGISTER_RETRY_SECONDS * tries, deadline - time.monotonic())
                if tries >= REGISTER_TRIES or wait <= 0 or pool.closing:
                    raise
                pool.log.debug(
                    "state %r: registering the Dask plugin: %s; again in %.1fs",
                    pool.state,
                    describe(exc),
                    wait,
                )
                time.sleep(wait)

    def check_deadline(self, now: float) -> None:
        """Still connecting at ``now``: past the deadline, the run ends."""
        pool = self.pool
        if self.client is None and now > self.deadline:
            pool.closing = True  # the connecting thread drops what it gets later
            pool.sink.fatal(
                RuntimeError(
                    f"cannot connect to the Dask scheduler at {pool.config.address()!r}: "
                    f"no answer within connect_timeout={pool.config.connect_timeout:g}s"
                )
            )

    # -- while the state runs -----------------------------------------------------------

    def running(self) -> bool:
        """Whether the client runs; when not, the run ends with why (see `gone`)."""
        status = self.client.status
        if status != "running":
            self.gone(status)
            return False
        return True

    def gone(self, status: str) -> None:
        """The client is not running: the scheduler is lost, or the client was closed."""
        if status == "connecting":
            self.reconnecting = True
            self.scheduler_lost("the client is reconnecting")
        elif self.reconnecting or self.own:
            self.scheduler_lost(f"client {status}")
        else:
            self.lost = True  # nothing to tidy up with a closed client either
            self.pool.fatal(
                f"the Dask client given to DaskBackend was closed ({status}) while the "
                "state ran: keep it open until exec returns"
            )

    def scheduler_lost(self, what: str) -> None:
        """The scheduler is gone (``what`` says how): the run ends."""
        self.lost = True
        self.pool.fatal(f"lost the Dask scheduler ({what})")

    def run(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coro`` in the client's loop (from the coordinator's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.client_loop)

    def run_quietly(self, coro: Coroutine[Any, Any, Any]) -> None:
        """`run`, unless the client's loop has stopped already (nothing left to do there)."""
        with contextlib.suppress(RuntimeError):
            self.run(coro)

    def cancel(self, future: Any) -> None:
        """Cancel a task of ours (in the client's loop)."""
        self.run_quietly(self.client.cancel([future], asynchronous=True))

    # -- closing ------------------------------------------------------------------------

    def shut(self) -> Any:
        """The pool is closing: the connecting thread drops what it gets from now on.
        The client, or None while still connecting (that thread closes what it opens)."""
        with self.lock:
            self.pool.closing = True
            return self.client

    def close(self, abandon: bool, wait: bool) -> None:
        """After `shut` found a client: drop the state's plugin from the workers (waiting
        up to `CLOSE_TIMEOUT` for it with ``wait``) and close a client made here (in a
        thread of its own when abandoning)."""
        client = self.client
        if client.status == "running" and not self.lost:
            # In the client's loop: the public, blocking call would wait forever for a
            # scheduler that went away unnoticed. Abandoning (a second Ctrl-C, a failed
            # run) or with a hung exec (its worker may not answer), nobody waits.
            pool = self.pool
            unregistered = self.run(client._unregister_worker_plugin(name=pool.name, nanny=None))
            if wait:
                try:
                    unregistered.result(CLOSE_TIMEOUT)
                except Exception as exc:  # the workers keep an idle plugin: nothing lost
                    log = pool.log.debug
                    log("state %r: unregistering Dask plugin: %s", pool.state, describe(exc))
        if self.own:
            if abandon:  # a scheduler that hangs would hold the close for its timeout
                threading.Thread(target=_close_quietly, args=(client,), daemon=True).start()
            else:
                _close_quietly(client)


def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        client.close(timeout=CLOSE_TIMEOUT)
