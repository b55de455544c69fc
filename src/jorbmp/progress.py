"""`TqdmStatusListener`: one tqdm bar per state, kept in place, closed when the run ends.

When the output is not a terminal (a log file, CI), redrawn bars would fill it with
carriage returns; the listener then writes one plain line every `PLAIN_INTERVAL`
seconds and a last one at the end instead.

The bars fill at most two rows fewer than the terminal has (one fewer than an
``nrows`` given), and always at least one bar: a terminal that reports no size is
taken to have ``LINES`` rows, or 24. With more states than bars, the terminal states
(done, failed) keep their bars and the working states that do not fit share one
folded bar; with fewer bars than terminal states and one, only terminal states are
shown, the last ones folded into one bar (on one or two rows, one bar for all of
them: the run's progress). tqdm is told to show every bar, whatever it reads of the
terminal's size.
A new list of states (a later run) gets new bars.
Rates are recent (over `RATE_WINDOW_SECONDS`), not averages since the start.

The listener is called on a thread of its own (see `jorbmp._mailbox`): an output that
stops draining blocks that thread, never the run.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque
from typing import IO, Any

from tqdm import tqdm

from .status import RATE_WINDOW_SECONDS, StatusCount, StatusListener

__all__ = ["TqdmStatusListener"]

# Seconds between plain status lines when the output is not a terminal.
PLAIN_INTERVAL = 10.0
# A terminal state's bar: tqdm's default without the time remaining (``<{remaining}``).
TERMINAL_BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _Bar(tqdm):  # type: ignore[misc]  # tqdm ships no types
    """A tqdm bar without tqdm's monitor thread.

    The listener refreshes every bar on each update, so the monitor has nothing to do,
    and it outlives the bars: every worker that a later run forks would be forked from
    a process with a thread in it, which Python 3.12+ warns is unsafe.
    """

    monitor_interval = 0

    def __init__(self, *args: Any, bars: int, **kwargs: Any) -> None:
        self._nrows = bars + 1
        super().__init__(*args, **kwargs)

    # tqdm hides bars from position nrows - 1 on ("... (more hidden) ..." there), with
    # nrows read from the terminal at every redraw (dynamic_ncols), 20 when 0: the
    # listener fits its ``bars`` to the rows already, so tqdm must show all of them.
    @property
    def nrows(self) -> int:
        return self._nrows

    @nrows.setter
    def nrows(self, value: int | None) -> None:
        pass  # tqdm's reading of the terminal: the layout decided

    # The rate shown: recent, set by the listener (tqdm's own would be the average
    # since the bar started, as the listener sets ``n`` rather than calling update).
    recent_rate: float | None = None

    @property
    def format_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().format_dict
        if self.recent_rate is not None:
            d["rate"] = self.recent_rate
        return d


class _Rate:
    """A count's recent rate of change, over about `RATE_WINDOW_SECONDS`."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def __call__(self, now: float, n: int) -> float:
        samples = self.samples
        samples.append((now, n))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_SECONDS:
            samples.popleft()
        t0, n0 = samples[0]
        return (n - n0) / (now - t0) if now > t0 else 0.0


def _layout(counts: list[StatusCount], rows: int) -> list[list[int]]:
    """Which states each bar shows (indexes into ``counts``), at most ``rows`` bars
    (at least one), in the states' order.

    Every state has a bar of its own when there are at most ``rows`` of them. Else the
    terminal states keep theirs, the first working states fill the rows left but one,
    and the other working states share that one. With fewer rows than terminal states
    and one, the working states have no bar, and the last terminal ones share one.
    """
    rows = max(1, rows)
    if len(counts) <= rows:
        return [[i] for i in range(len(counts))]
    terminal = [i for i, c in enumerate(counts) if c.terminal]
    if rows <= len(terminal):
        # The terminal states are the run's progress: they keep every row.
        return [[i] for i in terminal[: rows - 1]] + [terminal[rows - 1 :]]
    keep = rows - len(terminal) - 1
    bars: list[list[int]] = []
    folded: list[int] | None = None
    for i, c in enumerate(counts):
        if c.terminal or keep > 0:
            if not c.terminal:
                keep -= 1
            bars.append([i])
        elif folded is None:
            folded = [i]
            bars.append(folded)
        else:
            folded.append(i)
    return bars


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}us"


def _terminal_size(out: IO[str]) -> os.terminal_size:
    """The size of the terminal ``out`` writes to; 0 where it reports none."""
    try:
        return os.get_terminal_size(out.fileno())
    except (OSError, ValueError, AttributeError):
        return os.terminal_size((0, 0))


def _sizing(out: IO[str], tqdm_kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """How many bars fit (at least one), and the sizing arguments for tqdm.

    As tqdm's own default, the bars leave two of the terminal's rows free (one of an
    ``nrows`` given). A terminal that reports no size (some ptys, a file made to look
    like one) is taken to be ``COLUMNS`` x ``LINES``, else 80 x 24 (shutil's
    fallback), with a fixed width: tqdm would read 0 columns at every redraw.
    """
    size = _terminal_size(out)
    sizing: dict[str, Any] = {"dynamic_ncols": True}
    if size.columns <= 0 or size.lines <= 0:
        fallback = shutil.get_terminal_size()
        if size.columns <= 0:
            sizing = {"ncols": fallback.columns}
        if size.lines <= 0:
            size = os.terminal_size((size.columns, fallback.lines))
    sizing.update(tqdm_kwargs)
    rows = tqdm_kwargs.get("nrows") or size.lines - 1
    return max(1, rows - 1), sizing


def _plain_line(elapsed: float, counts: list[StatusCount]) -> str:
    """One line for a log: per state its name, then each figure after its label
    (``execs`` counts finished execs, not jobs: a terminal state's ``jobs`` are the
    jobs in it); ``rate`` is a state's recent execs per second, ``limit`` its rate
    limit now (an `AIMDRateLimiter` moves it)."""
    total = sum(c.completed + c.executing + c.waiting for c in counts)
    parts = []
    for c in counts:
        if c.terminal:
            parts.append(f"{c.state}: jobs={c.completed}/{total}")
        else:
            parts.append(
                f"{c.state}: execs={c.processed} running={c.executing}/{c.concurrency} "
                f"waiting={c.waiting} rate={c.jobs_per_second:.1f}/s "
                f"mean={_fmt_seconds(c.mean_seconds)} cpu={c.cpu_percent:.0f}% "
                f"errors={c.errors}{_limit([c])}"
            )
    return f"[jorbmp {elapsed:.1f}s] " + " | ".join(parts) + _paused(counts)


def _paused(counts: list[StatusCount]) -> str:
    """Why dispatch is paused (the checkpoint cannot be written), or nothing."""
    why = next((c.paused for c in counts if c.paused), "")
    return f" | PAUSED: {why}" if why else ""


def _limit(group: list[StatusCount]) -> str:
    """A state's rate limit now (an `AIMDRateLimiter`'s moves), or nothing without one.

    A bar folding several states shows none: their limits do not add up (states may
    share one limiter, and an unlimited one has no limit to add), and a count alone
    cannot tell which limit holds the group back.
    """
    if len(group) != 1:
        return ""
    rate = group[0].rate_limit
    if not rate:
        return ""
    return f" limit={rate:,.0f}/s" if rate >= 10 else f" limit={rate:.2g}/s"


class TqdmStatusListener(StatusListener):
    """A progress bar per state, in the order the states were given.

    A working state's bar counts the execs it finished and shows how many jobs wait
    and execute (of its concurrency: an adaptive state's current limit), its mean
    exec time and CPU; a terminal state's bar counts the jobs
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
        self._layout: list[list[int]] = []  # per bar, the states it shows
        self._states: list[str] = []  # the states the bars were made for
        self._rates: list[_Rate] = []  # per bar, for terminal states' arrivals
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
        if self.bars and [c.state for c in counts] != self._states:
            self._close_bars()  # another run's states: its layout does not apply
        if not self.bars:
            self._make_bars(counts)
        total = sum(c.completed + c.executing + c.waiting for c in counts)
        for bar, shown, rate in zip(self.bars, self._layout, self._rates, strict=True):
            group = [counts[i] for i in shown]
            if group[0].terminal:  # a bar holds terminal states only, or none
                completed = sum(c.completed for c in group)
                errors = sum(c.errors for c in group)
                bar.total = total
                bar.n = completed
                bar.recent_rate = rate(now, completed)
                bar.set_postfix_str(f"errors={errors}" if errors else "", refresh=False)
            else:
                processed = sum(c.processed for c in group)
                mean = (
                    sum(c.mean_seconds * c.processed for c in group) / processed
                    if processed
                    else 0.0
                )
                bar.n = processed
                bar.recent_rate = sum(c.jobs_per_second for c in group)
                running = sum(c.executing for c in group)
                bar.set_postfix_str(
                    f"running={running}/{sum(c.concurrency for c in group)} "
                    f"waiting={sum(c.waiting for c in group)} "
                    f"mean={_fmt_seconds(mean)} "
                    # (folded async and thread states would each count the coordinator)
                    f"cpu={max(c.cpu_percent for c in group):.0f}% "
                    f"errors={sum(c.errors for c in group)}{_limit(group)}{_paused(group)}",
                    refresh=False,
                )
            bar.refresh()

    def _make_bars(self, counts: list[StatusCount]) -> None:
        fit, sizing = _sizing(self._out(), self.tqdm_kwargs)
        self._layout = _layout(counts, fit)
        self._states = [c.state for c in counts]
        names = [
            counts[shown[0]].state
            if len(shown) == 1
            else f"({len(shown)} terminal states)"
            if counts[shown[0]].terminal
            else f"(+{len(shown)} states)"
            for shown in self._layout
        ]
        width = max(len(name) for name in names)
        terminal = [counts[shown[0]].terminal for shown in self._layout]
        self.bars = [
            _Bar(
                desc=name.ljust(width),
                total=None,
                position=i,
                leave=True,
                file=self._out(),
                # A working state's bar counts execs (a job may exec many times); a
                # terminal state's counts jobs, out of all, with no ETA: a terminal
                # state need never hold them all (failed, when most succeed).
                unit=" jobs" if end else " execs",
                **({"bar_format": TERMINAL_BAR} if end and "bar_format" not in sizing else {}),
                **sizing,
                bars=len(names),
            )
            for i, (name, end) in enumerate(zip(names, terminal, strict=True))
        ]
        self._rates = [_Rate() for _ in self.bars]

    def close(self) -> None:
        if self.plain and self._last is not None and self._last is not self._shown:
            print(_plain_line(time.monotonic() - self._started, self._last), file=self._out())
        self._close_bars()
        self._last = self._shown = None
        self._printed = -PLAIN_INTERVAL

    def _close_bars(self) -> None:
        for bar in self.bars:
            bar.close()
        self.bars = []
        self._layout, self._rates, self._states = [], [], []
