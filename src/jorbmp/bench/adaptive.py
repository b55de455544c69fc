"""The ``adaptive`` scenario: `AdaptiveConcurrency` against the best fixed concurrency,
found by a sweep in the same run, and against the fixed ``max`` (issue 17).

1. Remote capacity, async state: a service that serves K=8 calls at once in 20 ms;
   beyond that a call takes ``20 ms x (in flight / 8) ** 2`` (its in-flight count when
   it starts). Best fixed is 8, ~400 jobs/s. ``AdaptiveConcurrency(1, 256)``, 4,000 jobs.
   Target: at least 0.85 of the best fixed, and at least 3x the fixed 256.
2. A contended device, process state: the same shape across processes, a shared
   counter of running execs (inherited under fork), K=4, 20 ms sleeps.
   ``AdaptiveConcurrency(1, 64)``. Target: at least 0.85 of the best fixed, and at
   least 2x the fixed 64.

A fixed sweep point runs for `SWEEP_SECONDS` of work (its jobs: what it would finish
in that time at the model's pace); the fixed ``max`` runs ``max`` jobs, each of which
then takes the model's overloaded time. The adaptive run is timed whole, from
``exec()`` to its return, so the time it takes to find the limit counts against it.
It also reports the limit it settled at (the last status) and when its throughput,
over a sliding second, first came within 10% of the best fixed.
"""

from __future__ import annotations

import asyncio
import bisect
import multiprocessing
import time
from typing import Any

import msgspec

from ..adaptive import AdaptiveConcurrency
from ..processor import Processor
from ..run import Run
from ..state import State
from ..status import StatusCount, StatusListener
from .suite import Row

__all__ = ["scenario"]

BASE_SECONDS = 0.02
SWEEP_SECONDS = 2.0
QUICK_SWEEP_SECONDS = 0.5
TARGET_OF_BEST = 0.85


class Call(msgspec.Struct, array_like=True):
    n: int


class Model(msgspec.Struct):
    """The service's capacity and base latency (the overall context)."""

    k: int
    base: float = BASE_SECONDS


def latency(model: Model, inflight: int) -> float:
    return model.base * max(1.0, (inflight / model.k) ** 2)


class _Async:
    """The async service's state (the app context): in flight, and finish times."""

    def __init__(self) -> None:
        self.inflight = 0
        self.ends: list[float] = []


async def call_service(ac: _Async, oc: Model, jc: Call) -> tuple[Call, str]:
    ac.inflight += 1
    try:
        await asyncio.sleep(latency(oc, ac.inflight))
    finally:
        ac.inflight -= 1
    ac.ends.append(time.perf_counter())
    return jc, "done"


# The process scenario's shared count of running execs: created before the workers
# fork, so every worker inherits the same one.
_RUNNING: Any = None


def use_device(ac: Any, oc: Model, jc: Call) -> tuple[Call, str]:
    with _RUNNING.get_lock():
        _RUNNING.value += 1
        inflight = _RUNNING.value
    try:
        time.sleep(latency(oc, inflight))
    finally:
        with _RUNNING.get_lock():
            _RUNNING.value -= 1
    return jc, "done"


class _Ends(StatusListener):
    """Finished execs over time, from the status (for the process scenario, whose
    execs run elsewhere)."""

    def __init__(self) -> None:
        self.points: list[tuple[float, int, int]] = []  # (time, processed, limit)

    def status_update(self, counts: list[StatusCount]) -> None:
        self.points.append((time.perf_counter(), counts[0].processed, counts[0].concurrency))


def _measure(
    kind: str, model: Model, concurrency: int | AdaptiveConcurrency, jobs: int
) -> tuple[float, _Ends, float]:
    """jobs/s of one run (exec() to return), what its status showed, and its start."""
    run: Run[Model, Call] = Run("adaptive", model, Call)
    for n in range(jobs):
        run.add_job(Call(n))
    listener = _Ends()
    if kind == "async":
        state = State("new", call_service, concurrency=concurrency)
        ac: Any = _Async()
    else:
        state = State("new", use_device, concurrency=concurrency, kind="process")
        ac = None
    states = [state, State("done", terminal=True)]
    t0 = time.perf_counter()
    Processor(ac, states, status_listener=listener).exec(run)
    wall = time.perf_counter() - t0
    return jobs / wall, listener, t0


def _within(listener: _Ends, t0: float, best: float) -> float | None:
    """Seconds from the start until throughput over a sliding second first came within
    10% of ``best`` (None: never)."""
    points = listener.points
    times = [p[0] for p in points]
    for i, (t, done, _) in enumerate(points):
        j = bisect.bisect_left(times, t - 1.0)
        if j < i and t - times[j] >= 0.5:
            rate = (done - points[j][1]) / (t - times[j])
            if rate >= 0.9 * best:
                return t - t0
    return None


def _scenario(
    kind: str, k: int, maximum: int, sweep: tuple[int, ...], jobs: int, quick: bool
) -> list[Row]:
    model = Model(k)
    seconds = QUICK_SWEEP_SECONDS if quick else SWEEP_SECONDS
    fixed: dict[int, float] = {}
    for c in sweep:  # each for about `seconds` at the model's pace
        pace = c / latency(model, c)
        fixed[c] = _measure(kind, model, c, max(c, round(pace * seconds)))[0]
    best_c = max(fixed, key=lambda c: fixed[c])
    best = fixed[best_c]
    at_max = _measure(kind, model, maximum, maximum)[0]
    spec = AdaptiveConcurrency(1, maximum)
    n = jobs // 4 if quick else jobs
    adaptive, listener, t0 = _measure(kind, model, spec, n)
    settled = listener.points[-1][2] if listener.points else 0
    within = _within(listener, t0, best)
    what = "async state, a service of capacity" if kind == "async" else "process state, a device of"
    title = (
        f"adaptive: {what} K={k} (20 ms, x (in flight/K)^2 beyond), "
        f"AdaptiveConcurrency(1, {maximum}) x {n:,}"
    )
    extra = {
        "fixed_sweep_jobs_per_s": {str(c): round(v, 1) for c, v in fixed.items()},
        "best_fixed": best_c,
        "settled_limit": settled,
        "seconds_to_within_10pct": None if within is None else round(within, 2),
    }
    floor = 3.0 if kind == "async" else 2.0
    return [
        Row(
            f"{title}: jobs/s vs best fixed ({best_c})",
            adaptive,
            "jobs/s",
            f"fixed {best_c} (best of {list(sweep)})",
            best,
            adaptive / best,
            f">= {TARGET_OF_BEST} of best",
            adaptive >= TARGET_OF_BEST * best,
            extra,
        ),
        Row(
            f"{title}: jobs/s vs fixed max",
            adaptive,
            "jobs/s",
            f"fixed {maximum}",
            at_max,
            adaptive / at_max,
            f">= {floor:g}x fixed {maximum}",
            adaptive >= floor * at_max,
            {"settled_limit": settled},
        ),
        Row(
            f"{title}: settled limit (best fixed {best_c})",
            float(settled),
            "execs at once",
            extra=extra,
        ),
        Row(
            f"{title}: seconds to within 10% of best fixed",
            -1.0 if within is None else within,
            "s",
            extra=extra,
        ),
    ]


def scenario(quick: bool, rounds: int) -> list[Row]:
    """Both scenarios, once (each is a sweep and two more runs)."""
    global _RUNNING
    rows = _scenario("async", 8, 256, (4, 6, 8, 10, 12, 16), 4000, quick)
    _RUNNING = multiprocessing.get_context("fork").Value("i", 0)
    rows += _scenario("process", 4, 64, (2, 3, 4, 5, 6, 8), 2000, quick)
    return rows
