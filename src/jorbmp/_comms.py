"""Framed messages over a socketpair between the coordinator and one worker process.

A message is a 4-byte big-endian length followed by the payload. The coordinator's
end (`CoordinatorEnd`) is non-blocking and driven by its event loop: a write the
socket cannot take now is buffered and flushed when it drains, so the coordinator
never waits on a busy worker, and one ``recv`` picks up every message that has
arrived. The worker's end (`WorkerEnd`) is blocking and simple.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

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
    while end - pos >= HEADER.size:
        (size,) = HEADER.unpack_from(buf, pos)
        stop = pos + HEADER.size + size
        if stop > end:
            break
        messages.append(bytes(buf[pos + HEADER.size : stop]))
        pos = stop
    return messages, pos


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
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[bytes], None],
        on_closed: Callable[[], None],
        on_failed: Callable[[OSError], None],
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
        loop.add_reader(self.fd, self.drain)

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
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            self._in += data
            if len(data) < READ_SIZE:
                break
        messages, used = _frames(self._in)
        if used:
            del self._in[:used]
        for message in messages:
            if not self.is_open():  # a callback may close the link (a fatal error)
                return
            self.on_message(message)
        if eof and self.is_open():
            self.close()
            self.on_closed()

    def is_open(self) -> bool:
        return not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        if self._out:
            self.loop.remove_writer(self.fd)
        self.sock.close()
        # The callbacks refer to the worker, which refers to this end: a cycle that
        # only the cyclic collector would free, long after the worker is gone.
        self.on_message = _ignore
        self.on_closed = self.on_failed = _ignore


class WorkerEnd:
    """The worker's end: blocking reads of whole messages, blocking writes."""

    __slots__ = ("_in", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._in = bytearray()

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
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError:
                return None
            if not data:
                return None
            buf += data

    def send(self, payload: bytes) -> None:
        size = len(payload)
        if size > MAX_PAYLOAD:
            raise ValueError(f"message of {size} bytes, over the limit of {MAX_PAYLOAD}")
        if size < _COPY_BELOW:
            self.sock.sendall(HEADER.pack(size) + payload)
        else:  # no copy of a big payload just to put a header in front
            self.sock.sendall(HEADER.pack(size))
            self.sock.sendall(payload)
