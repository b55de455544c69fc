"""The job types and execs of `dask_cluster.py`, in a module the Dask workers import."""

from __future__ import annotations

import hashlib
import os

import msgspec


class Settings(msgspec.Struct):  # OC: shipped to each Dask worker once
    rounds: int = 20_000


class Doc(msgspec.Struct):  # JC: what crosses to the cluster and back, per job
    n: int
    digest: str = ""
    worker_pid: int = 0
    summary: str = ""


def digest(ac: None, oc: Settings, jc: Doc) -> tuple[Doc, str]:
    """CPU-bound: runs on a Dask worker."""
    data = str(jc.n).encode()
    for _ in range(oc.rounds):
        data = hashlib.sha256(data).digest()
    jc.digest, jc.worker_pid = data.hex(), os.getpid()
    return jc, "summarize"


def summarize(ac: None, oc: Settings, jc: Doc) -> tuple[Doc, str]:
    """Cheap: runs in this machine's worker processes."""
    jc.summary = f"{jc.n}: {jc.digest[:12]} (Dask worker pid {jc.worker_pid})"
    return jc, "done"
