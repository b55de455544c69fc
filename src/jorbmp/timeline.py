"""The timeline: how each state of a run evolved, about one point a second, bounded.

The coordinator feeds `TimelineRecorder` the same `StatusCount` snapshots it sends to
the status listener (so recording costs no extra measurement: no psutil call of its
own), and at the end of the run freezes it into a `Timeline`, which the `RunReport`
carries into the checkpoint and the HTML report draws.

Each point covers one interval (from the previous point's ``t`` to its own) and holds,
per state, what happened in it: execs finished and errors (counts), and time-weighted
means of jobs in the state, jobs executing, the concurrency limit and CPU %, and the
peak RSS. When `MAX_POINTS` are held, adjacent pairs merge into one point (sums for
counts, means weighted by duration for the means, max for RSS) and the period doubles,
so a run of any length keeps at most `MAX_POINTS` points per state and the totals
(jobs finished, errors, busy worker-seconds) survive exactly.

Size (measured): a column is an `array` of 8-byte numbers, so a state costs at most
7 x 600 x 8 bytes, ~31 KB with the objects around them, while recording (12 states:
~370 KB); stored, values rounded, a state's 600 points take ~13-16 KB of JSON (the
JSON and SQLite checkpoints) or ~22 KB of msgpack (the journal), plus ~4 KB for the
shared time axis: a 12-state run's timeline is ~160 KB of JSON however long it ran.
Cost: `observe` takes ~6 us per state; on the 100k-job no-op pipeline the timeline
takes 0.04% of the run (``python -m jorbmp.bench --only status``).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .status import StatusCount

__all__ = ["MAX_POINTS", "PERIOD_SECONDS", "StateTimeline", "Timeline", "TimelineRecorder"]

# Points kept per state: enough for a chart as wide as a laptop screen to show one
# point per few pixels, few enough that a 12-state run's timeline stays ~300 KB in a
# JSON checkpoint however long the run.
MAX_POINTS = 600
# The finest interval between points: the status listener's psutil samples come once
# a second (`jorbmp.status.SAMPLE_SECONDS`), so finer points would repeat them.
PERIOD_SECONDS = 1.0
# Decimals kept in the stored means: a hundredth of a job or worker, a tenth of a
# percent of CPU. Enough for a chart, and it keeps the checkpoint small.
_DECIMALS = 2
_CPU_DECIMALS = 1


class StateTimeline(msgspec.Struct, frozen=True):
    """One state's columns; element ``i`` belongs to the interval ending at
    ``Timeline.t[i]``."""

    state: str
    terminal: bool
    finished: list[int]  # execs finished in the interval
    errors: list[int]  # errors recorded in the interval
    jobs: list[float]  # mean jobs in the state (executing + waiting, or completed)
    executing: list[float]  # mean execs running: the busy workers
    concurrency: list[float]  # mean concurrency limit (0 for terminal states)
    cpu_percent: list[float]  # mean CPU % of the state's processes
    rss_bytes: list[int]  # peak RSS of the state's processes

    def waiting(self) -> list[float]:
        """Mean jobs waiting per interval (0 for terminal states, whose jobs are done)."""
        if self.terminal:
            return [0.0] * len(self.jobs)
        return [max(0.0, j - e) for j, e in zip(self.jobs, self.executing, strict=True)]


class Timeline(msgspec.Struct, frozen=True):
    """Per-state columns over a shared time axis, at most `MAX_POINTS` points."""

    period: float  # the interval between points now (doubles at each downsampling)
    t: list[float]  # end of each interval, in seconds since the run started
    states: list[StateTimeline]

    def durations(self) -> list[float]:
        """The length of each interval in seconds (the first starts at 0)."""
        return [b - a for a, b in zip([0.0, *self.t[:-1]], self.t, strict=True)]


def _finite(value: float) -> float:
    """``value``, or 0 for NaN and infinities, which a JSON checkpoint cannot hold (a
    timeline is never worth refusing the final checkpoint for)."""
    return value if math.isfinite(value) else 0.0


class _Columns:
    """One state's live columns, and its running sums for the open interval."""

    __slots__ = (
        "concurrency",
        "cpu",
        "errors",
        "errors_at",
        "executing",
        "finished",
        "jobs",
        "processed_at",
        "rss",
        "sums",
        "terminal",
    )

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.finished = array("q")
        self.errors = array("q")
        self.jobs = array("d")
        self.executing = array("d")
        self.concurrency = array("d")
        self.cpu = array("d")
        self.rss = array("q")
        self.processed_at = 0  # `processed` and `errors` when the open interval began
        self.errors_at = 0
        # Open interval: time-weighted sums of jobs, executing, concurrency and CPU %,
        # then the peak RSS.
        self.sums = [0.0, 0.0, 0.0, 0.0, 0]

    def accumulate(self, c: StatusCount, dt: float) -> None:
        sums = self.sums
        sums[0] += (c.completed if c.terminal else c.executing + c.waiting) * dt
        sums[1] += c.executing * dt
        sums[2] += c.concurrency * dt
        sums[3] += _finite(c.cpu_percent) * dt
        sums[4] = max(sums[4], c.rss_bytes)

    def close(self, c: StatusCount, duration: float) -> None:
        """End the open interval (``duration`` seconds long, > 0) at ``c``."""
        sums = self.sums
        self.finished.append(max(0, c.processed - self.processed_at))
        self.errors.append(max(0, c.errors - self.errors_at))
        self.jobs.append(sums[0] / duration)
        self.executing.append(sums[1] / duration)
        self.concurrency.append(sums[2] / duration)
        self.cpu.append(sums[3] / duration)
        self.rss.append(int(sums[4]))
        self.processed_at, self.errors_at = c.processed, c.errors
        self.sums = [0.0, 0.0, 0.0, 0.0, 0]

    def merge_pairs(self, weights: Sequence[float], start: int = 0) -> None:
        """Merge points ``start`` + 2k and ``start`` + 2k + 1 (``weights``: the points'
        durations); an odd last point stays as it is."""
        for name in ("finished", "errors"):
            col = getattr(self, name)
            merged = _pairs(col, lambda a, b, i: a + b, start)
            setattr(self, name, array(col.typecode, merged))
        for name in ("jobs", "executing", "concurrency", "cpu"):
            col = getattr(self, name)

            def mean(a: float, b: float, i: int) -> float:
                wa, wb = weights[i], weights[i + 1]
                return (a * wa + b * wb) / (wa + wb) if wa + wb > 0 else (a + b) / 2

            setattr(self, name, array("d", _pairs(col, mean, start)))
        self.rss = array("q", _pairs(self.rss, lambda a, b, i: max(a, b), start))

    def frozen(self, state: str) -> StateTimeline:
        return StateTimeline(
            state=state,
            terminal=self.terminal,
            finished=self.finished.tolist(),
            errors=self.errors.tolist(),
            jobs=[round(v, _DECIMALS) for v in self.jobs],
            executing=[round(v, _DECIMALS) for v in self.executing],
            concurrency=[round(v, _DECIMALS) for v in self.concurrency],
            cpu_percent=[round(v, _CPU_DECIMALS) for v in self.cpu],
            rss_bytes=self.rss.tolist(),
        )


def _pairs(col: Sequence[Any], merge: Callable[[Any, Any, int], Any], start: int = 0) -> list[Any]:
    """``col`` with points i and i + 1 merged by ``merge(a, b, i)``, for i = ``start``,
    ``start`` + 2, ..."""
    n = len(col)
    out = list(col[:start])
    out += [merge(col[i], col[i + 1], i) for i in range(start, n - 1, 2)]
    if (n - start) % 2:
        out.append(col[n - 1])
    return out


class TimelineRecorder:
    """Builds a run's timeline from its status snapshots (see the module docstring).

    ``observe`` takes every snapshot the coordinator builds (up to ten a second, and
    at least one a second, when processes are sampled); a point closes once its
    interval is `period` long. Times are the coordinator's loop clock, in seconds.
    """

    __slots__ = (
        "_columns",
        "_last",
        "_open_at",
        "_origin",
        "_start",
        "_states",
        "_t",
        "max_points",
        "period",
    )

    def __init__(
        self,
        states: Sequence[str],
        max_points: int = MAX_POINTS,
        period: float = PERIOD_SECONDS,
        start: float | None = None,
    ) -> None:
        """``start``: when the run started, if before the first snapshot (the time
        axis then starts there, as the report's wall time does)."""
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, not {max_points}")
        self._states = list(states)
        self._columns: list[_Columns] | None = None  # built by the first snapshot
        self._t = array("d")  # interval ends, seconds since the start
        self._origin = start
        self._start = 0.0  # the start: ``start``, or the time of the first snapshot
        self._last = 0.0  # time of the latest snapshot
        self._open_at = 0.0  # start of the open interval
        self.max_points = max_points
        self.period = period

    def __repr__(self) -> str:
        return (
            f"<TimelineRecorder {len(self._states)} states, {len(self._t)} points, "
            f"every {self.period:g}s>"
        )

    def observe(self, now: float, counts: Sequence[StatusCount]) -> None:
        """Account for ``counts``, the status at ``now``; close the point when due."""
        columns = self._columns
        if columns is None:  # the first snapshot: the baseline
            self._columns = [_Columns(c.terminal) for c in counts]
            origin = now if self._origin is None else min(self._origin, now)
            for col, c in zip(self._columns, counts, strict=True):
                col.processed_at, col.errors_at = c.processed, c.errors
                col.accumulate(c, now - origin)  # as it was since the start
            self._start = self._open_at = origin
            self._last = now
            return
        dt = now - self._last
        if dt <= 0:
            return
        self._last = now
        # The values at ``now`` stand for the time since the last snapshot: snapshots
        # are built when something changed, so this lags a change by at most a tick.
        for col, c in zip(columns, counts, strict=True):
            col.accumulate(c, dt)
        if now - self._open_at >= self.period:
            self._close(now, counts)

    def _close(self, now: float, counts: Sequence[StatusCount]) -> None:
        columns = self._columns
        assert columns is not None
        duration = now - self._open_at
        for col, c in zip(columns, counts, strict=True):
            col.close(c, duration)
        self._t.append(now - self._start)
        self._open_at = now
        if len(self._t) >= self.max_points:
            t = self._t
            weights = [b - a for a, b in zip([0.0, *t[:-1]], t, strict=True)]
            for col in columns:
                col.merge_pairs(weights)
            # A merged point ends where its later half ended.
            self._t = array("d", [t[i + 1] for i in range(0, len(t) - 1, 2)])
            if len(t) % 2:
                self._t.append(t[-1])
            self.period *= 2

    def timeline(self, now: float, counts: Sequence[StatusCount]) -> Timeline | None:
        """The timeline up to ``now`` (``counts``: the final status), closing the open
        interval; None when nothing was observed (a run that executed nothing)."""
        if self._columns is None:
            return None
        self.observe(now, counts)
        if now > self._open_at:  # what is left of the open interval: a shorter point
            short = len(self._t) and now - self._open_at < self.period / 2
            self._close(now, counts)
            if short and len(self._t) >= 2:
                # Folded into the point before: a sliver at the end (the last tick of
                # a run) would show as a spike in every per-second chart.
                t = self._t
                n = len(t)
                weights = [b - a for a, b in zip([0.0, *t[:-1]], t, strict=True)]
                for col in self._columns:
                    col.merge_pairs(weights, n - 2)
                del t[n - 2]
        columns = self._columns
        return Timeline(
            period=self.period,
            t=[round(v, 3) for v in self._t],
            states=[col.frozen(s) for col, s in zip(columns, self._states, strict=True)],
        )
