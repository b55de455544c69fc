"""What ``python -m jorbmp status`` shows of a checkpoint: per-state counts and the most
common errors, gathered without keeping every job (a format may stream its jobs, or
ask SQL: see `Serializer.overview`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ..errorgroups import EXAMPLE_IDS, ErrorGroup, ErrorGrouper
from ..run import NEW, Run

__all__ = [
    "EXAMPLE_IDS",
    "TOP_ERRORS",
    "ErrorGroup",
    "JobHead",
    "Overview",
    "OverviewBuilder",
    "overview_of",
]

# Error groups (kinds, see `jorbmp.errorgroups`) an overview keeps: the biggest.
TOP_ERRORS = 10


class JobHead(msgspec.Struct, gc=False):
    """What an overview reads of a stored `Job`: msgspec skips the rest (the context)."""

    id: str
    state: str = NEW  # `Job` omits defaults
    state_errors: dict[str, list[str]] | None = None


class Overview(msgspec.Struct):
    """A run at a glance: name, job count, jobs per state (most first), the biggest
    error groups (``error_kinds``: how many kinds there are in all)."""

    name: str
    jobs: int
    states: dict[str, int]
    errors: list[ErrorGroup]
    report: dict[str, Any] | None = None
    error_kinds: int = 0


def sorted_states(counts: Mapping[str, int]) -> dict[str, int]:
    """Jobs per state, most first, ties by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class OverviewBuilder:
    """Counts jobs one at a time, in the run's order, grouping their errors by kind
    (`ErrorGrouper`): memory grows with the kinds of error, not the jobs."""

    def __init__(self) -> None:
        self.states: Counter[str] = Counter()
        self.errors = ErrorGrouper()

    def add(self, job_id: str, state: str, errors: Mapping[str, list[str]] | None) -> None:
        self.states[state] += 1
        if errors:
            self.errors.add(job_id, state, errors)

    def add_errors(self, job_id: str, state: str, errors: Mapping[str, list[str]]) -> None:
        """The errors of a job, now in ``state``, counted by `count` (jobs must come in
        the run's order)."""
        if errors:
            self.errors.add(job_id, state, errors)

    def count(self, states: Iterable[str]) -> None:
        """Add jobs without errors, by their states only (one C loop for all of them)."""
        self.states.update(states)

    def build(self, name: str, report: dict[str, Any] | None) -> Overview:
        return Overview(
            name=name,
            jobs=sum(self.states.values()),
            states=sorted_states(self.states),
            errors=self.errors.groups(TOP_ERRORS),
            report=report,
            error_kinds=self.errors.kinds(),
        )


def overview_of(run: Run[Any, Any]) -> Overview:
    """The overview of a run already in memory."""
    builder = OverviewBuilder()
    add = builder.add
    for job in run.jobs.values():
        add(job.id, job.state, job.recorded_errors())
    return builder.build(run.name, run.report)
