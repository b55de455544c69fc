"""CPU scaling: does a process state with concurrency N really use N cores?

Runs the same pure-Python, CPU-bound jobs (about 10 ms each, calibrated at start) four
ways, alternating, for a few rounds:

- serial: a plain loop in this process;
- jorbmp: a Run through a process state with ``concurrency`` workers, timed from the
  ``exec()`` call to its return (worker start-up and shut-down included);
- pool: ``ProcessPoolExecutor(concurrency).map`` (pool start-up included), the baseline
  of what multiprocessing can do without jorbmp's bookkeeping;
- split: ``concurrency`` plain processes that each loop over a fixed share of the jobs,
  with no messages at all. It shows what the machine gives two busy processes right now
  (shared or hyper-threaded cores often give well under ``concurrency`` x); having no
  load balancing, it can lose to the other two when one core is slowed by other work.

Prints medians and ratios. It reports; it does not assert (exit code 0).

    python benchmarks/cpu_scaling.py [--jobs 200] [--rounds 3] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import msgspec

from jorbmp import Processor, Run, State


class Overall(msgspec.Struct):
    loops: int  # iterations of the work loop per job


class Job(msgspec.Struct):
    n: int
    result: int = 0


def work(loops: int) -> int:
    """Pure-Python CPU work (holds the GIL the whole time): an LCG over ``loops`` steps."""
    x = 1
    for i in range(loops):
        x = (x * 1103515245 + 12345 + i) & 0x7FFFFFFF
    return x


def crunch(ac: object, oc: Overall, jc: Job) -> tuple[Job, str]:
    """The jorbmp exec: the same work, result kept in the job context."""
    jc.result = work(oc.loops)
    return jc, "done"


def calibrate(target_s: float) -> int:
    """Loop count for which one `work` call takes about ``target_s`` seconds."""
    loops = 10_000
    while True:
        started = time.perf_counter()
        work(loops)
        took = time.perf_counter() - started
        if took > 0.05:
            break
        loops *= 2
    best = min(_timed(lambda: work(loops)) for _ in range(3))
    return max(1, round(loops * target_s / best))


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_serial(jobs: int, loops: int) -> None:
    for _ in range(jobs):
        work(loops)


def run_jorbmp(jobs: int, loops: int, concurrency: int) -> None:
    run: Run[Overall, Job] = Run("cpu-scaling", overall=Overall(loops), job_type=Job)
    for i in range(jobs):
        run.add_job(Job(n=i))
    states = [
        State("new", crunch, kind="process", concurrency=concurrency),
        State("done", terminal=True),
    ]
    Processor(None, states).exec(run)
    if run.counts() != {"done": jobs}:
        print(f"warning: jorbmp run ended with {run.counts()}", file=sys.stderr)


def run_pool(jobs: int, loops: int, concurrency: int) -> None:
    with ProcessPoolExecutor(concurrency) as pool:
        for _ in pool.map(work, [loops] * jobs):
            pass


def _share(jobs: int, loops: int) -> None:
    for _ in range(jobs):
        work(loops)


def run_split(jobs: int, loops: int, concurrency: int) -> None:
    shares = [jobs // concurrency + (i < jobs % concurrency) for i in range(concurrency)]
    procs = [multiprocessing.Process(target=_share, args=(n, loops)) for n in shares]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def main() -> int:
    parser = argparse.ArgumentParser(description="CPU scaling of a jorbmp process state")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--job-ms", type=float, default=10.0, help="target time of one job")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # other work on the machine skews every figure below
    loops = calibrate(args.job_ms / 1000)
    one = min(_timed(lambda: work(loops)) for _ in range(5))
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {args.jobs} jobs of "
        f"{one * 1000:.1f} ms ({loops:,} loops), concurrency {args.concurrency}, "
        f"{args.rounds} rounds; load average before: {load:.2f}"
    )
    runners: dict[str, Callable[[], None]] = {
        "serial": lambda: run_serial(args.jobs, loops),
        f"jorbmp c={args.concurrency}": lambda: run_jorbmp(args.jobs, loops, args.concurrency),
        f"pool c={args.concurrency}": lambda: run_pool(args.jobs, loops, args.concurrency),
        f"split c={args.concurrency}": lambda: run_split(args.jobs, loops, args.concurrency),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        line = []
        for name, fn in runners.items():  # alternate, so drift hits every variant alike
            times[name].append(_timed(fn))
            line.append(f"{name} {times[name][-1]:.2f}s")
        print(f"round {r + 1}: " + ", ".join(line))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    serial, jorb, pool, split = med.values()
    print()
    print(
        f"{'variant':<14} {'median s':>9} {'min s':>7} {'max s':>7} {'jobs/s':>8} {'vs serial':>10}"
    )
    for name, ts in times.items():
        print(
            f"{name:<14} {med[name]:>9.3f} {min(ts):>7.3f} {max(ts):>7.3f} "
            f"{args.jobs / med[name]:>8.1f} {serial / med[name]:>9.2f}x"
        )
    print()
    print(f"jorbmp speedup vs serial: {serial / jorb:.2f}x (goal: >= 1.8x at concurrency 2)")
    print(f"jorbmp time / ProcessPoolExecutor time: {jorb / pool:.2f} (1.00 = same speed)")
    print(f"jorbmp time / static split time: {jorb / split:.2f} (split: {serial / split:.2f}x)")
    spread = max(max(ts) / min(ts) for ts in times.values())
    if spread > 1.2:
        print(
            f"note: the same variant's times differ by up to {spread - 1:.0%} between rounds; "
            "the machine is busy or throttled, so these ratios are rough (try more --rounds)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
