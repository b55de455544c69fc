"""jorbmp on a Dask cluster: the CPU-heavy state runs on the cluster, the rest here.

    new --(digest, on Dask)--> summarize --(local worker processes)--> done

The coordinator, the checkpoint (demo-output/dask.journal) and the progress bars stay
on this machine; only `digest`'s execs go to the cluster. Press Ctrl-C at any time and
run it again to resume, with or without the cluster.

    python examples/dask_cluster.py                        # starts a LocalCluster here
    python examples/dask_cluster.py tcp://scheduler:8786   # an existing cluster

The workers must be able to import jorbmp, msgspec and the module that defines the
execs and the context types: here `hashing.py`, beside this script (a LocalCluster's
workers share this interpreter's path; on a real cluster, install it there).
Needs ``pip install 'jorbmp[dask]'``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from distributed import LocalCluster
from hashing import Doc, Settings, digest, summarize

from jorbmp import JournalSerializer, Processor, Run, State, TqdmStatusListener
from jorbmp.dask import DaskBackend

CHECKPOINT = Path("demo-output") / "dask.journal"


def main() -> None:
    address = sys.argv[1] if len(sys.argv) > 1 else None
    cluster = None
    if address is None:
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
        )
    backend = DaskBackend(address or cluster)
    serializer = JournalSerializer(CHECKPOINT, overall_type=Settings, job_type=Doc)
    try:
        run = serializer.deserialize()
        print(f"resuming {run}")
    except FileNotFoundError:
        run = Run("dask-demo", Settings(), Doc)
        for n in range(2_000):
            run.add_job(Doc(n))
    states = [
        # concurrency: how many of this state's tasks run on the cluster at once
        # (one job at a time each); use about the cluster's thread count.
        State("new", digest, concurrency=2, backend=backend),
        State("summarize", summarize, concurrency=2),
        State("done", terminal=True),
    ]
    proc = Processor(None, states, serializer, TqdmStatusListener())
    try:
        proc.exec(run)
    finally:
        if cluster is not None:
            cluster.close()
    print(proc.last_report)
    pids = {job.context.worker_pid for job in run.jobs.values()}
    print(f"{len(run.jobs)} jobs done on {len(pids)} Dask worker processes; e.g.")
    print("  " + run.jobs["0"].context.summary)


if __name__ == "__main__":
    main()
