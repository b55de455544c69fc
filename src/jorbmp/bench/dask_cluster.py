"""The ``dask`` scenario: a state on a `distributed.LocalCluster` (2 worker processes,
one thread each) against ``client.map`` per item and against serial work.

On 2 cores the scheduler, the client and the nannies share the cores with the two
workers, and each task costs a round trip of about 10 ms: ``client.map`` of the same
CPU work is the measure of what Dask itself allows here."""

from __future__ import annotations

import logging
import statistics
import sys
import time
from typing import Any

from .. import Processor, State
from ..dask import DaskBackend
from . import _work
from .suite import Row, bench_run, cpu_serial_seconds


def _dask_seconds(client: Any, jobs: int, exec_fn: Any, spins: int = 0) -> float:
    """A one-state run of ``jobs`` jobs through ``exec_fn`` on the cluster, concurrency 2."""
    run = bench_run("dask", jobs, _work.Work(spins))
    states = [
        State("new", exec_fn, concurrency=2, backend=DaskBackend(client)),
        State("done", terminal=True),
    ]
    start = time.perf_counter()
    Processor(None, states).exec(run)
    return time.perf_counter() - start


def _map_seconds(client: Any, tasks: int, spins: int | None = None) -> float:
    """``client.map`` with one task per item: no-op tasks, or ``spins`` of CPU work each."""
    start = time.perf_counter()
    if spins is None:
        futures = client.map(_work.noop_task, range(tasks), pure=False)
    else:
        futures = client.map(_work.cpu_task, [spins] * tasks, pure=False)
    client.gather(futures)
    del futures
    return time.perf_counter() - start


def scenario(quick: bool, rounds: int) -> list[Row]:
    try:
        import distributed
    except ImportError:
        print("  dask: skipped, 'distributed' is not installed (jorbmp[dask])", file=sys.stderr)
        return []
    jobs = 2_000 if quick else 10_000
    tasks = 500 if quick else 2_000  # client.map manages a few hundred a second
    cpu_jobs = 100 if quick else 200
    spins = _work.calibrate(10.0)
    noop: list[float] = []
    mapped: list[float] = []
    serial: list[float] = []
    cpu: list[float] = []
    cpu_mapped: list[float] = []
    cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL + 10,  # its shutdown tracebacks are noise here
    )
    client = distributed.Client(cluster, set_as_default=False)  # type: ignore[no-untyped-call]
    with cluster, client:
        client.wait_for_workers(2)
        _map_seconds(client, 100)  # warm the workers' imports
        for _ in range(rounds):  # alternate so that drift hits every contender alike
            noop.append(_dask_seconds(client, jobs, _work.to_done))
            mapped.append(_map_seconds(client, tasks))
            serial.append(cpu_serial_seconds(cpu_jobs, spins))
            cpu.append(_dask_seconds(client, cpu_jobs, _work.cpu_to_done, spins))
            cpu_mapped.append(_map_seconds(client, cpu_jobs, spins))
    rate, map_rate = jobs / statistics.median(noop), tasks / statistics.median(mapped)
    speedup = statistics.median(s / c for s, c in zip(serial, cpu, strict=True))
    map_speedup = statistics.median(s / c for s, c in zip(serial, cpu_mapped, strict=True))
    return [
        Row(
            f"dask no-op {jobs:,} jobs, LocalCluster 2x1",
            rate,
            "jobs/s",
            "client.map per item",
            map_rate,
            rate / map_rate,
            ">= 10x client.map",
            rate / map_rate >= 10,
            {"client_map_tasks": tasks},
        ),
        Row(
            f"dask cpu {cpu_jobs} x 10 ms, concurrency 2",
            speedup,
            "x vs serial",
            "client.map per job",
            map_speedup,
            speedup / map_speedup,
            ">= 1.8x serial",
            speedup >= 1.8,
            {
                "serial_s": statistics.median(serial),
                "jorbmp_s": statistics.median(cpu),
                "client_map_s": statistics.median(cpu_mapped),
            },
        ),
    ]
