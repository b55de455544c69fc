"""Exec functions and types for the worker-recycling tests (module level: under spawn
and forkserver, workers import them by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec

from jorbmp import KickRequest

# What `work` leaks: it lives as long as its worker does.
_LEAKED: list[bytes] = []


class ROC(msgspec.Struct):
    """The overall context: where execs log, and what they do."""

    log: str  # each exec appends "KEY PID" to it as it starts, in one write
    leak: int = 0  # bytes each exec leaks (every page written)
    sleep: float = 0.0
    die: int = -1  # the job whose first attempt kills its worker (os._exit(3))
    hang: int = -1  # the job whose exec sleeps far past any timeout
    kick: bool = False  # jobs of "new" kick one child into "child"
    wait_for: str = ""  # a file each exec waits for (at most 20 s) before it returns
    pidfile: str = ""  # where each exec writes its pid first


class RJob(msgspec.Struct):
    n: int
    child: bool = False

    def key(self) -> str:
        return f"{self.n}{'c' if self.child else ''}"


def work(ac: Any, oc: ROC, jc: RJob) -> tuple[RJob, str, list[KickRequest[RJob]] | None]:
    fd = os.open(oc.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{jc.key()} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    if oc.pidfile:  # (whole or not at all: a reader polls for it)
        Path(oc.pidfile + ".tmp").write_text(str(os.getpid()))
        os.replace(oc.pidfile + ".tmp", oc.pidfile)
    if oc.leak:
        _LEAKED.append(b"\x01" * oc.leak)
    if jc.n == oc.die and not jc.child:
        marker = Path(oc.log + f".died-{jc.n}")
        if not marker.exists():
            marker.touch()
            os._exit(3)
    if jc.n == oc.hang and not jc.child:
        time.sleep(60)
    if oc.wait_for:
        deadline = time.monotonic() + 20
        while not os.path.exists(oc.wait_for) and time.monotonic() < deadline:
            time.sleep(0.005)
    if oc.sleep:
        time.sleep(oc.sleep)
    kicks = [KickRequest(RJob(jc.n, child=True), "child")] if oc.kick and not jc.child else None
    return jc, "done", kicks


def executions(log: str) -> list[tuple[str, int]]:
    """(job key, pid) of every exec that started, in order."""
    lines = Path(log).read_text().splitlines() if os.path.exists(log) else []
    return [(key, int(pid)) for key, pid in (line.split() for line in lines)]
