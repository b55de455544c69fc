"""Status updates reach the listener on a thread of its own, through a mailbox.

A listener is the user's code: it may be slow (a network call per update), or block
in a write to an output that stopped draining (a pipe nobody reads, a terminal paused
with Ctrl-S). Called on the coordinator's loop, it would hold up every transition, and
Ctrl-C with them. So the loop only posts updates here and never waits, except at the
very end, for at most `CLOSE_TIMEOUT` seconds.

The mailbox keeps the latest update only: a listener slower than the updates skips the
ones it had no time for, and never gets an older update after a newer one. The first
and the last update of a run are pinned: they are always delivered, in order.

A listener also gets intermediate updates only as long as it spends at most about
1 / (1 + `PAUSE_FACTOR`) of the time in them: a listener that holds the GIL (drawing
bars is Python code) takes that share from the coordinator at most, and a slow one is
rarely in the middle of an update when the run ends, so the last update, which `exec`
waits for, seldom has to wait for another first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .status import NilStatusListener, StatusCount, StatusListener, notify

__all__ = ["CLOSE_TIMEOUT", "ListenerMailbox"]

log = logging.getLogger("jorbmp")

# Seconds the end of `exec` waits for the listener to take the last update and close.
# A listener that takes longer (or blocks forever) is left behind on its thread, with
# a WARNING: the run's results and checkpoint are final before this wait starts.
CLOSE_TIMEOUT = 5.0
# After an update that took the listener d seconds, the next intermediate one waits
# PAUSE_FACTOR x d (pinned ones never wait): 1 ms per update costs nothing, 0.5 s means
# an update every 2.5 s.
PAUSE_FACTOR = 4.0


class ListenerMailbox:
    """Delivers status updates to ``listener`` on a daemon thread, latest value first.

    `put` never blocks (beyond a short lock); `finish` posts the last update, has the
    listener closed, and waits at most `CLOSE_TIMEOUT` seconds for both.
    """

    def __init__(self, listener: StatusListener) -> None:
        self.listener = listener
        # A listener that ignores everything needs no thread (the default).
        self.idle = type(listener) is NilStatusListener
        self._cond = threading.Condition(threading.Lock())
        # Updates to deliver, oldest first: (counts, pinned). Only the last entry may
        # be replaced, and only when it is not pinned.
        self._queue: deque[tuple[list[StatusCount], bool]] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None

    def put(self, counts: list[StatusCount], pinned: bool = False) -> None:
        """Post an update; ``pinned`` ones (the first, the last) are never skipped."""
        if self.idle:
            return
        with self._cond:
            if self._closing:
                return
            self._post(counts, pinned)
        if self._thread is None:
            self._start()

    def finish(self, last: list[StatusCount] | None) -> bool:
        """Post ``last`` (if any), close the listener, wait for both at most
        `CLOSE_TIMEOUT` seconds. False when the listener did not finish in time."""
        if self.idle:
            return True
        with self._cond:
            if self._closing:
                return True
            if last is not None:
                self._post(last, True)
            self._closing = True
            self._cond.notify()
        if self._thread is None:
            self._start()
        assert self._thread is not None
        timeout = CLOSE_TIMEOUT
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                behind = len(self._queue)
            log.warning(
                "status listener %r did not finish within %gs (%d updates not delivered); "
                "the run is over and exec returns without waiting for it",
                self.listener,
                timeout,
                behind,
            )
            return False
        return True

    def _post(self, counts: list[StatusCount], pinned: bool) -> None:
        """Queue ``counts``, in place of an intermediate update not yet delivered (it is
        older); with the lock held."""
        queue = self._queue
        if queue and not queue[-1][1]:
            queue[-1] = (counts, pinned)  # the listener had no time for it: skip it
        else:
            queue.append((counts, pinned))
        self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._deliver, name="jorbmp-status-listener", daemon=True
        )
        self._thread.start()

    def _deliver(self) -> None:
        cond, queue = self._cond, self._queue
        not_before = 0.0  # monotonic time before which no intermediate update goes out
        while True:
            with cond:
                while True:
                    if queue and queue[0][1]:
                        break  # pinned: now
                    if queue and (wait := not_before - time.monotonic()) <= 0:
                        break
                    if not queue and self._closing:
                        break
                    cond.wait(wait if queue else None)
                if not queue:
                    break  # closing, and everything was delivered
                counts, _ = queue.popleft()
            started = time.monotonic()
            notify(self.listener, counts)
            ended = time.monotonic()
            not_before = ended + PAUSE_FACTOR * (ended - started)
        try:
            self.listener.close()
        except Exception:  # a listener is never worth failing the run
            log.exception("status listener %r failed to close", self.listener)
