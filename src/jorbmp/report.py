"""The end-of-run report: what each state did, which one limited the run, and a hint.

After `Processor.exec` (however it ended) it is in `Processor.last_report`;
``print(report)`` shows it as a table.
"""

from __future__ import annotations

import os

import msgspec

from .adaptive import LimitHistory
from .status import StatusCount

__all__ = ["RunReport", "StateReport"]

# A state busy at least this share of the run (utilisation) is called saturated.
SATURATED = 0.8
# A state that waited on its rate limit for at least this share of the run is
# limited by the rate, not by its workers.
RATE_BOUND = 0.5


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

    def __str__(self) -> str:
        head: tuple[str, tuple[str, ...]] = (
            f"run {self.run!r} {self.outcome} in {self.wall_seconds:.1f}s",
            ("state", "jobs", "execs", "errors", "mean", "p95", "busy", "cpu", "rate wait"),
        )
        rows: list[tuple[str, ...]] = [
            (
                s.state,
                str(s.jobs),
                "" if s.terminal else str(s.execs),
                "" if s.terminal else str(s.errors),
                "" if s.terminal else _seconds(s.mean_seconds),
                "" if s.terminal else _seconds(s.p95_seconds),
                "" if s.terminal else f"{s.utilisation:.0%} of {s.concurrency_text()}",
                "" if s.terminal else f"{s.cpu_percent:.0f}%",
                "" if s.terminal or not s.rate_wait_seconds else _seconds(s.rate_wait_seconds),
            )
            for s in self.states
        ]
        if any(s.rate_limit for s in self.states):  # a column only for runs with a limit
            head = (head[0], (*head[1], "limit"))
            rows = [(*r, _rate(s.rate_limit)) for r, s in zip(rows, self.states, strict=True)]
        if any(s.recycled for s in self.states):  # likewise for runs that recycled workers
            head = (head[0], (*head[1], "recycled"))
            rows = [(*r, str(s.recycled or "")) for r, s in zip(rows, self.states, strict=True)]
        table = [head[1], *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(head[1]))]
        lines = [head[0]]
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
    if seconds >= 1:
        return f"{seconds:.2f}s"
    return f"{seconds * 1000:.1f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}us"


def _rate(rate: float) -> str:
    """A rate limit per second ("" for none)."""
    if not rate:
        return ""
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
        )
        for (c, concurrency, kind, limits), cpu in zip(rows, cpu_seconds, strict=True)
    ]
    working = [s for s in states if not s.terminal and s.execs]
    if not working:
        return RunReport(run, outcome, wall, states, None, "nothing was executed", batch_scale)
    busiest = max(working, key=lambda s: s.utilisation)
    maximum = next(m for (c, m, _, _) in rows if c.state == busiest.state)
    hint = _hint(busiest, wall, maximum)
    return RunReport(run, outcome, wall, states, busiest.state, hint, batch_scale)


def _hint(s: StateReport, wall: float, maximum: int) -> str:
    """``maximum``: the state's concurrency, or its `AdaptiveConcurrency` max."""
    name, busy = repr(s.state), f"{s.utilisation:.0%}"
    if wall > 0 and s.rate_wait_seconds >= RATE_BOUND * wall:
        return (
            f"state {name} waited {s.rate_wait_seconds:.1f}s on its rate limit "
            f"({s.rate_wait_seconds / wall:.0%} of the run): the limit sets the pace"
            + (f" ({_rate(s.rate_limit)} at the end)" if s.rate_limit else "")
        )
    if s.utilisation < SATURATED:
        return (
            f"no state was saturated (busiest: {name}, {busy} busy): jobs were waiting "
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
    return f"{where}: raise its {what}"
