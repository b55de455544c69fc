"""The end-of-run report: what each state did, which one limited the run, and a hint.

After `Processor.exec` (however it ended) it is in `Processor.last_report`;
``print(report)`` shows it as a table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import msgspec

from .adaptive import LimitHistory
from .errorgroups import ErrorGroup
from .status import StatusCount
from .timeline import Timeline

__all__ = ["RunReport", "StateReport"]

# A state busy at least this share of the run (utilisation) is called saturated.
SATURATED = 0.8
# A state that waited on its rate limit for at least this share of the run is
# limited by the rate, not by its workers.
RATE_BOUND = 0.5
# Error groups a report keeps (the biggest): what a reader scans, and a bounded size in
# the checkpoint however many kinds of error the run had.
ERROR_GROUPS = 10


class StateReport(msgspec.Struct, frozen=True):
    """One state's figures over the whole run."""

    state: str
    kind: str  # "process", "async", "thread", a backend's label ("dask"), or "" if terminal
    terminal: bool
    jobs: int  # jobs in this state at the end
    execs: int
    errors: int
    mean_seconds: float
    p95_seconds: float
    concurrency: int
    utilisation: float  # busy slot-seconds / (concurrency x wall), 0..1
    cpu_percent: float  # mean over the run, of the state's processes
    rate_wait_seconds: float
    rate_limit: float = 0.0  # the rate limit's rate per second at the end (0: no limit)
    # An adaptive state (`AdaptiveConcurrency`): its limit's least and greatest values
    # over the run (``concurrency`` is its last); for a fixed one, both its concurrency.
    adaptive: bool = False
    concurrency_min: int = 0
    concurrency_max: int = 0
    # Workers replaced by recycling (``max_jobs_per_worker``, ``max_worker_memory``).
    recycled: int = 0
    # Time it had jobs waiting out a retry delay or a Retry-After, the run nothing else to do.
    delay_wait_seconds: float = 0.0

    def concurrency_text(self) -> str:
        """The concurrency as the table shows it: ``8`` or, adaptive, ``8 (2-16)``."""
        if not self.adaptive:
            return str(self.concurrency)
        return f"{self.concurrency} ({self.concurrency_min}-{self.concurrency_max})"


class RunReport(msgspec.Struct, frozen=True):
    """The figures of one `Processor.exec`, frozen when it ended."""

    run: str
    outcome: str  # "complete" or "stopped"
    wall_seconds: float
    states: list[StateReport]
    bottleneck: str | None  # the working state with the highest utilisation
    hint: str
    # The most work per batch the coordinator asked of process states, as a multiple of
    # the usual (`jorbmp._load`): above 1 when it fell behind the workers it fed.
    batch_scale: int = 1
    # How each state evolved over the run (`jorbmp.timeline`); None when nothing was
    # executed, or in a report from before timelines were recorded.
    timeline: Timeline | None = None
    # The biggest groups of errors by kind (`jorbmp.errorgroups`) among the run's jobs
    # when the report was made, at most `ERROR_GROUPS`.
    errors: list[ErrorGroup] = msgspec.field(default_factory=list)

    def to_html(self, errors: Sequence[ErrorGroup] | None = None) -> str:
        """The report as one self-contained HTML page (`jorbmp.report_html`);
        ``errors``: error groups to show instead of the report's own (fresher ones,
        from the checkpoint as it is now)."""
        from .report_html import render  # the renderer is only needed here

        return render(self, errors)

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """The per-state table as text: its header and a row of cells per state (what
        ``str()`` lays out, and the HTML report shows)."""
        head: tuple[str, ...] = ("state", "jobs", "execs", "errors", "mean", "p95", "busy")
        head += ("cpu", "rate wait")
        rows: list[tuple[str, ...]] = [
            (
                s.state,
                str(s.jobs),
                "" if s.terminal else str(s.execs),
                "" if s.terminal else str(s.errors),
                "" if s.terminal else _seconds(s.mean_seconds),
                "" if s.terminal else _seconds(s.p95_seconds),
                "" if s.terminal else f"{_percent(s.utilisation)} of {s.concurrency_text()}",
                "" if s.terminal else _percent(s.cpu_percent / 100),
                "" if s.terminal or not s.rate_wait_seconds else _seconds(s.rate_wait_seconds),
            )
            for s in self.states
        ]
        if any(s.delay_wait_seconds for s in self.states):  # only for runs with delays
            head = (*head, "retry wait")
            rows = [
                (*r, "" if not s.delay_wait_seconds else _seconds(s.delay_wait_seconds))
                for r, s in zip(rows, self.states, strict=True)
            ]
        if any(s.rate_limit for s in self.states):  # a column only for runs with a limit
            head = (*head, "limit")
            rows = [(*r, _rate(s.rate_limit)) for r, s in zip(rows, self.states, strict=True)]
        if any(s.recycled for s in self.states):  # likewise for runs that recycled workers
            head = (*head, "recycled")
            rows = [(*r, str(s.recycled or "")) for r, s in zip(rows, self.states, strict=True)]
        return head, rows

    def __str__(self) -> str:
        head, rows = self.table()
        table = [head, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        wall = f"{self.wall_seconds:.1f}s" if math.isfinite(self.wall_seconds) else "-"
        lines = [f"run {self.run!r} {self.outcome} in {wall}"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in table]  # fmt: skip
        lines.append(self.hint)
        if self.batch_scale > 1:
            lines.append(
                f"the coordinator fell behind: batches held up to {self.batch_scale}x their "
                "usual work"
            )
        return "\n".join(lines)


def _seconds(seconds: float) -> str:
    if not math.isfinite(seconds):  # a report from a checkpoint is data from anywhere
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f}s"
    return f"{seconds * 1000:.1f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}us"


def _percent(share: float) -> str:
    """``0.42`` as ``42%`` ("-" for NaN and infinities)."""
    return f"{share:.0%}" if math.isfinite(share) else "-"


def _rate(rate: float) -> str:
    """A rate limit per second ("" for none)."""
    if not rate:
        return ""
    if not math.isfinite(rate):
        return "-"
    return f"{rate:,.0f}/s" if rate >= 10 else f"{rate:.2g}/s"


def build_report(
    run: str,
    outcome: str,
    wall: float,
    rows: list[tuple[StatusCount, int, str, LimitHistory | None]],
    cpu_seconds: list[float],
    batch_scale: int = 1,
) -> RunReport:
    """Turn the final status (one ``(count, concurrency, kind, limits)`` per state: an
    adaptive state's ``limits`` over the run, else None) into a report."""
    states = [
        StateReport(
            state=c.state,
            kind=kind,
            terminal=c.terminal,
            jobs=c.completed if c.terminal else c.executing + c.waiting,
            execs=c.processed,
            errors=c.errors,
            mean_seconds=c.mean_seconds,
            p95_seconds=c.p95_seconds,
            concurrency=concurrency if limits is None else limits.final,
            utilisation=c.utilisation,
            cpu_percent=100 * cpu / wall if wall > 0 else 0.0,
            rate_wait_seconds=c.rate_wait_seconds,
            rate_limit=c.rate_limit,
            adaptive=limits is not None,
            concurrency_min=concurrency if limits is None else limits.min,
            concurrency_max=concurrency if limits is None else limits.max,
            recycled=c.recycled,
            delay_wait_seconds=c.delay_wait_seconds,
        )
        for (c, concurrency, kind, limits), cpu in zip(rows, cpu_seconds, strict=True)
    ]
    working = [s for s in states if not s.terminal and s.execs]
    if not working:
        return RunReport(run, outcome, wall, states, None, "nothing was executed", batch_scale)
    # The bottleneck: the state held up for the largest share of the run, by full slots,
    # its rate limit or retry delays, whichever held it most.
    bottleneck = max(working, key=lambda s: _held(s, wall))
    maximum = next(m for (c, m, _, _) in rows if c.state == bottleneck.state)
    hint = _hint(bottleneck, wall, maximum)
    return RunReport(run, outcome, wall, states, bottleneck.state, hint, batch_scale)


# What can hold a working state up, as `_held` names it.
_BUSY, _RATE, _DELAY = "busy", "rate", "delay"


def _held(s: StateReport, wall: float) -> tuple[float, str]:
    """The largest share of the run (0..1) that ``s`` was held up, and by what: its
    slots full (utilisation), or waiting on its rate limit, or on retry delays and
    Retry-After (jobs it could not start)."""
    if wall <= 0:
        return (s.utilisation, _BUSY)
    return max(
        (s.utilisation, _BUSY),
        (min(1.0, s.rate_wait_seconds / wall), _RATE),
        (min(1.0, s.delay_wait_seconds / wall), _DELAY),
    )


def _hint(s: StateReport, wall: float, maximum: int) -> str:
    """What held the run up, for ``s``, the state held up most (`_held`); ``maximum``:
    its concurrency, or its `AdaptiveConcurrency` max."""
    name, busy = repr(s.state), f"{s.utilisation:.0%}"
    share, what_held = _held(s, wall)
    if what_held == _RATE and share >= RATE_BOUND:
        return (
            f"state {name} waited {s.rate_wait_seconds:.1f}s on its rate limit "
            f"({share:.0%} of the run): the limit sets the pace"
            + (f" ({_rate(s.rate_limit)} at the end)" if s.rate_limit else "")
        )
    if what_held == _DELAY and share >= RATE_BOUND:
        return (
            f"state {name} had jobs waiting out retry delays or Retry-After for "
            f"{s.delay_wait_seconds:.1f}s ({share:.0%} of the run): the back-off sets the "
            f"pace ({s.errors} errors; see `python -m jorbmp status` for them)"
        )
    if what_held != _BUSY or s.utilisation < SATURATED:
        waits = {_RATE: "on its rate limit", _DELAY: "on retry delays"}
        why = f"{busy} busy" if what_held == _BUSY else f"{share:.0%} of the run {waits[what_held]}"
        return (
            f"no state was saturated (most held up: {name}, {why}): jobs were waiting "
            "on something else (start-up, the coordinator, or too few jobs to overlap)"
        )
    where = f"state {name} was busy {busy} of the run at concurrency {s.concurrency_text()}"
    cores = os.cpu_count() or 1
    if s.kind == "process" and s.concurrency >= cores:
        return f"{where}, as many workers as cores: add cores or make its exec cheaper"
    what = "AdaptiveConcurrency max" if s.adaptive else "concurrency"
    if s.adaptive and s.concurrency < maximum:
        return (
            f"{where}: its limit settled below its max ({maximum}), where more execs at "
            "once no longer paid"
        )
    if s.kind == "dask":
        return f"{where}: raise its {what}, with workers to match on the cluster"
    if s.kind in ("async", "thread"):
        return (
            f"{where}: its slots were full, each waiting on I/O rather than using a core: "
            f"raise its {what} (as far as what it calls allows)"
        )
    return f"{where}: raise its {what}"
