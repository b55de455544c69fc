"""The scheduler's events, as the Dask pools of this process see them.

- ``"all"``: the scheduler's own events. A ``remove-worker`` names the worker and the
  keys it was processing; each pool takes the keys it owns (`DaskPool.worker_removed`).
- `EXEC_TOPIC`: where workers report the start and end of the execs of states with a
  timeout (`jorbmp._dask_worker.run_batch`). One topic for every jorbmp state on the
  cluster: the scheduler keeps the last ``distributed.admin.low-level-log-length``
  events of each topic (1000), so a topic per state kept 1000 events per run, for as
  long as the scheduler lived; one topic keeps 1000 in all. A client that watches it
  receives the events of every timed jorbmp state on the cluster, and passes on those
  of its own pools (a key starts with its pool's name).

A client holds one handler per topic, so one `Watch` per client serves every pool
using it, and hands back the handler it found (a user's own Client keeps its own).

A pool that restarts a worker notes it here first (`note_restart`): the tasks every
pool of this process loses with that worker are then put back uncharged, since none
of them killed it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._dask_pool import DaskPool

__all__ = ["EXEC_TOPIC", "Watch", "note_restart", "restart_removed", "watch"]

EXEC_TOPIC = "jorbmp-execs"
# Seconds a restart by this process is remembered while its worker's removal is awaited.
RESTART_MEMORY = 120.0

# Worker address -> [time.monotonic() of our restart, the stimulus id of the removal
# that consumed it, or None while it is awaited].
_restarts: dict[str, list[Any]] = {}
_restarts_lock = threading.Lock()


def note_restart(worker: str) -> None:
    """A pool of this process is about to restart ``worker``."""
    now = time.monotonic()
    with _restarts_lock:
        for old, (at, _) in list(_restarts.items()):
            if now - at > RESTART_MEMORY:
                del _restarts[old]
        _restarts[worker] = [now, None]


def restart_removed(worker: str, stimulus: str) -> bool:
    """Whether this removal of ``worker`` (the scheduler's ``stimulus_id``) is the one a
    restart by this process was waiting for.

    One removal per restart: a worker on a fixed port comes back at the same address,
    and a later death there is its own (a job that kills it must be charged). Every
    client of this process sees the same removal with the same stimulus id, so each of
    their watches gets the same answer."""
    with _restarts_lock:
        record = _restarts.get(worker)
        if record is None:
            return False
        at, consumed = record
        if consumed is None and time.monotonic() - at <= RESTART_MEMORY:
            record[1] = stimulus
            return True
        if consumed == stimulus:
            return True
        del _restarts[worker]  # a later removal: not ours
        return False


def ignore_late(event: tuple[float, Any]) -> None:
    """The handler a topic keeps once we unsubscribed: an event already on its way is
    dropped. (With no handler, ``distributed`` answers a late event by unsubscribing
    again, which raises: an ERROR and a traceback in the user's log after a run.)"""


class Watch:
    """One client's subscriptions to the scheduler's events, shared by its pools."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pools: dict[str, DaskPool] = {}  # by name, the prefix of their keys
        self.timed: set[str] = set()  # names of the pools that want exec events
        self.lock = threading.Lock()  # pools: the client's loop reads, ours write
        self.previous: Callable[[Any], Any] | None = None  # the "all" handler before ours

    def __repr__(self) -> str:
        return f"<Watch {self.client!r} pools={sorted(self.pools)}>"

    def add(self, pool: DaskPool, timed: bool) -> None:
        with self.lock:
            first, first_timed = not self.pools, timed and not self.timed
            self.pools[pool.name] = pool
            if timed:
                self.timed.add(pool.name)
        if first:
            previous = self._handlers().get("all")
            # A handler of a Watch is never the user's (one left behind is dropped),
            # nor is the one we leave for late events.
            ours = previous is ignore_late or isinstance(getattr(previous, "__self__", None), Watch)
            self.previous = None if ours else previous
            self._subscribe("all", self.event)
        if first_timed:
            # Before any task: events and submissions share one ordered connection.
            self._subscribe(EXEC_TOPIC, self.exec_event)

    def _subscribe(self, topic: str, handler: Callable[[Any], Any]) -> None:
        handlers = self._handlers()
        if handlers.get(topic) is ignore_late:  # (else: an INFO "Overwriting" each exec)
            del handlers[topic]
        self.client.subscribe_topic(topic, handler)

    def discard(self, pool: DaskPool) -> None:
        with self.lock:
            if self.pools.get(pool.name) is not pool:
                return
            del self.pools[pool.name]
            last_timed = pool.name in self.timed and len(self.timed) == 1
            self.timed.discard(pool.name)
            last = not self.pools
        if last_timed:
            self._drop(EXEC_TOPIC, self.exec_event, None)
        if last:
            _watches.pop(id(self.client), None)
            self._drop("all", self.event, self.previous)

    def _handlers(self) -> dict[str, Any]:
        handlers = getattr(self.client, "_event_handlers", None)
        return handlers if isinstance(handlers, dict) else {}

    def _drop(self, topic: str, ours: Callable[[Any], Any], previous: Any) -> None:
        """Hand ``topic`` back as it was before us: the user's handler, still subscribed,
        or no subscription, with `ignore_late` for the events already on their way.
        (``unsubscribe_topic`` leaves our handler in place: the next exec would chain to
        it, and it would outlive the pools.)"""
        handlers = self._handlers()
        if handlers.get(topic) != ours:
            return  # someone subscribed after us: theirs now
        with contextlib.suppress(Exception):  # a closed client: nothing to hand back
            if previous is not None:
                handlers[topic] = previous
            else:
                self.client.unsubscribe_topic(topic)
                handlers[topic] = ignore_late

    def _each(self) -> list[DaskPool]:
        with self.lock:
            return list(self.pools.values())

    def event(self, event: tuple[float, Any]) -> Any:
        """In the client's loop: pass a worker's removal on to the pools."""
        msg = event[1]
        if isinstance(msg, dict) and msg.get("action") == "remove-worker":
            worker = str(msg.get("worker"))
            died = not msg.get("expected")
            keys = {str(key) for key in msg.get("processing-tasks") or ()} if died else set()
            ours = restart_removed(worker, str(msg.get("stimulus_id")))
            for pool in self._each():
                pool.tell(pool.worker_removed, worker, keys, ours)
        if self.previous is not None:
            return self.previous(event)
        return None

    def exec_event(self, event: tuple[float, Any]) -> None:
        """In the client's loop: a worker's ``(what, key, worker)`` about an exec."""
        msg = event[1]
        if not (isinstance(msg, (list, tuple)) and len(msg) >= 2):
            return
        key = str(msg[1])
        with self.lock:
            pool = self.pools.get(key.rpartition("-")[0])
        if pool is not None:
            worker = str(msg[2]) if len(msg) > 2 else ""
            pool.tell(pool.timeouts.exec_event, str(msg[0]), key, worker)


_watches: dict[int, Watch] = {}


def watch(client: Any) -> Watch:
    """The `Watch` of ``client`` (one per client)."""
    found = _watches.get(id(client))
    if found is None or found.client is not client:
        found = _watches[id(client)] = Watch(client)
    return found
