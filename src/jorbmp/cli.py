"""``python -m jorbmp status|redrive|report``: inspect and patch checkpoints from the shell.

The commands read checkpoints without the user's Python types (contexts decode as
plain JSON-like data), so they work on any run, and loading one never runs code.
``status``, ``report`` and ``redrive --dry-run`` only read the checkpoint (``report
--html`` writes only its page): they need no write access to the file,
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

from ._job_select import listing_data, listing_lines, matching_jobs, read_ids, seen_states
from ._job_view import show_job
from .checkpoint import open_checkpoint
from .checkpoint.base import CheckpointLock
from .errorgroups import ErrorGroup, jobs_text, text_lines
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
    print(f"run {summary['name']!r} in {_clean(path)}: {jobs_text(summary['jobs'])}")
    states = {_clean(state): n for state, n in summary["states"].items()}
    width = max((len(s) for s in states), default=5)
    for state, n in states.items():
        print(f"  {state.ljust(width)}  {n}")
    if summary["errors"]:
        groups = msgspec.convert(summary["errors"], list[ErrorGroup])
        print("\n".join(text_lines(groups, summary["error_kinds"], _clean)))
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
    if args.job is not None:  # one job, with its last traceback (`jorbmp._job_view`)
        return show_job(open_checkpoint(path), _text_arg(args.job), args.json)
    if args.state is not None:  # the jobs in one state (`jorbmp._job_select`)
        contains = None if args.error_contains is None else _text_arg(args.error_contains)
        return _list_jobs(path, _text_arg(args.state), contains, args.json)
    if args.error_contains is not None:
        raise _Refused("--error-contains lists jobs of one state: give --state STATE too")
    summary = msgspec.to_builtins(open_checkpoint(path).overview())
    if args.json:
        # ASCII only, and no NaN: valid JSON on any terminal or pipe.
        print(json.dumps(_finite(summary), indent=1, ensure_ascii=True, allow_nan=False))
    else:
        _print_summary(path, summary)
    return OK


def _list_jobs(path: Path, state: str, contains: str | None, as_json: bool) -> int:
    """``status --state``: the matching jobs, with their retries and last error."""
    run = open_checkpoint(path).deserialize()
    jobs = matching_jobs(run, state, contains)
    if as_json:
        data = _finite(listing_data(jobs, state, contains))
        print(json.dumps(data, indent=1, ensure_ascii=True, allow_nan=False))
    else:
        present = {job.state for job in run.jobs.values()}
        print("\n".join(_clean(line) for line in listing_lines(jobs, state, contains, present)))
    return OK


def cmd_redrive(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    from_state = None if args.from_state is None else _text_arg(args.from_state)
    to_state = _text_arg(args.to_state)
    contains = None if args.error_contains is None else _text_arg(args.error_contains)
    ids: list[str] | None = None
    if args.job or args.jobs_from:
        try:
            ids = read_ids([_text_arg(i) for i in args.job or []], args.jobs_from or [])
        except ValueError as exc:
            raise _Refused(str(exc)) from None
        if not ids:
            raise _Refused("--jobs-from: the files hold no job ids; nothing to move")
    elif from_state is None:
        raise _Refused("say which jobs to move: --from STATE, or --job ID / --jobs-from FILE")
    if from_state == to_state:
        raise _Refused(f"--from and --to are the same state ({from_state!r}): nothing to move")
    _check_file(path)
    serializer = open_checkpoint(path)

    def move(run: Any) -> list[str]:
        _check_redrive(path, run, from_state, to_state, ids, args.force)
        return run.redrive(from_state, to_state, contains, ids)  # type: ignore[no-any-return]

    if args.dry_run:
        # A read, as `status` is: no lock taken, nothing created or written.
        run = serializer.deserialize()
        moved = move(run)
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
            moved = move(run)
            if moved:
                serializer.serialize(run)
    verb = "would move" if args.dry_run else "moved"
    source = "" if from_state is None else f" from {from_state!r}"
    print(f"{verb} {jobs_text(len(moved))}{source} to {to_state!r}")
    return OK


def _states_text(states: list[str]) -> str:
    """Some state names, for a message (at most `SHOW_STATES`)."""
    shown = [repr(s) for s in states[:SHOW_STATES]]
    if len(states) > SHOW_STATES:
        shown.append(f"and {len(states) - SHOW_STATES} more")
    return ", ".join(shown) or "none: it has no jobs"


def _check_redrive(
    path: Path,
    run: Any,
    from_state: str | None,
    to_state: str,
    ids: list[str] | None,
    force: bool,
) -> None:
    """Refuse a redrive that names what the run does not have, before anything moves:
    a job id; a --from state no job is in (exit code 1: nothing to move); a --to state
    the run has never seen (a typo), unless ``force``."""
    if ids is not None:
        unknown = [i for i in ids if i not in run.jobs]
        if unknown:
            raise _Refused(f"{path}: the run has no job {_states_text(unknown)}; nothing moved")
    if from_state is not None:
        present = sorted({job.state for job in run.jobs.values()})
        if from_state not in present:
            raise _Refused(
                f"{path}: no job is in state {from_state!r} (the run's states: "
                f"{_states_text(present)}); nothing moved",
                NO_SUCH_STATE,
            )
    if not force:
        seen = seen_states(run)
        if to_state not in seen:
            raise _Refused(
                f"{path}: the run has never seen a state {to_state!r} (its states: "
                f"{_states_text(sorted(seen))}); nothing moved: --force moves jobs to it "
                "anyway (a state the next processor declares)"
            )


def cmd_report(args: argparse.Namespace) -> int:
    """The report of the checkpoint's latest execution: as text, or (``--html``) as a
    page, whose error groups are those of the checkpoint as it is now."""
    path = Path(args.checkpoint)
    _check_file(path)
    overview = open_checkpoint(path).overview()
    report = _stored_report(path, overview.report)
    if args.html is None:
        print("\n".join(_clean(line) for line in str(report).splitlines()))
        return OK
    if args.html == "-":  # standard output
        sys.stdout.write(report.to_html(overview.errors))
        return OK
    target = Path(args.html)
    if target.is_dir():
        raise _Refused(f"cannot write the report: {target}: is a directory")
    with contextlib.suppress(OSError):
        # The page replaces a file by renaming over it: never a symlink (its target
        # would stay as it was, the link become a file), a pipe or a device.
        if not stat.S_ISREG(os.lstat(target).st_mode):
            raise _Refused(
                f"cannot write the report: {target}: not a regular file (a symlink, pipe "
                "or device); give a new path, or - for standard output"
            )
    with contextlib.suppress(OSError):
        if target.exists() and target.samefile(path):
            raise _Refused(f"{target}: is the checkpoint itself; give --html another path")
    page = report.to_html(overview.errors).encode("utf-8")
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # A new file beside the target, then renamed over it: a reader never sees half
        # a page, and a failure leaves what was there.
        with open(temp, "xb") as f:
            f.write(page)
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, IsADirectoryError | FileNotFoundError | NotADirectoryError):
            exc.filename = os.fspath(target)
        raise _Refused(f"cannot write the report: {_os_error(exc, args.html)}") from None
    print(f"wrote {_clean(target)} ({len(page):,} bytes)")
    return OK


def _stored_report(path: Path, stored: dict[str, Any] | None) -> RunReport:
    """The checkpoint's report; one from another version reads without its timeline
    if that is all that does not fit."""
    if stored is None:
        raise _Refused(f"{path}: no report yet: no execution of this run has ended")
    try:
        return msgspec.convert(stored, RunReport)
    except msgspec.ValidationError as exc:
        try:
            return msgspec.convert({**stored, "timeline": None}, RunReport)
        except msgspec.ValidationError:
            raise _Refused(f"{path}: a report this version cannot read ({exc})") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jorbmp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="per-state counts and the most common errors")
    status.add_argument("checkpoint")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--job", metavar="ID", help="one job, with its last traceback")
    status.add_argument("--state", metavar="STATE", help="list the jobs in this state")
    status.add_argument(
        "--error-contains", metavar="TEXT", help="with --state: only jobs with such an error"
    )
    status.set_defaults(fn=cmd_status)
    redrive = sub.add_parser("redrive", help="move jobs from one state to another")
    redrive.add_argument("checkpoint")
    redrive.add_argument("--from", dest="from_state", metavar="STATE", help="jobs in this state")
    redrive.add_argument("--to", dest="to_state", required=True, metavar="STATE")
    redrive.add_argument("--error-contains", metavar="TEXT", help="only jobs with such an error")
    redrive.add_argument("--job", action="append", metavar="ID", help="only this job (repeat)")
    redrive.add_argument(
        "--jobs-from", action="append", metavar="FILE", help="only the job ids in FILE, one a line"
    )
    redrive.add_argument("--force", action="store_true", help="also to a state never seen")
    redrive.add_argument("--dry-run", action="store_true", help="count, change nothing")
    redrive.set_defaults(fn=cmd_redrive)
    report = sub.add_parser("report", help="the report of the latest execution, with charts")
    report.add_argument("checkpoint")
    report.add_argument(
        "--html", metavar="PATH", help="write it as one self-contained page (- : to stdout)"
    )
    report.set_defaults(fn=cmd_report)
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
    except BrokenPipeError:  # `status ... | head`: the reader is gone
        with contextlib.suppress(Exception):
            # (So that the interpreter's last flush at exit has nowhere to fail.)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        _error("output cut short: the reader of the pipe has gone (broken pipe)")
        return ERROR
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
