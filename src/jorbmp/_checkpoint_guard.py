"""The checkpoint guard: what the processor does when the disk is full.

A checkpoint write that fails for lack of space or quota (the formats raise
`CheckpointSpaceError` for it, and leave the file as their last complete write left
it) is the one failure that may go away by itself. So instead of failing the run::

    write fails (no space) ──> paused: no new dispatches; in-flight execs finish and
         │                     their transitions stay in memory (the serializer's dirty
         │                     jobs); the status shows why; one WARNING, then one every
         │                     `WARN_EVERY_SECONDS`
         ├── retried every `interval` (the serializer's) ──> a write reaches the disk:
         │       resumed, every lane pumped again (the log says so)
         └── no write for `patience` seconds ──> give up: a graceful stop (as
                 `Processor.stop()`), then `exec` raises `CheckpointSpaceError`

The final write of a run (the end, a stop) is tried once more; when it fails too, the
file holds the last checkpoint written, which a reload resumes from (at least once for
the transitions made since, as after a crash). A run never completes while paused: its
last transitions are not on disk yet.

Everything here runs on the coordinator's loop thread; the coordinator calls `begin`,
`flush` (each housekeeping tick) and `final_flush`, and asks `paused`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from .checkpoint._space import describe
from .checkpoint.base import Serializer
from .errors import CheckpointSpaceError
from .run import Run

__all__ = ["DEFAULT_PATIENCE", "CheckpointGuard", "check_patience"]

log = logging.getLogger("jorbmp")

# Seconds a run waits for space for its checkpoint before it stops (Processor's
# ``checkpoint_patience``): long enough for an operator (or a cleanup job) to free
# some, short enough that a run on a disk that stays full does not sit idle for long.
DEFAULT_PATIENCE = 60.0
# Seconds between the WARNINGs of one episode of a full disk after the first: the log
# shows the problem goes on, without a line per retry.
WARN_EVERY_SECONDS = 15.0
# Retry period of a serializer that names none (its ``interval``).
DEFAULT_RETRY_SECONDS = 1.0
# Tries are spaced at least this many times as long as one takes on the loop thread
# (a JSON snapshot or a journal's compaction encodes the whole run: ~1 s at 1M jobs),
# so that retrying costs a big run at most ~10% of its loop while the disk is full.
RETRY_SPACING = 10.0
# How soon a wait for space for a run's final write notices a stop or a Ctrl-C.
WAIT_SLICE_SECONDS = 0.1
# The longest between tries of a run's final write.
FINAL_RETRY_SECONDS = 1.0


def check_patience(patience: object) -> float:
    """``checkpoint_patience`` as seconds: a number >= 0 (``math.inf``: wait forever);
    ``ValueError`` otherwise."""
    if (
        isinstance(patience, bool)
        or not isinstance(patience, (int, float))
        or math.isnan(patience)
        or patience < 0
    ):
        raise ValueError(
            f"Processor: checkpoint_patience must be seconds >= 0 (math.inf: wait for "
            f"space forever), got {patience!r}"
        )
    return float(patience)


class _Episode:
    """One stretch of failed writes, from the first failure to the next write that works."""

    __slots__ = ("cause", "cost", "loud", "retry_at", "since", "writes")

    def __init__(self, cause: CheckpointSpaceError, now: float, writes: int) -> None:
        self.cause = cause  # the latest failure
        self.since = now
        self.retry_at = now
        self.cost = 0.0  # the longest a try took on the loop thread
        self.loud = True  # its start was a WARNING (so is its end)
        self.writes = writes  # the serializer's `writes` when it began


class CheckpointGuard:
    """Whether the run's checkpoint can be written: pauses dispatch while writes fail
    for lack of space, retries them, resumes, or gives up after ``patience`` seconds.

    ``changed`` is called when the guard pauses or resumes (the coordinator updates the
    status and, on resuming, pumps every lane); ``give_up`` with the error to raise,
    once, when patience runs out (the coordinator stops gracefully).
    """

    __slots__ = (
        "_clock",
        "_final",
        "_warned",
        "changed",
        "episode",
        "gave_up",
        "give_up",
        "patience",
        "serializer",
    )

    def __init__(
        self,
        serializer: Serializer,
        patience: float,
        changed: Callable[[], None],
        give_up: Callable[[CheckpointSpaceError], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.serializer = serializer
        self.patience = patience
        self.changed = changed
        self.give_up = give_up
        self._clock = clock
        self.episode: _Episode | None = None  # while writes fail
        self._warned = -math.inf  # when the latest WARNING was logged
        self._final = False  # waiting for space for the run's final write
        self.gave_up: CheckpointSpaceError | None = None

    def __repr__(self) -> str:
        episode = self.episode
        if episode is None:
            return "<CheckpointGuard ok>"
        return f"<CheckpointGuard paused {self._clock() - episode.since:.1f}s: {episode.cause}>"

    @property
    def paused(self) -> bool:
        """Whether dispatch waits for the checkpoint to be written."""
        return self.episode is not None

    def status(self) -> str:
        """What the status shows while paused (the file and the cause); "" otherwise."""
        episode = self.episode
        if episode is None:
            return ""
        waited = self._clock() - episode.since
        return f"paused {waited:.0f}s: {episode.cause}"

    def _retry_seconds(self) -> float:
        """The serializer's ``interval``; at most `FINAL_RETRY_SECONDS` for a run's final
        write (`wait_final`): nothing runs meanwhile, an interval of a slow format
        would only make the wait longer than the space takes to come back."""
        interval = getattr(self.serializer, "interval", DEFAULT_RETRY_SECONDS)
        if not isinstance(interval, (int, float)):
            interval = DEFAULT_RETRY_SECONDS
        return min(interval, FINAL_RETRY_SECONDS) if self._final else interval

    # -- the coordinator's calls --------------------------------------------------

    def begin(self, run: Run[Any, Any]) -> None:
        """The serializer's `begin`; a first write that does not fit pauses dispatch
        from the start (the serializer keeps its lock and writes at a later flush)."""
        started = self._clock()
        try:
            self.serializer.begin(run)
        except CheckpointSpaceError as exc:
            self._failed(exc, self._clock() - started)

    def flush(self, run: Run[Any, Any]) -> None:
        """The housekeeping tick's flush: as the serializer's, but while writes fail,
        retried every ``interval`` only, and a failure for space pauses (see the module
        docstring) instead of raising."""
        episode = self.episode
        if episode is not None:
            if self.serializer.writes > episode.writes:
                self._recovered()  # a write of the serializer's writer thread made it
                episode = None
            elif self._clock() < episode.retry_at:
                return
        started = self._clock()
        try:
            self.serializer.flush(run)
        except CheckpointSpaceError as exc:
            self._failed(exc, self._clock() - started)
            return
        if episode is not None:
            # What a try costs the loop (encoding the run, say), also one that hands
            # its write to a writer thread.
            episode.cost = max(episode.cost, self._clock() - started)
            if self.serializer.writes > episode.writes:
                self._recovered()

    def final_flush(self, run: Run[Any, Any], wait: bool = False) -> CheckpointSpaceError | None:
        """The run's final write. Raises `CheckpointSpaceError` (saying what the file
        holds) when it does not fit, and after giving up even when it did; with
        ``wait`` (a run that completed), returns the failure instead, for `wait_final`."""
        try:
            self.serializer.flush(run, final=True)
        except CheckpointSpaceError as exc:
            if wait and self.gave_up is None:
                return exc
            raise self._final_error(exc) from exc.cause
        if self.gave_up is not None:
            raise CheckpointSpaceError(
                f"{self.gave_up}; space came back as the run stopped, and its final "
                "checkpoint was written: executing the run again resumes it",
                self.gave_up.path,
                self.gave_up.cause,
            ) from self.gave_up.cause
        return None

    async def wait_final(
        self, run: Run[Any, Any], failure: CheckpointSpaceError, stop: Callable[[], bool]
    ) -> None:
        """The final write of a complete run did not fit (`final_flush`): retry it as
        `flush` retries, until it fits, patience runs out or ``stop()`` (a stop, Ctrl-C),
        which raise as `final_flush` does. The run's workers are gone by then: this
        only waits, awaiting, so that the loop goes on (signals, an application's tasks)."""
        self._final = True
        self._failed(failure, 0.0)
        while True:
            episode = self.episode
            assert episode is not None
            while self._clock() < episode.retry_at and not (stop() or self.gave_up):
                await asyncio.sleep(min(WAIT_SLICE_SECONDS, episode.retry_at - self._clock()))
            if stop() or self.gave_up is not None:
                raise self._final_error(failure) from failure.cause
            started = self._clock()
            try:
                self.serializer.flush(run, final=True)
            except CheckpointSpaceError as exc:
                failure = exc
                self._failed(exc, self._clock() - started)
                continue
            self._recovered()
            return

    # -- episodes -----------------------------------------------------------------

    def _failed(self, exc: CheckpointSpaceError, cost: float) -> None:
        """A write failed for lack of space; ``cost``: the seconds its try took."""
        now = self._clock()
        episode = self.episode
        if episode is None:
            episode = self.episode = _Episode(exc, now, self.serializer.writes)
            # Episodes close together (a disk at the edge of full) make one WARNING
            # every `WARN_EVERY_SECONDS`; the others are INFO.
            loud = episode.loud = now - self._warned >= WARN_EVERY_SECONDS
            if loud:
                self._warned = now
            log.log(
                logging.WARNING if loud else logging.INFO,
                "%s; dispatch paused until the checkpoint can be written (retrying every "
                "%gs, stopping after %gs)",
                exc, self._retry_seconds(), self.patience,
            )  # fmt: skip
            self.changed()
        elif now - self._warned >= WARN_EVERY_SECONDS:
            self._warned = now
            log.warning(
                "%s: still cannot write the checkpoint after %.0fs (%s); dispatch paused",
                exc.path, now - episode.since, describe(exc.cause),
            )  # fmt: skip
        episode.cause = exc
        episode.cost = max(episode.cost, cost)
        deadline = episode.since + self.patience
        # Retried every interval, and once more at the deadline.
        spacing = max(self._retry_seconds(), RETRY_SPACING * episode.cost)
        episode.retry_at = now + min(spacing, max(0.0, deadline - now))
        if now >= deadline and self.gave_up is None:
            self.gave_up = CheckpointSpaceError(
                f"{exc.path}: cannot write the checkpoint for {now - episode.since:.1f}s "
                f"(checkpoint_patience={self.patience:g}): {describe(exc.cause)}; the run "
                "stopped",
                exc.path,
                exc.cause,
            )
            log.error("%s; stopping gracefully", self.gave_up)
            self.give_up(self.gave_up)

    def _recovered(self) -> None:
        episode, self.episode = self.episode, None
        assert episode is not None
        log.log(
            logging.WARNING if episode.loud else logging.INFO,
            "%s: the checkpoint was written again after %.1fs without space; dispatch resumed",
            self.serializer.path, self._clock() - episode.since,
        )  # fmt: skip
        self.changed()

    def _final_error(self, exc: CheckpointSpaceError) -> CheckpointSpaceError:
        """The error for a final write that did not fit."""
        if self.gave_up is not None:
            head = str(self.gave_up)
        else:
            head = f"{exc.path}: cannot write the final checkpoint ({describe(exc.cause)})"
        if _saved(exc.path):
            tail = (
                "the file holds the last checkpoint written before that: load it with "
                "deserialize() and execute the run again once there is space (what was "
                "done since runs again)"
            )
        else:
            tail = (
                "nothing was saved: no checkpoint of this run was ever written (there is "
                "no file), so executing the run again starts it over (what its jobs did "
                "is lost)"
            )
        return CheckpointSpaceError(f"{head}; {tail}", exc.path, exc.cause)


def _saved(path: object) -> bool:
    """Whether a checkpoint file is at ``path``: one of 0 bytes is none (as for
    `Serializer.deserialize`), and a format's first write appears whole or not at all."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        return os.stat(path).st_size > 0
    except (OSError, ValueError):
        return False
