"""The coordinator's handle on one worker process of a `jorbmp._pool.ProcessPool`.

`Worker` starts the process (what runs in it is `jorbmp._worker`), holds what the
pool has sent it and not heard back about, and kills, detaches and reaps it. Which
job a dead worker is charged with is `jorbmp._pool_deaths`'s business; when workers
start, `jorbmp._pool_spawner`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any

from . import _fds
from ._comms import CoordinatorEnd, socket_pair
from ._protocol import SLOT_SIZE, WorkerSpec
from ._worker import worker_main
from .run import Job

__all__ = ["KillMark", "Worker"]

# (batch, index, start time) of the exec a timeout killed a worker in, or
# `jorbmp._pool_deaths.NO_BLAME` for a kill that blames nobody.
KillMark = tuple[float, float, float]


class Worker:
    """One worker process, its socket and shared status slot, and its work in flight."""

    __slots__ = (
        "batches",
        "completed",
        "exit_timer",
        "kill_mark",
        "kill_reason",
        "link",
        "pid",
        "process",
        "ready",
        "recycling",
        "reported",
        "retired",
        "rss_probe",
        "sent",
        "since",
        "slot",
    )

    def __init__(self, process: multiprocessing.process.BaseProcess, slot: Any) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.slot = slot
        self.link: CoordinatorEnd
        self.batches: deque[list[Job[Any]]] = deque()  # sent, results not all back yet
        self.reported = 0  # jobs of the first batch whose results are back
        self.completed = 0  # batches whose results are all back (the next one's number)
        self.ready = False
        self.retired = False  # let go while idle (`Exits.retire`): its exit is no death
        # Recycled (`jorbmp._pool_recycle`): it takes no more work and is let go once
        # what it holds is back; ``sent`` counts the jobs it was sent; ``rss_probe`` is
        # its psutil handle, once its RSS is read.
        self.recycling = False
        self.sent = 0
        self.rss_probe: Any = None
        self.kill_reason: str | None = None
        self.kill_mark: KillMark | None = None  # set when the pool kills it on purpose
        self.exit_timer: asyncio.TimerHandle | None = None
        # Monotonic time since which this worker's slot has been busy with work whose
        # time no result has accounted for yet: set when it gets work while idle and
        # at each result message. A job charged with its death is charged that time
        # (the slot-seconds the exec held, as async states count a timeout's).
        self.since = 0.0

    def __repr__(self) -> str:
        return (
            f"<Worker pid={self.pid} ready={self.ready} batches={len(self.batches)} "
            f"killing={self.kill_mark is not None}>"
        )

    @classmethod
    def start(cls, ctx: BaseContext, spec: WorkerSpec, name: str) -> tuple[Worker, socket.socket]:
        """Start a worker process for ``spec``; returns its handle (``link`` not set
        yet) and the coordinator's end of its socket, registered with `_fds`."""
        parent, child = socket_pair()
        slot = ctx.RawArray("d", SLOT_SIZE)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=worker_main, args=(child, spec, slot), name=name
        )
        _fds.register(parent.fileno())  # before start: a forked child must not keep it
        try:
            process.start()
        except Exception as exc:
            _fds.unregister(parent.fileno())
            parent.close()
            child.close()
            raise RuntimeError(
                f"state {spec.state!r}: cannot start a worker process "
                f"({type(exc).__name__}: {exc}); under the 'spawn' and 'forkserver' start "
                "methods the app and overall contexts must be picklable (or pass "
                "ac_factory= to build the app context in each worker)"
            ) from exc
        child.close()  # the worker holds the only other end: EOF means it is gone
        with contextlib.suppress(OSError):
            # The worker does the same: whichever comes first, a kill of its group
            # from here on reaches what its exec starts.
            os.setpgid(process.pid, process.pid)
        return cls(process, slot), parent

    def takes_work(self) -> bool:
        """Ready, not being killed (a timeout's kill may not have landed yet), not being
        recycled and not gone."""
        return self.ready and self.kill_mark is None and not self.recycling and not self.link.closed

    def kill(self) -> None:
        """SIGKILL the worker and its process group (what its exec started)."""
        if self.pid:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()  # not yet a group leader (or not on this OS)

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop watching the worker and close its socket (EOF: an idle worker exits)."""
        if self.exit_timer is not None:
            self.exit_timer.cancel()
            self.exit_timer = None
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.process.sentinel)
        self.link.close()  # (which unregisters its fd from `_fds` first)

    def reap(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for the process to exit, kill it if it has not,
        and reap it: its fds close now, not whenever the garbage collector gets to
        them."""
        self.process.join(wait)
        if self.process.exitcode is None:
            self.kill()
            self.process.join()
