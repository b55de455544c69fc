"""Status: the per-state snapshot (`StatusCount`) listeners receive, and how it is measured.

Listeners only read frozen snapshots; the coordinator owns the live counters
(`StateMetrics`) and samples process CPU and memory with psutil at most once per
`SAMPLE_SECONDS`, so a status update costs the coordinator little.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import msgspec
import psutil

__all__ = ["NilStatusListener", "StatusCount", "StatusListener"]

# Window over which jobs_per_second is measured: long enough to smooth batches of
# results, short enough to show a state slowing down within seconds.
RATE_WINDOW_SECONDS = 5.0
# psutil sampling period: reading /proc for every worker costs ~20-50 us each.
SAMPLE_SECONDS = 1.0
# Exec times kept per state for the p95: recent enough to follow a change, enough
# samples for the tail to mean something, cheap to sort ten times a second.
P95_WINDOW = 1000


class StatusCount(msgspec.Struct, frozen=True):
    """One state's line in a status update. Counts are exact; metrics are measured."""

    state: str
    completed: int = 0  # jobs now in this state (terminal states only)
    executing: int = 0
    waiting: int = 0
    terminal: bool = False
    processed: int = 0  # execs finished in this state
    errors: int = 0  # execs that raised, were rate limited, or returned an error
    mean_seconds: float = 0.0  # mean exec wall time
    jobs_per_second: float = 0.0  # over the last few seconds
    cpu_percent: float = 0.0  # the state's workers (or the coordinator for async/thread)
    rss_bytes: int = 0
    p95_seconds: float = 0.0  # 95th percentile of recent exec wall times
    rate_wait_seconds: float = 0.0  # time spent waiting on the state's rate limiter
    utilisation: float = 0.0  # busy slot-seconds / (concurrency x elapsed), 0..1
    rate_limit: float = 0.0  # the rate limit's current rate per second (0: no limit)
    # Execs at once the state allows now: its concurrency, or an adaptive state's
    # current limit (0 for terminal states).
    concurrency: int = 0
    # Workers replaced so far by recycling (``State(max_jobs_per_worker=...,
    # max_worker_memory=...)``): no deaths, nothing charged.
    recycled: int = 0
    # Why dispatch is paused, naming the file and the cause: the checkpoint cannot be
    # written for lack of space (see `jorbmp._checkpoint_guard`); "" while it runs.
    paused: str = ""
    # Time during which the state had jobs waiting out a retry delay or a
    # ``Retry-After`` while the run had nothing else to do (nothing queued or executing).
    delay_wait_seconds: float = 0.0


class StatusListener:
    """Receives status updates: exact at the start and end, coalesced (<= ~10/s) between.

    ``status_update`` gets one `StatusCount` per state, in the order the states were
    given. ``close`` is called once when the run ends, however it ends.

    Both are called on a thread of their own, never on the coordinator's loop, and
    one call at a time, even across runs that share the listener: a slow listener
    skips intermediate updates (it always gets the latest, never an older one after a
    newer one), and the first and the last update are always delivered. What either
    raises (``SystemExit`` included) is logged. ``exec`` waits at its end at most
    ``jorbmp._mailbox.CLOSE_TIMEOUT`` seconds (5) for the last update and ``close``,
    without blocking the loop (``exec_async``); a second Ctrl-C, or cancelling
    ``exec_async``, ends that wait at once. A listener that takes longer is left
    behind, with a WARNING; if a later run uses it meanwhile, that run's updates wait
    until the stuck call returns, and the earlier run's remaining calls are dropped.
    """

    def status_update(self, counts: list[StatusCount]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The run is over (complete, stopped or failed)."""


class NilStatusListener(StatusListener):
    """Ignores every update."""

    def status_update(self, counts: list[StatusCount]) -> None:
        pass


class StateMetrics:
    """Live counters for one state, turned into a `StatusCount` on demand."""

    __slots__ = (
        "_cpu",
        "_p95",
        "_p95_at",
        "_procs",
        "_rss",
        "_samples",
        "cpu_seconds",
        "delay_wait",
        "errors",
        "processed",
        "rate_limit",
        "rate_wait",
        "recent",
        "recycled",
        "total_seconds",
    )

    def __init__(self) -> None:
        self.processed = 0
        self.errors = 0
        self.total_seconds = 0.0  # busy slot-seconds: the sum of exec wall times
        self.recent: deque[float] = deque(maxlen=P95_WINDOW)  # exec wall times
        self.rate_wait = 0.0
        self.delay_wait = 0.0  # (`jorbmp._delays.DelayQueue` adds to it)
        # The state's rate limit's current rate per second (the lane sets it; None: no limit).
        self.rate_limit: Callable[[], float] | None = None
        self.cpu_seconds = 0.0  # CPU time of the state's processes, from the samples
        self.recycled = 0  # workers replaced by recycling
        self._samples: deque[tuple[float, int]] = deque()
        self._procs: dict[int, tuple[psutil.Process, float]] = {}  # pid -> (it, CPU seconds)
        self._cpu = 0.0
        self._rss = 0
        self._p95 = 0.0
        self._p95_at = -1  # `processed` when _p95 was computed

    def mean_seconds(self) -> float | None:
        """The mean exec wall time so far (None before the first)."""
        return self.total_seconds / self.processed if self.processed else None

    def record(self, seconds: list[float]) -> None:
        """Count a batch of finished execs, given their wall times."""
        self.processed += len(seconds)
        self.total_seconds += sum(seconds)
        self.recent.extend(seconds)

    def p95(self) -> float:
        if self._p95_at != self.processed and self.recent:
            ordered = sorted(self.recent)
            self._p95 = ordered[int(0.95 * (len(ordered) - 1))]
            self._p95_at = self.processed
        return self._p95

    def rate(self, now: float) -> float:
        samples = self._samples
        samples.append((now, self.processed))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_SECONDS:
            samples.popleft()
        t0, n0 = samples[0]
        return (self.processed - n0) / (now - t0) if now > t0 else 0.0

    def sample(self, pids: list[int], seconds: float, started: bool) -> None:
        """Refresh CPU% and RSS over ``pids`` (psutil): CPU time since the last sample,
        ``seconds`` ago.

        ``started``: the pids are processes started for this run, whose CPU time counts
        from zero, so all of it is new. Any other process seen for the first time only
        sets the baseline for the next sample.
        """
        cpu_seconds = 0.0
        rss = 0
        live: dict[int, tuple[psutil.Process, float]] = {}
        for pid in pids:
            known = self._procs.get(pid)
            try:
                proc = psutil.Process(pid) if known is None else known[0]
                times = proc.cpu_times()
                total = times.user + times.system
                if known is not None:
                    cpu_seconds += total - known[1]
                elif started:
                    cpu_seconds += total
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
            live[pid] = (proc, total)
        self._procs = live
        self._cpu = 100 * cpu_seconds / seconds if seconds > 0 else 0.0
        self._rss = rss
        self.cpu_seconds += cpu_seconds

    def snapshot(
        self,
        state: str,
        terminal: bool,
        count: int,
        executing: int,
        now: float,
        capacity_seconds: float,
        concurrency: int = 0,
    ) -> StatusCount:
        """``capacity_seconds``: the slot-seconds the state's limit allowed since the run
        started; ``concurrency``: its limit now."""
        return StatusCount(
            state=state,
            completed=count if terminal else 0,
            executing=executing,
            waiting=0 if terminal else count - executing,
            terminal=terminal,
            processed=self.processed,
            errors=self.errors,
            mean_seconds=self.mean_seconds() or 0.0,
            jobs_per_second=self.rate(now),
            cpu_percent=self._cpu,
            rss_bytes=self._rss,
            p95_seconds=self.p95(),
            rate_wait_seconds=self.rate_wait,
            rate_limit=self.rate_limit() if self.rate_limit is not None else 0.0,
            utilisation=min(1.0, self.total_seconds / capacity_seconds)
            if capacity_seconds
            else 0.0,
            concurrency=0 if terminal else concurrency,
            recycled=self.recycled,
            delay_wait_seconds=self.delay_wait,
        )
