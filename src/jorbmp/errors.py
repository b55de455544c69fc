"""Exceptions a user can catch or raise."""

from __future__ import annotations

import decimal
import math
import numbers

__all__ = ["CheckpointError", "CheckpointSpaceError", "RateLimitError", "Stopped"]


class CheckpointError(Exception):
    """A checkpoint cannot be read, does not fit the run's types, or is in use elsewhere.

    The message names the file and the reason. A checkpoint that raised this is never
    overwritten by jorbmp.
    """


class CheckpointSpaceError(CheckpointError):
    """A checkpoint write failed for lack of space or quota (ENOSPC, EDQUOT, SQLite's
    "database or disk is full"). ``path`` is the checkpoint, ``cause`` the error the
    write met; the file still holds the last checkpoint written before it.

    While a processor executes a run, such a failure pauses dispatch until the write
    succeeds again, for at most ``checkpoint_patience`` seconds; then ``exec`` raises it.
    """

    def __init__(self, message: str, path: object, cause: BaseException) -> None:
        super().__init__(message)
        self.path = path
        self.cause = cause

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.path, self.cause))


class RateLimitError(Exception):
    """Raised (or returned as the error) by an exec that hit a remote rate limit.

    The job is retried in the same state without counting a failed attempt, the
    state's `AIMDRateLimiter` (if any) backs off, and with ``retry_after`` (seconds,
    e.g. from an HTTP 429 ``Retry-After``) the job waits at least that long.
    """

    def __init__(self, message: str = "", retry_after: float | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = _seconds(retry_after)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep retry_after when the exception crosses a process boundary.
        return (type(self), (self.message, self.retry_after))


def _seconds(value: object) -> float | None:
    """``retry_after`` as seconds (a number, or the digits of a ``Retry-After`` header);
    ``ValueError`` for anything else, so that the exec fails with a clear error."""
    if value is None:
        return None
    seconds: float | None = None
    try:
        if isinstance(value, str):
            seconds = float(value.strip())
        elif isinstance(value, bool):
            seconds = None  # True is not a number of seconds, whatever Python says
        elif isinstance(value, (numbers.Real, decimal.Decimal)):
            seconds = float(value)
    except (ValueError, OverflowError):
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"RateLimitError: retry_after must be a finite number of seconds >= 0 "
            f"(or a string of one), got {value!r}"
        )
    return seconds


class Stopped(Exception):
    """`Processor.exec` was stopped by `Processor.stop()` before every job was terminal.

    The final checkpoint has been written; executing the run again resumes it.
    """
