"""When a `jorbmp._pool.ProcessPool` starts workers (`Spawner`): as its queue needs
them, a slice of forking at a time, replacements for the dead, and when to give up.

- One worker at the start, whatever the queue: a state whose workers cannot start (an
  ac_factory that fails, an import error under spawn) is found at the start of the
  run, not when its first job arrives.
- Then one per job waiting beyond those the starting workers will take, up to
  ``concurrency`` (`Spawner.demand`): 10 jobs never fork 256 workers. They start a
  few milliseconds of forking at a time (`SPAWN_SLICE_SECONDS`), so that the workers
  already ready get their work meanwhile.
- A dead worker is replaced at once, unless deaths in a row got no job anywhere (none
  finished, none was charged): replacements then wait longer and longer, and past
  `MAX_BARREN_DEATHS` the run ends, as it does after `MAX_STARTUP_FAILURES` workers
  in a row died before they were ready.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sized

from ._backends import Sink

__all__ = [
    "MAX_BARREN_DEATHS",
    "MAX_RESPAWN_DELAY",
    "MAX_STARTUP_FAILURES",
    "RESPAWN_DELAY",
    "SPAWN_SLICE_SECONDS",
    "Spawner",
]

# Longest the coordinator forks workers in one go (at least one each time) before it
# lets the event loop run: forking 256 workers takes a second or more, and the workers
# already started get their work and send their results back meanwhile. Longer slices
# fork a little faster; shorter ones answer ready workers sooner.
SPAWN_SLICE_SECONDS = 0.005
# Workers that die before they are ready, in a row, before the run gives up: a worker
# that cannot start (bad ac_factory, import error under spawn) would otherwise be
# replaced forever.
MAX_STARTUP_FAILURES = 3
# Worker deaths in a row in which no job got anywhere (none finished, none was
# charged) before the run gives up: workers that die while idle, or whose messages
# cannot be sent, would otherwise be replaced forever. Replacements after the
# first such deaths wait `RESPAWN_DELAY` * 2**n, at most `MAX_RESPAWN_DELAY`.
MAX_BARREN_DEATHS = 8
RESPAWN_DELAY = 0.01
MAX_RESPAWN_DELAY = 1.0


class Spawner:
    """Decides when one pool starts its workers; ``launch`` starts one (numbered from
    1), ``workers`` holds the pool's live ones, ``guard`` runs the spawner's loop
    callbacks (ending the run on an exception).

    The pool tells it about each worker: `ready` when it reported ready, `lost` when
    it is gone, then `replace` with how its death was settled, and sets ``progress``
    at each result.
    """

    __slots__ = (
        "barren_deaths",
        "closed",
        "concurrency",
        "guard",
        "handle",
        "launch",
        "loop",
        "outgoing",
        "progress",
        "respawns",
        "sink",
        "spawned",
        "startup_failures",
        "state",
        "to_spawn",
        "unready",
        "workers",
    )

    def __init__(
        self,
        state: str,
        concurrency: int,
        sink: Sink,
        workers: Sized,
        launch: Callable[[int], None],
        guard: Callable[..., None],
    ) -> None:
        self.state = state
        self.concurrency = concurrency
        self.sink = sink
        self.workers = workers
        self.launch = launch
        self.guard = guard
        self.loop: asyncio.AbstractEventLoop
        self.closed = False
        self.spawned = 0  # workers launched so far
        # How many workers are wanted and not started yet, how many started and not
        # ready yet, and the callback that starts the next slice of them.
        self.to_spawn = 0
        self.unready = 0
        self.handle: asyncio.Handle | None = None
        # Replacements waiting out their delay (`replace`): counted as workers, so that
        # the queue's demand neither starts one in their place nor exceeds concurrency.
        self.respawns = 0
        # Workers among ``workers`` being recycled (`jorbmp._pool_recycle`): they take
        # no more work, so they do not count against concurrency, and their
        # replacements start while they finish what they hold.
        self.outgoing = 0
        self.startup_failures = 0
        self.barren_deaths = 0  # deaths in a row with no job getting anywhere
        self.progress = False  # a result arrived since the last death

    def __repr__(self) -> str:
        return (
            f"<Spawner {self.state!r} spawned={self.spawned} to_spawn={self.to_spawn} "
            f"unready={self.unready} respawns={self.respawns} barren={self.barren_deaths}>"
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the first worker; the first pump says how many more the queue needs."""
        self.loop = loop
        self._spawn()

    def demand(self, waiting: int) -> None:
        """``waiting`` jobs are queued beyond the free slots: start a worker for each
        one that the workers starting will not take, up to ``concurrency``."""
        have = len(self.workers) - self.outgoing + self.to_spawn + self.respawns
        if have >= self.concurrency or self.closed:
            return
        want = min(self.concurrency - have, waiting - self.unready - self.to_spawn)
        if want <= 0:
            return
        self.to_spawn += want
        if self.handle is None:
            self.handle = self.loop.call_soon(self.guard, self._spawn_some)

    def ready(self) -> None:
        """A worker reported ready."""
        self.unready -= 1
        self.startup_failures = 0

    def lost(self, ready: bool) -> None:
        """A worker is gone (``ready``: it had reported ready)."""
        if not ready:
            self.unready -= 1

    def replace(self, ready: bool, charged: bool, reason: str) -> None:
        """A worker died of ``reason`` (its death settled; ``charged``: a job was charged
        with it): replace it, now or after a delay, or end the run if workers keep
        dying for nothing."""
        if not ready:
            self.startup_failures += 1
            if self.startup_failures >= MAX_STARTUP_FAILURES:
                self.sink.fatal(
                    RuntimeError(
                        f"state {self.state!r}: {self.startup_failures} worker processes "
                        f"in a row died while starting ({reason})"
                    )
                )
                return
        if charged or self.progress:
            self.barren_deaths = 0
        else:
            self.barren_deaths += 1
        self.progress = False
        if self.barren_deaths >= MAX_BARREN_DEATHS:
            self.sink.fatal(
                RuntimeError(
                    f"state {self.state!r}: {self.barren_deaths} worker processes in a "
                    f"row died without finishing or failing a job (the last: {reason})"
                )
            )
            return
        if self.sink.halting():
            return  # no replacement while stopping: nothing new is dispatched
        n = self.barren_deaths
        if n < 2:
            self._spawn()
            return
        delay = min(MAX_RESPAWN_DELAY, RESPAWN_DELAY * 2**n)
        self.respawns += 1
        self.loop.call_later(delay, self.guard, self._spawn_later)

    def close(self) -> None:
        """Start no more workers."""
        self.closed = True
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.to_spawn = 0

    def _spawn(self) -> None:
        self.spawned += 1
        self.launch(self.spawned)
        self.unready += 1

    def _spawn_some(self) -> None:
        """Start wanted workers for at most `SPAWN_SLICE_SECONDS`, then let the loop
        run (results, dispatch to the workers that are ready) before the next slice."""
        self.handle = None
        if self.closed or self.sink.halting():
            self.to_spawn = 0
            return
        deadline = time.monotonic() + SPAWN_SLICE_SECONDS
        while self.to_spawn:
            self.to_spawn -= 1
            self._spawn()
            if time.monotonic() >= deadline:
                break
        if self.to_spawn:
            self.handle = self.loop.call_soon(self.guard, self._spawn_some)

    def _spawn_later(self) -> None:
        self.respawns -= 1
        # (Never beyond concurrency, whatever started meanwhile.)
        full = len(self.workers) - self.outgoing + self.to_spawn >= self.concurrency
        if not full and not self.closed and not self.sink.halting():
            self._spawn()
