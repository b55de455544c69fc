"""`TqdmStatusListener`: one tqdm bar per state, kept in place, closed when the run ends.

When the output is not a terminal (a log file, CI), redrawn bars would fill it with
carriage returns; the listener then writes one plain line every `PLAIN_INTERVAL`
seconds and a last one at the end instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import IO, Any

from tqdm import tqdm

from .status import StatusCount, StatusListener

__all__ = ["TqdmStatusListener"]

# Seconds between plain status lines when the output is not a terminal.
PLAIN_INTERVAL = 10.0


class _Bar(tqdm):  # type: ignore[misc]  # tqdm ships no types
    """A tqdm bar without tqdm's monitor thread.

    The listener refreshes every bar on each update, so the monitor has nothing to do,
    and it outlives the bars: every worker that a later run forks would be forked from
    a process with a thread in it, which Python 3.12+ warns is unsafe.
    """

    monitor_interval = 0


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}us"


def _terminal_columns(out: IO[str]) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _plain_line(elapsed: float, counts: list[StatusCount]) -> str:
    total = sum(c.completed + c.executing + c.waiting for c in counts)
    parts = []
    for c in counts:
        if c.terminal:
            parts.append(f"{c.state} {c.completed}/{total}")
        else:
            parts.append(
                f"{c.state} {c.processed} done {c.executing} exec {c.waiting} wait "
                f"{c.jobs_per_second:.1f}/s mean {_fmt_seconds(c.mean_seconds)} "
                f"cpu {c.cpu_percent:.0f}% err {c.errors}"
            )
    return f"[jorbmp {elapsed:7.1f}s] " + " | ".join(parts)


class TqdmStatusListener(StatusListener):
    """A progress bar per state, in the order the states were given.

    A working state's bar counts the execs it finished and shows how many jobs wait
    and execute, its mean exec time and CPU; a terminal state's bar counts the jobs
    that arrived in it out of all jobs in the run. ``plain`` forces (True) or
    forbids (False) plain lines instead of bars; by default they are used when the
    output is not a terminal. Extra keyword arguments go to every ``tqdm``.
    """

    def __init__(
        self, file: IO[str] | None = None, *, plain: bool | None = None, **tqdm_kwargs: Any
    ) -> None:
        self.file = file
        self.plain = plain
        self.tqdm_kwargs = tqdm_kwargs
        self.bars: list[tqdm] = []
        self._last: list[StatusCount] | None = None
        self._started = 0.0
        self._printed = -PLAIN_INTERVAL
        self._shown: list[StatusCount] | None = None  # the update printed last

    def _out(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _is_plain(self) -> bool:
        if self.plain is None:
            isatty = getattr(self._out(), "isatty", None)
            self.plain = not (isatty is not None and isatty())
        return self.plain

    def status_update(self, counts: list[StatusCount]) -> None:
        now = time.monotonic()
        if self._last is None:
            self._started = now
        self._last = counts
        if self._is_plain():
            if now - self._printed >= PLAIN_INTERVAL:
                self._printed, self._shown = now, counts
                print(_plain_line(now - self._started, counts), file=self._out(), flush=True)
            return
        if not self.bars:
            width = max(len(c.state) for c in counts)
            sizing: dict[str, Any] = {"dynamic_ncols": True}
            if _terminal_columns(self._out()) <= 0:
                # A terminal that reports no size (some ptys): tqdm would hide every
                # bar beyond its 0 rows, so give it a fixed size.
                size = shutil.get_terminal_size()
                sizing = {"ncols": size.columns, "nrows": max(size.lines, len(counts) + 1)}
            sizing.update(self.tqdm_kwargs)
            self.bars = [
                _Bar(
                    desc=c.state.ljust(width),
                    total=None,
                    position=i,
                    leave=True,
                    file=self._out(),
                    unit="job",
                    **sizing,
                )
                for i, c in enumerate(counts)
            ]
        total = sum(c.completed + c.executing + c.waiting for c in counts)
        for bar, c in zip(self.bars, counts, strict=True):
            if c.terminal:
                bar.total = total
                bar.n = c.completed
                bar.set_postfix_str(f"errors={c.errors}" if c.errors else "", refresh=False)
            else:
                bar.n = c.processed
                bar.set_postfix_str(
                    f"wait={c.waiting} exec={c.executing} mean={_fmt_seconds(c.mean_seconds)} "
                    f"cpu={c.cpu_percent:.0f}% err={c.errors}",
                    refresh=False,
                )
            bar.refresh()

    def close(self) -> None:
        if self.plain and self._last is not None and self._last is not self._shown:
            print(_plain_line(time.monotonic() - self._started, self._last), file=self._out())
        for bar in self.bars:
            bar.close()
        self.bars = []
        self._last = self._shown = None
        self._printed = -PLAIN_INTERVAL
