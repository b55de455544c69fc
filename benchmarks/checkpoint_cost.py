"""Checkpoint cost: the same no-op pipeline with each checkpoint format.

Two process states, concurrency 2 each (new -> middle -> done), execs that do
nothing, N jobs: two transitions per job, so the engine's own cost dominates and
what a checkpoint format adds shows. Each round runs every format once, in turn
(so a noisy neighbour hits them all alike); the table gives the median and the best
wall time of ``Processor.exec`` (the first and the final checkpoint write
included), the ratio to no checkpoint at all, what that is per transition, the
size of the checkpoint and how long loading it back takes.

A second table shows why the incremental formats exist: the cost of one flush of
1,000 changed jobs (through the serializer's hooks, waiting for the disk, fsync
included) as the run grows. A JSON snapshot rewrites the whole run each time; the
journal and SQLite write what changed.

It reports; it asserts nothing (exit code 0).

    python benchmarks/checkpoint_cost.py [--jobs 10000 100000] [--rounds 3] [--flush-jobs ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

import jorbmp
from jorbmp import Processor, Run, State

FORMATS = ("nil", "json", "journal", "sqlite")


class Item(msgspec.Struct):
    n: int
    out: int = 0


def to_middle(ac: Any, oc: Any, jc: Item) -> Any:
    return jc, "middle"


def to_done(ac: Any, oc: Any, jc: Item) -> Any:
    jc.out = jc.n
    return jc, "done"


STATES = [
    State("new", to_middle, concurrency=2),
    State("middle", to_done, concurrency=2),
    State("done", terminal=True),
]


def serializer(kind: str, directory: Path) -> jorbmp.Serializer:
    if kind == "nil":
        return jorbmp.NilSerializer()
    cls = {
        "json": jorbmp.JsonSerializer,
        "journal": jorbmp.JournalSerializer,
        "sqlite": jorbmp.SqliteSerializer,
    }[kind]
    return cls(directory / f"run.{kind}", None, Item)  # type: ignore[no-any-return]


def measure(kind: str, jobs: int) -> tuple[float, int, float]:
    """(exec seconds, checkpoint bytes, load seconds) of one run."""
    run: Run[None, Item] = Run("bench", None, Item)
    for n in range(jobs):
        run.add_job(Item(n))
    with tempfile.TemporaryDirectory(prefix="jorbmp-checkpoint-cost-") as d:
        ser = serializer(kind, Path(d))
        start = time.perf_counter()
        Processor(None, STATES, ser).exec(run)
        wall = time.perf_counter() - start
        if kind == "nil":
            return wall, 0, 0.0
        path = Path(d) / f"run.{kind}"
        size = path.stat().st_size
        start = time.perf_counter()
        loaded = serializer(kind, Path(d)).deserialize()
        load = time.perf_counter() - start
        assert loaded == run, f"{kind}: the checkpoint does not hold the run"
        return wall, size, load


def flush_seconds(kind: str, jobs: int, changed: int = 1000, rounds: int = 5) -> float:
    """Median time of one final flush of ``changed`` jobs, for a run of ``jobs`` jobs."""
    run: Run[None, Item] = Run("bench", None, Item)
    for n in range(jobs):
        run.add_job(Item(n))
    with tempfile.TemporaryDirectory(prefix="jorbmp-checkpoint-cost-") as d:
        ser = serializer(kind, Path(d))
        ser.begin(run)
        try:
            ser.flush(run, final=True)  # the first write (SQLite and the journal write the run)
            times = []
            ids = iter(range(10**12))
            for _ in range(rounds):
                for _ in range(changed):
                    job = run.jobs[str(next(ids) % jobs)]
                    job.state = "middle" if job.state == "new" else "new"
                    ser.job_changed(job)
                start = time.perf_counter()
                ser.flush(run, final=True)
                times.append(time.perf_counter() - start)
        finally:
            ser.end()
    return statistics.median(times)


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument(
        "--flush-jobs", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
        help="run sizes for the flush-cost table (none: skip it)",
    )  # fmt: skip
    args = parser.parse_args()
    kinds = args.formats if "nil" in args.formats else ["nil", *args.formats]
    print(
        f"jorbmp {jorbmp.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} "
        f"cores, {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}"
    )
    header = ("jobs", "format", "median s", "best s", "x nil", "us/transition", "file", "load s")
    rows = []
    for jobs in args.jobs:
        walls: dict[str, list[float]] = {k: [] for k in kinds}
        sizes: dict[str, int] = {}
        loads: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                wall, size, load = measure(kind, jobs)
                walls[kind].append(wall)
                loads[kind].append(load)
                sizes[kind] = size
                print(f"  {jobs:>7,} {kind:<8} {wall:.3f}s", file=sys.stderr, flush=True)
        nil = statistics.median(walls["nil"])
        for kind in kinds:
            median = statistics.median(walls[kind])
            extra = (median - nil) / (2 * jobs) * 1e6
            rows.append((
                f"{jobs:,}",
                kind,
                f"{median:.3f}",
                f"{min(walls[kind]):.3f}",
                f"{median / nil:.2f}",
                "" if kind == "nil" else f"{extra:+.1f}",
                "" if kind == "nil" else f"{sizes[kind] / 1e6:.1f} MB",
                "" if kind == "nil" else f"{statistics.median(loads[kind]):.3f}",
            ))  # fmt: skip
    print_table(header, rows)
    written = [k for k in args.formats if k != "nil"]
    if args.flush_jobs and written:
        print("\none flush of 1,000 changed jobs (ms), by run size:")
        flush_rows = []
        for jobs in args.flush_jobs:
            flush_rows.append((
                f"{jobs:,}",
                *(f"{flush_seconds(kind, jobs) * 1000:.1f}" for kind in written),
            ))  # fmt: skip
        print_table(("jobs", *written), flush_rows)


if __name__ == "__main__":
    main()
