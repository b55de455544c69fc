"""Framed messages over a socketpair between the coordinator and one worker process.

A message is a 4-byte big-endian length followed by the payload. The coordinator's
end (`CoordinatorEnd`) is non-blocking and driven by its event loop: a write the
socket cannot take now is buffered and flushed when it drains, so the coordinator
never waits on a busy worker, and one ``recv`` picks up every message that has
arrived. The worker's end (`WorkerEnd`) is blocking and simple.

The coordinator's ends of one pool share a `Poller` (where ``select.epoll`` exists):
one epoll set that the event loop watches as a single fd, so that one wake-up of the
loop takes the results of every worker that has any. While the pool's workers hold
a batch queued behind the one they run, a wake-up need not be immediate: the poller
then waits a few milliseconds between polls instead (see `Poller`), and each poll
takes the results of several workers. Wake-ups, not messages, were most of the
coordinator's cost per job: ~60 us of CPU per single-job message at one wake-up per
result, ~35-45 us with this.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import struct
import threading
from collections.abc import Callable

from . import _fds

HEADER = struct.Struct("!I")
# The largest payload a header can describe. Module-level so that a test can lower it.
MAX_PAYLOAD = 2**32 - 1
# Bytes asked of the kernel per read: a whole batch of results for small jobs.
READ_SIZE = 256 * 1024
# Payloads smaller than this are copied behind their header and sent in one call.
_COPY_BELOW = 1 << 20
# Send errors that mean the worker's end is gone (the reader then sees EOF).
_GONE = (BrokenPipeError, ConnectionResetError)


def _ignore(*args: object) -> None:
    pass


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair: (coordinator's end, worker's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _frames(buf: bytearray) -> tuple[list[bytes], int]:
    """The complete messages at the start of ``buf`` and how many bytes they used."""
    messages = []
    pos, end = 0, len(buf)
    with memoryview(buf) as view:  # (released before the caller resizes ``buf``)
        while end - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(view, pos)
            stop = pos + HEADER.size + size
            if stop > end:
                break
            messages.append(bytes(view[pos + HEADER.size : stop]))  # one copy, not two
            pos = stop
    return messages, pos


_local = threading.local()


def _scratch() -> memoryview:
    """This thread's read buffer: ``recv(READ_SIZE)`` allocated (and the allocator
    mapped, shrank and unmapped) 256 KiB per read, three system calls per message."""
    try:
        return _local.scratch  # type: ignore[no-any-return]
    except AttributeError:
        _local.scratch = memoryview(bytearray(READ_SIZE))
        return _local.scratch  # type: ignore[no-any-return]


class CoordinatorEnd:
    """The coordinator's end of one worker's socket, registered with the event loop.

    ``on_message(payload)`` is called for each complete message, in order;
    ``on_closed()`` once, after the last message, when the worker's end is gone;
    ``on_failed(exc)`` when a send fails while the worker may still be there (the
    message is lost: the worker must go, or it would wait for it forever).
    """

    __slots__ = (
        "_in",
        "_out",
        "closed",
        "fd",
        "loop",
        "on_closed",
        "on_failed",
        "on_message",
        "poller",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[bytes], None],
        on_closed: Callable[[], None],
        on_failed: Callable[[OSError], None],
        poller: Poller | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.on_message = on_message
        self.on_closed = on_closed
        self.on_failed = on_failed
        self.closed = False
        self._in = bytearray()
        self._out = bytearray()
        self.poller = poller
        if poller is None:
            loop.add_reader(self.fd, self.drain)
        else:
            poller.add(self.fd, self.drain)

    def send(self, payload: bytes) -> None:
        if self.closed:
            return
        frame = HEADER.pack(len(payload)) + payload
        if self._out:  # still flushing earlier messages: keep the order
            self._out += frame
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except _GONE:
            return  # the worker is gone; the reader sees EOF and reports it
        except OSError as exc:
            self.on_failed(exc)
            return
        if sent < len(frame):
            self._out += frame[sent:]
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        except _GONE:
            sent = len(self._out)  # the worker is gone; drop what it will never read
        except OSError as exc:
            sent = len(self._out)
            self.on_failed(exc)
        del self._out[:sent]
        if not self._out:
            self.loop.remove_writer(self.fd)

    def drain(self) -> None:
        """Read what has arrived; deliver complete messages; report EOF after them."""
        if self.closed:
            return
        eof = False
        scratch = _scratch()
        while True:
            try:
                n = self.sock.recv_into(scratch)
            except BlockingIOError:
                break
            except OSError:
                n = 0
            if not n:
                eof = True
                break
            self._in += scratch[:n]
            if n < READ_SIZE:
                break  # (level-triggered: whatever is left wakes the loop again)
        messages, used = _frames(self._in)
        if used:
            del self._in[:used]
        for message in messages:
            if not self.is_open():  # a callback may close the link (a fatal error)
                return
            self.on_message(message)
        if eof and self.is_open():
            on_closed = self.on_closed  # (`close` lets go of the callbacks)
            self.close()
            on_closed()

    def is_open(self) -> bool:
        return not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.poller is None:
            self.loop.remove_reader(self.fd)
        else:
            self.poller.remove(self.fd)
        if self._out:
            self.loop.remove_writer(self.fd)
        # Before the close, whoever closes it (an EOF does too): once closed, the number
        # may be reused at once, and a forked worker would close the new holder's copy.
        _fds.unregister(self.fd)
        self.sock.close()
        # The callbacks refer to the worker, which refers to this end: a cycle that
        # only the cyclic collector would free, long after the worker is gone.
        self.on_message = _ignore
        self.on_closed = self.on_failed = _ignore


class Poller:
    """Read readiness of many `CoordinatorEnd` sockets, as one fd of the event loop.

    Two modes. Woken: the loop watches the epoll set's fd, and when it becomes ready,
    every ready socket is drained at once. Polling: after a wake-up for which
    ``delay()`` (the pool's choice) is positive, the loop stops watching, and the set
    is polled every ``delay()`` seconds on a timer instead, as long as each poll finds
    something; a poll that finds nothing goes back to waiting to be woken. So a busy
    pool costs the coordinator one wake-up per ``delay()`` however many results arrive
    meanwhile, and an idle one none; a result waits at most ``delay()`` longer.

    ``guard(fn)`` runs each of the poller's own loop callbacks (the pool's: a failure
    ends the run instead of being logged by the loop).
    """

    __slots__ = ("_callbacks", "_epoll", "_timer", "closed", "delay", "guard", "loop", "woken")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        delay: Callable[[], float],
        guard: Callable[[Callable[[], None]], None],
    ) -> None:
        self.loop = loop
        self.delay = delay
        self.guard = guard
        self._epoll = select.epoll()
        _fds.register(self._epoll.fileno())  # forked workers have no use for it
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.woken = True  # waiting to be woken (else polling on the timer)
        loop.add_reader(self._epoll.fileno(), guard, self._wake)

    def __repr__(self) -> str:
        mode = "closed" if self.closed else "woken" if self.woken else "polling"
        return f"<Poller {len(self._callbacks)} fds {mode}>"

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (until `remove`)."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None and not self.closed:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def _poll(self) -> bool:
        """Run the callbacks of the fds that are readable now; False if there were none."""
        ready = self._epoll.poll(0)
        get = self._callbacks.get
        for fd, _ in ready:
            callback = get(fd)
            if callback is not None:  # (an earlier one may have closed it)
                callback()
        return bool(ready)

    def _wake(self) -> None:
        self._poll()
        delay = self.delay()
        if delay > 0 and not self.closed:
            self.woken = False
            self.loop.remove_reader(self._epoll.fileno())
            self._timer = self.loop.call_later(delay, self.guard, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        found = self._poll()
        delay = self.delay()
        if found and delay > 0 and not self.closed:
            self._timer = self.loop.call_later(delay, self.guard, self._tick)
        elif not self.closed:
            self.woken = True
            self.loop.add_reader(self._epoll.fileno(), self.guard, self._wake)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.woken:
            self.loop.remove_reader(self._epoll.fileno())
        _fds.unregister(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()


class WorkerEnd:
    """The worker's end: blocking reads of whole messages, blocking writes (from any
    thread: the log relay sends from whichever thread logs, see `jorbmp._log_relay`)."""

    __slots__ = ("_in", "_sending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._in = bytearray()
        self._sending = threading.Lock()  # one message at a time on the stream

    def recv(self) -> bytes | None:
        """The next message, or None when the coordinator's end is closed."""
        buf = self._in
        while True:
            if len(buf) >= HEADER.size:
                (size,) = HEADER.unpack_from(buf, 0)
                stop = HEADER.size + size
                if len(buf) >= stop:
                    message = bytes(buf[HEADER.size : stop])
                    del buf[:stop]
                    return message
            scratch = _scratch()
            try:
                n = self.sock.recv_into(scratch)
            except OSError:
                return None
            if not n:
                return None
            buf += scratch[:n]

    def send(self, payload: bytes) -> None:
        size = len(payload)
        if size > MAX_PAYLOAD:
            raise ValueError(f"message of {size} bytes, over the limit of {MAX_PAYLOAD}")
        with self._sending:
            if size < _COPY_BELOW:
                self.sock.sendall(HEADER.pack(size) + payload)
            else:  # no copy of a big payload just to put a header in front
                self.sock.sendall(HEADER.pack(size))
                self.sock.sendall(payload)
