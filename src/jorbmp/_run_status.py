"""What a run shows of itself (`RunStatus`): status updates, the timeline, the report.

Each state's status (`jorbmp.status.StatusCount`) goes to the listener through the
mailbox and into the timeline (`jorbmp.timeline`); its processes' CPU and memory are
sampled every `SAMPLE_SECONDS`; at the end the report is built from the same figures.
Kept apart from the `jorbmp._coordinator.Coordinator` so that its loop reads as
scheduling: it only says when (the first update, each tick, the end).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec

from ._checkpoint_guard import CheckpointGuard
from ._load import LoadMeter
from ._mailbox import ListenerMailbox
from .adaptive import LimitHistory
from .errorgroups import group_errors
from .report import ERROR_GROUPS, RunReport, build_report
from .run import Run
from .status import SAMPLE_SECONDS, StatusCount
from .timeline import TimelineRecorder

if TYPE_CHECKING:
    from ._lane import Lane

__all__ = ["RunStatus"]


class RunStatus:
    """The status, samples, timeline and report of one run's ``lanes``, which started
    at loop time ``started``; updates go to ``mailbox``."""

    def __init__(
        self,
        lanes: dict[str, Lane],
        guard: CheckpointGuard,
        mailbox: ListenerMailbox,
        load: LoadMeter,
        started: float,
    ) -> None:
        self.lanes = lanes
        self.guard = guard  # (a paused dispatch shows in every state's status)
        self.mailbox = mailbox
        self.load = load
        self.started = started
        self.sample_time = started  # loop time of the last psutil sample
        # Fed the status snapshots as they are built; frozen into the report at the end.
        self.timeline = TimelineRecorder(list(lanes), start=started)

    def __repr__(self) -> str:
        return f"<RunStatus states={len(self.lanes)} sampled={self.sample_time:.1f}>"

    def begin(self, now: float) -> None:
        """The backends started: post the first update (exact), and take the CPU
        baselines the samples that follow need."""
        first = self.snapshot()
        self.mailbox.put(first, pinned=True)
        self.timeline.observe(now, first)
        self.sample_processes(baseline=True)

    def tick(self, now: float, changed: bool) -> None:
        """The housekeeping tick at loop time ``now``: sample when due, and post an
        update if anything ``changed`` (a sample counts: CPU and rates moved)."""
        if now - self.sample_time >= SAMPLE_SECONDS:
            self.sample_processes()
            changed = True  # CPU and rates moved even if no job did
        if changed:
            counts = self.snapshot()
            self.mailbox.put(counts)
            self.timeline.observe(now, counts)

    def sample_processes(self, baseline: bool = False) -> None:
        """Sample the CPU and memory of every state's processes; with ``baseline`` (at
        the start), only those whose CPU time since the start needs a baseline."""
        now = asyncio.get_running_loop().time()
        seconds, self.sample_time = now - self.sample_time, now
        for lane in self.lanes.values():
            backend = lane.backend
            if backend is not None and not (baseline and backend.started_pids):
                lane.metrics.sample(backend.pids(), seconds, backend.started_pids)

    def snapshot(self, final: bool = False) -> list[StatusCount]:
        """The status of every state; ``final``: the run is over and nothing executes
        (backends may still count abandoned execs as running)."""
        now = asyncio.get_running_loop().time()
        counts = [
            lane.metrics.snapshot(
                lane.name,
                lane.terminal,
                lane.count,
                lane.backend.executing() if lane.backend is not None and not final else 0,
                now,
                lane.limit.capacity_seconds(now),
                lane.limit.current,
            )
            for lane in self.lanes.values()
        ]
        if self.guard.paused:  # (rare: no cost otherwise)
            why = self.guard.status()
            counts = [c if c.terminal else msgspec.structs.replace(c, paused=why) for c in counts]
        return counts

    def report(self, run: Run[Any, Any], outcome: str) -> RunReport:
        """The end-of-run report: per-state figures, the bottleneck and a hint."""
        now = asyncio.get_running_loop().time()
        final = self.snapshot(final=True)
        rows: list[tuple[StatusCount, int, str, LimitHistory | None]] = [
            (count, lane.limit.maximum, lane.kind(), lane.limit.history())
            for count, lane in zip(final, self.lanes.values(), strict=True)
        ]
        cpu = [lane.metrics.cpu_seconds for lane in self.lanes.values()]
        report = build_report(run.name, outcome, now - self.started, rows, cpu, self.load.peak)
        # Only jobs with errors reach the grouper: ~9 ms a 100k-job run without any.
        jobs = [(j.id, j.state, e) for j in run.jobs.values() if (e := j.recorded_errors())]
        return msgspec.structs.replace(
            report,
            timeline=self.timeline.timeline(now, final),
            errors=group_errors(jobs, ERROR_GROUPS),
        )
