"""Coordinator file descriptors that must not survive into forked children.

Under the ``fork`` start method a new worker inherits every descriptor the
coordinator holds: the coordinator's ends of the other workers' pipes, and the
checkpoint lock. A worker holding a sibling's pipe end keeps that sibling from ever
seeing EOF (so it cannot notice that the coordinator died), and one holding the
lock keeps a crashed run locked. Descriptors registered here are closed in every
forked child, before any other code runs there.
"""

from __future__ import annotations

import contextlib
import os

_registered: set[int] = set()


def register(fd: int) -> None:
    _registered.add(fd)


def unregister(fd: int) -> None:
    _registered.discard(fd)


def _close_in_child() -> None:
    for fd in _registered:
        with contextlib.suppress(OSError):
            os.close(fd)
    _registered.clear()


os.register_at_fork(after_in_child=_close_in_child)
