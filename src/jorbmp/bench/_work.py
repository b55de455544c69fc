"""Module-level work functions and job types for the benchmarks (workers import them)."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ..state import KickRequest

# Iterations of `spin` per millisecond, set by `calibrate` in the coordinator and
# handed to workers through the overall context.
DEFAULT_SPINS_PER_MS = 20_000


class Item(msgspec.Struct, array_like=True):
    """The job context of every benchmark: tiny, so the engine's cost dominates."""

    n: int
    out: int = 0


class Work(msgspec.Struct):
    """Overall context: how much CPU work one job does."""

    spins: int = 0


def spin(spins: int) -> int:
    """Pure-Python CPU work (holds the GIL, like parsing or transforming does)."""
    acc = 0
    for i in range(spins):
        acc = (acc + i * i) % 1_000_003
    return acc


def calibrate(target_ms: float = 10.0) -> int:
    """Spins that take about ``target_ms`` on this machine now (median of 5 probes)."""
    probe = 200_000
    times = []
    for _ in range(5):
        start = time.perf_counter()
        spin(probe)
        times.append(time.perf_counter() - start)
    per_spin = sorted(times)[2] / probe
    return max(1, int(target_ms / 1000 / per_spin))


# -- plain tasks for the baselines ------------------------------------------------------


def noop_task(x: int) -> int:
    return x


def cpu_task(spins: int) -> int:
    return spin(spins)


def fan_out_task(n: int) -> list[int]:
    return [n * 10 + i for i in range(10)]


# -- exec functions -------------------------------------------------------------------


def to_middle(ac: Any, oc: Any, jc: Item) -> tuple[Item, str]:
    return jc, "middle"


def to_done(ac: Any, oc: Any, jc: Item) -> tuple[Item, str]:
    return jc, "done"


def cpu_to_done(ac: Any, oc: Work, jc: Item) -> tuple[Item, str]:
    jc.out = spin(oc.spins)
    return jc, "done"


def fan_out_10(ac: Any, oc: Any, jc: Item) -> tuple[Item, str, list[KickRequest[Item]]]:
    return jc, "done", [KickRequest(Item(n=jc.n * 10 + i), "child") for i in range(10)]
