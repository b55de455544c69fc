"""What ``python -m jorbmp status`` shows of a checkpoint: per-state counts and the most
common errors, gathered without keeping every job (a format may stream its jobs, or
ask SQL: see `Serializer.overview`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

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

# Error groups an overview keeps, and example job ids per group.
TOP_ERRORS = 10
EXAMPLE_IDS = 5


class JobHead(msgspec.Struct, gc=False):
    """What an overview reads of a stored `Job`: msgspec skips the rest (the context)."""

    id: str
    state: str = NEW  # `Job` omits defaults
    state_errors: dict[str, list[str]] | None = None


class ErrorGroup(msgspec.Struct):
    """Jobs that recorded one error text in one state (each job counts once)."""

    state: str
    error: str
    jobs: int
    examples: list[str]  # the first job ids, in the run's order


class Overview(msgspec.Struct):
    """A run at a glance: name, job count, jobs per state (most first), top errors."""

    name: str
    jobs: int
    states: dict[str, int]
    errors: list[ErrorGroup]
    report: dict[str, Any] | None = None


def top_groups(
    groups: Iterable[tuple[str, str, int, list[str]]], top: int = TOP_ERRORS
) -> list[ErrorGroup]:
    """The ``top`` biggest groups of (state, error, jobs, examples), biggest first, ties
    by state and text: one ordering for every way of counting them."""
    ranked = sorted(groups, key=lambda g: (-g[2], g[0], g[1]))[:top]
    return [ErrorGroup(state, error, jobs, examples) for state, error, jobs, examples in ranked]


def sorted_states(counts: Mapping[str, int]) -> dict[str, int]:
    """Jobs per state, most first, ties by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class OverviewBuilder:
    """Counts jobs one at a time, in the run's order, keeping per error group only a
    count and the first `EXAMPLE_IDS` ids: memory grows with the groups, not the jobs."""

    def __init__(self) -> None:
        self.states: Counter[str] = Counter()
        self.groups: dict[tuple[str, str], list[Any]] = {}  # -> [count, examples]

    def add(self, job_id: str, state: str, errors: Mapping[str, list[str]] | None) -> None:
        self.states[state] += 1
        if errors:
            self.add_errors(job_id, errors)

    def add_errors(self, job_id: str, errors: Mapping[str, list[str]]) -> None:
        """The errors of a job counted by `count` (jobs must come in the run's order)."""
        groups = self.groups
        for error_state, texts in errors.items():
            for text in dict.fromkeys(texts):  # a job counts once per distinct error
                group = groups.get((error_state, text))
                if group is None:
                    groups[(error_state, text)] = [1, [job_id]]
                else:
                    group[0] += 1
                    if len(group[1]) < EXAMPLE_IDS:
                        group[1].append(job_id)

    def count(self, states: Iterable[str]) -> None:
        """Add jobs without errors, by their states only (one C loop for all of them)."""
        self.states.update(states)

    def build(self, name: str, report: dict[str, Any] | None) -> Overview:
        return Overview(
            name=name,
            jobs=sum(self.states.values()),
            states=sorted_states(self.states),
            errors=top_groups((s, t, g[0], g[1]) for (s, t), g in self.groups.items()),
            report=report,
        )


def overview_of(run: Run[Any, Any]) -> Overview:
    """The overview of a run already in memory."""
    builder = OverviewBuilder()
    add = builder.add
    for job in run.jobs.values():
        add(job.id, job.state, job.recorded_errors())
    return builder.build(run.name, run.report)
