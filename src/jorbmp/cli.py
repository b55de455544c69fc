"""``python -m jorbmp status|redrive``: inspect and patch checkpoints from the shell.

Both commands read checkpoints without the user's Python types (contexts decode as
plain JSON-like data), so they work on any run, and loading one never runs code.
``status`` and ``redrive --dry-run`` only read: they need no write access to the file,
its directory or its lock file. Every failure is one line on stderr and exit code 2
(1: ``redrive --from`` a state that no job is in).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import pwd
import re
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import msgspec

from .checkpoint import open_checkpoint
from .checkpoint.base import CheckpointLock
from .errors import CheckpointError
from .report import RunReport

# Exit codes: done; `redrive --from` a state no job is in (nothing to move); any error.
OK, NO_SUCH_STATE, ERROR = 0, 1, 2
# States named in the error about a `redrive --from` state that no job is in.
SHOW_STATES = 20


class _Refused(Exception):
    """A command that cannot go on: its message (one line) and exit code."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.code = code


# What a checkpoint from elsewhere must not send to a terminal: control characters
# (escape sequences, line breaks that fake lines), line separators and bidirectional
# overrides. They are shown escaped, as Python writes them (``\x1b``, ``\n``, ``\u202e``).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _clean(text: object) -> str:
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (null), as JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _print_summary(path: Path, summary: dict[str, Any]) -> None:
    print(f"run {summary['name']!r} in {_clean(path)}: {summary['jobs']} jobs")
    states = {_clean(state): n for state, n in summary["states"].items()}
    width = max((len(s) for s in states), default=5)
    for state, n in states.items():
        print(f"  {state.ljust(width)}  {n}")
    if summary["errors"]:
        print("most common errors:")
        for e in summary["errors"]:
            examples = ", ".join(_clean(i) for i in e["examples"])
            print(
                f"  {e['jobs']:>6} jobs  in {e['state']!r}: {_clean(e['error'])}  (e.g. {examples})"
            )
    if summary["report"] is not None:
        print("latest execution:")
        try:
            report = msgspec.convert(summary["report"], RunReport)
        except msgspec.ValidationError:
            print("  (a report this version cannot read)")
        else:
            print("\n".join(f"  {_clean(line)}" for line in str(report).splitlines()))


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"


def _read_only_media(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_file(path: Path) -> None:
    """Refuse what is not a checkpoint file before opening it: a directory, or a FIFO or
    device that a read would block on or never finish (``FileNotFoundError``,
    ``PermissionError`` as they come)."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise _Refused(f"{path}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise _Refused(f"{path}: not a regular file, so not a checkpoint")


def _check_writable(path: Path) -> None:
    """Refuse a redrive this user could not write, before anything (a lock file) is
    created: the checkpoint is replaced in its directory, beside which the lock file
    and SQLite's log live."""
    effective = os.access in os.supports_effective_ids
    for target, what in ((path, "the checkpoint"), (path.parent, "its directory")):
        if not os.access(target, os.W_OK, effective_ids=effective):
            why = (
                "read-only file system"
                if _read_only_media(target)
                else f"no write permission for {_user()}"
            )
            raise _Refused(f"{target}: cannot write {what} ({why}); nothing changed")


def _text_arg(text: str) -> str:
    """A state name or error text from the command line, as UTF-8 (checkpoints hold
    UTF-8), also where the locale is not (``LC_ALL=C`` without Python's UTF-8 mode
    gives undecodable bytes as surrogates)."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    _check_file(path)
    summary = msgspec.to_builtins(open_checkpoint(path).overview())
    if args.json:
        # ASCII only, and no NaN: valid JSON on any terminal or pipe.
        print(json.dumps(_finite(summary), indent=1, ensure_ascii=True, allow_nan=False))
    else:
        _print_summary(path, summary)
    return OK


def cmd_redrive(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    from_state, to_state = _text_arg(args.from_state), _text_arg(args.to_state)
    contains = None if args.error_contains is None else _text_arg(args.error_contains)
    if from_state == to_state:
        raise _Refused(f"--from and --to are the same state ({from_state!r}): nothing to move")
    _check_file(path)
    serializer = open_checkpoint(path)
    if args.dry_run:
        # A read, as `status` is: no lock taken, nothing created or written.
        run = serializer.deserialize()
        moved = run.redrive(from_state, to_state, contains)
        if CheckpointLock.held(serializer.path):
            print(
                f"jorbmp: note: {_clean(path)} is in use by a running processor: the count "
                "may change, and a redrive is refused until it is done",
                file=sys.stderr,
            )
    else:
        _check_writable(serializer.path)
        # Read and write under one hold of the lock (refused while a processor executes
        # this checkpoint), so that no processor starts in between.
        with serializer.locked():
            run = serializer.deserialize()
            moved = run.redrive(from_state, to_state, contains)
            if moved:
                serializer.serialize(run)
    if not moved:
        present = sorted({job.state for job in run.jobs.values()})
        if from_state not in present:
            shown = [repr(s) for s in present[:SHOW_STATES]]
            if len(present) > SHOW_STATES:
                shown.append(f"and {len(present) - SHOW_STATES} more")
            states = ", ".join(shown) or "none: it has no jobs"
            raise _Refused(
                f"{path}: no job is in state {from_state!r} (the run's states: {states}); "
                "nothing moved",
                NO_SUCH_STATE,
            )
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} {len(moved)} jobs from {from_state!r} to {to_state!r}")
    return OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jorbmp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="per-state counts and the most common errors")
    status.add_argument("checkpoint")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(fn=cmd_status)
    redrive = sub.add_parser("redrive", help="move jobs from one state to another")
    redrive.add_argument("checkpoint")
    redrive.add_argument("--from", dest="from_state", required=True, metavar="STATE")
    redrive.add_argument("--to", dest="to_state", required=True, metavar="STATE")
    redrive.add_argument("--error-contains", metavar="TEXT", help="only jobs with such an error")
    redrive.add_argument("--dry-run", action="store_true", help="count, change nothing")
    redrive.set_defaults(fn=cmd_redrive)
    return parser


def _tolerant_streams() -> None:
    """Print what the terminal's encoding cannot show escaped (``\\u2713``), not fail
    (a latin-1 or ASCII locale, ``PYTHONIOENCODING``)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(errors="backslashreplace")


def _error(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"jorbmp: {_clean(text)}", file=sys.stderr)


def _os_error(exc: OSError, path: str) -> str:
    """One line for an OSError: the file it concerns and why."""
    name = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        reason = f"permission denied for {_user()}"
    elif _read_only_media(Path(os.fsdecode(name)).parent):
        reason += " (read-only file system)"
    return f"{os.fsdecode(name)}: {reason}"


def main(argv: list[str] | None = None) -> int:
    _tolerant_streams()
    args = _parser().parse_args(argv)
    path = args.checkpoint
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # here, so that a closed pipe is handled below
        return code
    except _Refused as exc:
        _error(str(exc))
        return exc.code
    except BrokenPipeError:  # `status ... | head`: the reader is gone, say no more
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except FileNotFoundError as exc:
        where = exc.filename if exc.filename is not None else path
        why = "" if exc.strerror in (None, os.strerror(errno.ENOENT)) else f" ({exc.strerror})"
        _error(f"no checkpoint at {os.fsdecode(where)}{why}")
    except CheckpointError as exc:
        _error(str(exc))
    except OSError as exc:
        _error(_os_error(exc, path))
    except sqlite3.Error as exc:
        _error(f"{path}: SQLite: {exc}")
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        if sys.flags.dev_mode:  # python -X dev: the traceback, for a bug report
            raise
        _error(f"{path}: unexpected {type(exc).__name__}: {exc} (python -X dev shows where)")
    return ERROR
