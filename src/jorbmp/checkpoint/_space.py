"""Telling a write that failed for lack of space from any other failure.

A full disk (or quota) is the one write failure that may go away by itself, so the
processor waits for it (`jorbmp._checkpoint_guard`) instead of failing the run. Every
format turns such a failure into a `CheckpointSpaceError` naming the file, through
`space_error`, and leaves the file as its last complete write left it.
"""

from __future__ import annotations

import errno
import os
import sqlite3

from ..errors import CheckpointSpaceError

__all__ = ["is_space_error", "space_error"]

# errno values that mean "no room for this": the file system is full, or this user's
# quota is. (EFBIG, a file bigger than the file system allows, does not go away by
# waiting.)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXT = "database or disk is full"
_SQLITE_FULL = 13  # SQLite's primary result code (the low byte of an extended one)
# What SQLite says when it cannot give its -shm file (memory-mapped) another page: it
# writes a byte into each new page first, so that a full disk is an error rather
# than a SIGBUS, and that write is what fails.
SQLITE_IOERR_SHMSIZE = 4874


def is_space_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a write failing for lack of space or quota: an ``OSError`` with
    ENOSPC or EDQUOT, SQLite's SQLITE_FULL (which SQLite returns for both), or its
    SQLITE_IOERR_SHMSIZE (no page for the -shm file: a full disk, in practice)."""
    if isinstance(exc, CheckpointSpaceError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF == _SQLITE_FULL or code == SQLITE_IOERR_SHMSIZE
        return _FULL_TEXT in str(exc)
    return False


def describe(exc: BaseException) -> str:
    """The cause, for a message: ``No space left on device (ENOSPC)``, or SQLite's text."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{os.strerror(exc.errno)} ({name})"
    if isinstance(exc, sqlite3.Error):
        sqlite_name = getattr(exc, "sqlite_errorname", None)
        if getattr(exc, "sqlite_errorcode", None) == SQLITE_IOERR_SHMSIZE:
            return f"SQLite cannot grow its -shm file ({sqlite_name}): the disk is full"
        return f"SQLite: {exc} ({sqlite_name})" if sqlite_name else f"SQLite: {exc}"
    return f"{type(exc).__name__}: {exc}"


def space_error(path: object, exc: BaseException) -> CheckpointSpaceError:
    """The `CheckpointSpaceError` for a write of the checkpoint at ``path`` that failed
    with ``exc`` (`is_space_error`)."""
    if isinstance(exc, CheckpointSpaceError):
        return exc
    error = CheckpointSpaceError(f"{path}: cannot write the checkpoint: {describe(exc)}", path, exc)
    error.__cause__ = exc
    return error
