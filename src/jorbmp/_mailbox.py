"""Status updates reach the listener on a thread of its own, through a mailbox.

A listener is the user's code: it may be slow (a network call per update), or block
in a write to an output that stopped draining (a pipe nobody reads, a terminal paused
with Ctrl-S). Called on the coordinator's loop, it would hold up every transition, and
Ctrl-C with them. So the loop only posts updates here and never blocks: at the very
end it awaits the listener for at most `CLOSE_TIMEOUT` seconds, a wait that leaves the
loop running (an application's other tasks, under `exec_async`) and that a second
Ctrl-C, or cancelling `exec_async`, cuts short.

The mailbox keeps the latest update only: a listener slower than the updates skips the
ones it had no time for, and never gets an older update after a newer one. The first
and the last update of a run are pinned: they are always delivered, in order.

A listener also gets intermediate updates only as long as it spends at most about
1 / (1 + `PAUSE_FACTOR`) of the time in them: a listener that holds the GIL (drawing
bars is Python code) takes that share from the coordinator at most, and a slow one is
rarely in the middle of an update when the run ends, so the last update, which `exec`
waits for, seldom has to wait for another first. Its cost is the median of its last
`COST_CALLS` calls, so one slow call (an output paused for a moment, Ctrl-S) does not
hold up the updates after it.

Calls to one listener object never overlap, even across runs: every call holds the
listener's `_Seat` lock. A run that gave up waiting leaves its thread behind, maybe
stuck in a call; if the same listener is used by a later run meanwhile, that run's
updates wait (coalescing) until the stuck call returns, and the left-behind thread then
drops what it had left, so that the later run's updates and close are not interleaved
with an earlier run's. The earlier run's close is not lost: the later run's thread
calls it before its own first update, so the listener starts the later run afresh
(`TqdmStatusListener` draws new bars for it).

A listener's call that starts a run with that same listener (a sub-run from inside
`status_update`) is refused with a RuntimeError: the sub-run's updates would wait for
the very call that waits for the sub-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from typing import Any

from .status import NilStatusListener, StatusCount, StatusListener

__all__ = ["CLOSE_TIMEOUT", "ListenerMailbox"]

log = logging.getLogger("jorbmp")

# Seconds the end of `exec` waits for the listener to take the last update and close.
# A listener that takes longer (or blocks forever) is left behind on its thread, with
# a WARNING: the run's results and checkpoint are final before this wait starts.
CLOSE_TIMEOUT = 5.0
# After an update, the next intermediate one waits PAUSE_FACTOR x the listener's cost
# (pinned ones never wait): 1 ms per update costs nothing, 0.5 s means an update every
# 2.5 s.
PAUSE_FACTOR = 4.0
# The cost is the median duration of the last COST_CALLS calls (those before the
# first count as 0): an odd number, so that one slow call among them is ignored, and a
# listener that is slow in most of its calls is paused for their duration.
COST_CALLS = 3
# Seconds the wait goes on once given up (a second Ctrl-C, a cancelled exec_async):
# "at once" to a person, and time enough for a healthy listener (tqdm's last redraw
# takes about a millisecond) to finish, so that only a stuck one is left behind.
GIVE_UP_GRACE = 0.1


class _Seat:
    """One listener object, shared by every mailbox (every run) that delivers to it:
    the lock each call holds, and which mailbox is the newest."""

    __slots__ = ("__weakref__", "holder", "listener", "lock", "newest", "open", "thread")

    def __init__(self, listener: StatusListener) -> None:
        # Held strongly: while the seat lives, id(listener) names this listener.
        self.listener = listener
        self.lock = threading.Lock()
        self.newest = 0  # serial of the mailbox created last for this listener
        self.holder = 0  # serial of the mailbox whose call holds the lock (0: none)
        self.thread = 0  # ident of the thread in that call (0: none)
        # The mailbox whose run the listener is in (it was given an update and not
        # closed yet), if any: a run left behind may never close it.
        self.open: ListenerMailbox | None = None


# id(listener) -> its seat, while some mailbox holds it.
_seats: weakref.WeakValueDictionary[int, _Seat] = weakref.WeakValueDictionary()
_seats_lock = threading.Lock()
_serials = itertools.count(1)


def _take_seat(listener: StatusListener) -> tuple[_Seat, int]:
    """The listener's seat, and a serial that makes the caller its newest mailbox;
    RuntimeError when this thread is in a call to the listener (a nested run)."""
    with _seats_lock:
        seat = _seats.get(id(listener))
        if seat is None or seat.listener is not listener:
            seat = _seats[id(listener)] = _Seat(listener)
        # Only this thread sets seat.thread to its own ident, so the test is exact.
        if seat.thread == threading.get_ident():
            raise RuntimeError(
                f"status listener {listener!r} started a run with itself as its listener "
                "from inside one of its own calls: that run's updates would wait for "
                "the call that waits for the run; give the inner run another listener"
            )
        serial = seat.newest = next(_serials)
    return seat, serial


def _cost(durations: deque[float]) -> float:
    """A listener's cost per call: the median of its recent calls' durations."""
    return sorted(durations)[len(durations) // 2]


def _resolve(fut: asyncio.Future[str], how: str) -> None:
    if not fut.done():
        fut.set_result(how)


class ListenerMailbox:
    """Delivers status updates to ``listener`` on a daemon thread, latest value first.

    `put` and `close` never block (beyond a short lock); `wait_closed` awaits the
    listener's last update and close, at most `CLOSE_TIMEOUT` seconds; `give_up` ends
    that wait at once (`GIVE_UP_GRACE`).
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
        self._done = False  # the thread delivered everything and closed the listener
        # Why the end of the run no longer waits for the listener, if it does not.
        self._given_up: str | None = None
        self._left_behind = False  # ... and stopped waiting with the listener unfinished
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[str]] | None = None
        if not self.idle:
            self._seat, self._serial = _take_seat(listener)

    def put(self, counts: list[StatusCount], pinned: bool = False) -> None:
        """Post an update; ``pinned`` ones (the first, the last) are never skipped."""
        if self.idle:
            return
        with self._cond:
            if self._closing:
                return
            self._post(counts, pinned)
        self._start()

    def close(self, last: list[StatusCount] | None) -> None:
        """Post ``last`` (if any) and have the listener closed after it; the first call
        counts, later ones do nothing."""
        if self.idle:
            return
        with self._cond:
            if self._closing:
                return
            if last is not None:
                self._post(last, True)
            self._closing = True
            self._cond.notify()
        self._start()

    def give_up(self, why: str = "interrupted again") -> None:
        """Stop waiting for the listener (a second Ctrl-C): `wait_closed` returns within
        `GIVE_UP_GRACE` seconds, whether it is waiting already or not yet."""
        with self._cond:
            self._given_up = why
            waiter = self._waiter
        if waiter is not None:
            loop, fut = waiter
            loop.call_soon_threadsafe(loop.call_later, GIVE_UP_GRACE, _resolve, fut, why)

    async def wait_closed(self) -> bool:
        """Close the listener (if `close` was not called) and await its last update and
        close, at most `CLOSE_TIMEOUT` seconds, without blocking the loop. False, with a
        WARNING, when the listener was left behind unfinished."""
        self.close(None)
        if self.idle:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        with self._cond:
            if self._done:
                return True
            if self._given_up is not None:
                timeout, why = GIVE_UP_GRACE, self._given_up
            else:
                timeout, why = CLOSE_TIMEOUT, "timeout"
            self._waiter = (loop, fut)
        timer = loop.call_later(timeout, _resolve, fut, why)
        try:
            how = await fut
        except asyncio.CancelledError:
            self._leave_behind("cancelled")
            raise
        finally:
            timer.cancel()
            self._waiter = None
        if how == "done":
            return True
        self._leave_behind(how)
        return False

    def _leave_behind(self, why: str) -> None:
        with self._cond:
            if self._done:
                return
            self._left_behind = True
            behind = len(self._queue)
        seat = self._seat
        other = seat.holder not in (0, self._serial)
        log.warning(
            "status listener %r did not finish %s (%d updates not delivered%s); the run "
            "is over and exec returns without waiting for it",
            self.listener,
            f"within {CLOSE_TIMEOUT:g}s" if why == "timeout" else f"({why})",
            behind,
            ": it is still in a call from another run" if other else "",
        )

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
        # Called on the coordinator's loop only, so never twice at once.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._deliver, name="jorbmp-status-listener", daemon=True
            )
            self._thread.start()

    def _deliver(self) -> None:
        try:
            self._deliver_all()
        finally:
            with self._cond:
                self._done = True
                waiter = self._waiter
            if waiter is not None:
                loop, fut = waiter
                # RuntimeError: the loop closed, exec returned without waiting.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, fut, "done")

    def _deliver_all(self) -> None:
        cond, queue = self._cond, self._queue
        not_before = 0.0  # monotonic time before which no intermediate update goes out
        durations = deque([0.0] * COST_CALLS, maxlen=COST_CALLS)  # the last calls'
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
            if not self._call("status_update", counts):
                return
            ended = time.monotonic()
            durations.append(ended - started)
            not_before = ended + PAUSE_FACTOR * _cost(durations)
        self._call("close")

    def _dropped(self) -> bool:
        """Whether this mailbox's calls are dropped: it was left behind, and a later
        run uses the listener. Once true, it stays true (neither flag goes back)."""
        return self._left_behind and self._seat.newest != self._serial

    def _call(self, name: str, *args: Any) -> bool:
        """Call the listener's method ``name``, never at the same time as another thread
        does; False when this mailbox's calls are dropped: it stops."""
        seat = self._seat
        with seat.lock:
            if self._dropped():
                log.warning(
                    "status listener %r returned to a run that had left it behind, after "
                    "a later run began using it: the earlier run's last updates are "
                    "dropped, and the later run closes the listener for it",
                    self.listener,
                )
                return False
            earlier = seat.open
            if earlier is not None and earlier is not self and earlier._dropped():
                # A run left behind never closes the listener: close it for that run,
                # before this run's first call, so that this run starts afresh.
                seat.open = None
                self._guarded(seat, "close")
            seat.open = self if name != "close" else None
            self._guarded(seat, name, *args)
        return True

    def _guarded(self, seat: _Seat, name: str, *args: Any) -> None:
        """Call the listener's method ``name``, with the seat's lock held; what it
        raises, SystemExit too, is logged (a listener never ends its thread)."""
        seat.holder, seat.thread = self._serial, threading.get_ident()
        try:
            getattr(self.listener, name)(*args)
        except BaseException:
            # Cannot raise: a listener whose repr raises is reported by the handler.
            log.exception(
                "status listener %r raised in %s (logged only: the run is not affected)",
                self.listener,
                name,
            )
        finally:
            seat.holder = seat.thread = 0
