"""Module-level job types and exec functions for the Dask tests.

Dask workers are separate (spawned) processes: everything they run must be
importable by name, so it lives here rather than inside the test functions.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import msgspec

from jorbmp import KickRequest, RateLimitError


class DJob(msgspec.Struct):
    """The job context of the Dask tests."""

    n: int
    action: str = ""
    trail: list[str] = []
    pids: list[int] = []
    ac_ids: list[str] = []
    attempts: int = 0


class DOC(msgspec.Struct):
    """The overall context: a directory for marker files and a sleep per exec."""

    workdir: str = ""
    sleep: float = 0.0


class DAC:
    """An app context built once per process by `make_ac`."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.pid = os.getpid()


def make_ac() -> DAC:
    return DAC()


def failing_ac() -> DAC:
    raise RuntimeError("no credentials on this worker")


def _mark(ac: object, jc: DJob, step: str) -> None:
    jc.trail.append(step)
    jc.pids.append(os.getpid())
    jc.ac_ids.append(getattr(ac, "id", "") or "")


def first(ac: DAC, oc: DOC, jc: DJob) -> tuple[DJob, str]:
    _mark(ac, jc, "first")
    if oc.sleep:
        time.sleep(oc.sleep)
    return jc, "second"


def second(ac: DAC, oc: DOC, jc: DJob) -> tuple[DJob, str]:
    _mark(ac, jc, "second")
    return jc, "third"


def third(ac: DAC, oc: DOC, jc: DJob) -> tuple[DJob, str]:
    _mark(ac, jc, "third")
    return jc, "done"


def actions(ac: DAC, oc: DOC, jc: DJob) -> tuple[object, ...]:
    """Does what ``jc.action`` says; the exec contract's cases, one per action."""
    jc.attempts += 1
    _mark(ac, jc, "actions")
    if jc.action == "kick":
        kicks = [KickRequest(DJob(n=jc.n * 100 + i), "second") for i in range(3)]
        return jc, "second", kicks
    if jc.action == "raise":
        raise ValueError(f"bad input {jc.n}")
    if jc.action == "retry-once":
        if jc.attempts < 2:
            return jc, "new", None, "try again"
        return jc, "second"
    if jc.action == "rate-limited" and jc.attempts < 2:
        return jc, "new", None, RateLimitError("slow down", retry_after=0.05)
    if jc.action == "bad-state":
        return jc, "nowhere"
    if jc.action == "poison":
        os._exit(7)  # kills the Dask worker running it, every time
    if jc.action == "hang":
        time.sleep(3)
    return jc, "second"


def slow_or_marked(ac: DAC, oc: DOC, jc: DJob) -> tuple[DJob, str]:
    """Sleeps ``oc.sleep``; announces the first job it starts with a marker file."""
    _mark(ac, jc, "slow")
    marker = Path(oc.workdir) / "started"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
    time.sleep(oc.sleep)
    return jc, "second"


class LJob(msgspec.Struct):
    """A job whose exec notes its start and end (see `noted`)."""

    n: int
    sleep: float = 0.0
    freeze: bool = False
    kill: bool = False
    hold: float = 0.0
    runs: int = 0
    again: float = 0.0  # with it, a run after the first sleeps this long instead


class LOC(msgspec.Struct):
    log: str = ""


def _note(path: str, what: str, n: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {n} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def _first_run(log: str, n: int) -> bool:
    """Whether this is job ``n``'s first run: its marker beside ``log`` is new."""
    try:
        os.close(os.open(f"{log}.{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def noted(ac: object, oc: LOC, jc: LJob) -> tuple[LJob, str]:
    """Notes ``start n pid time`` and ``end ...`` in ``oc.log`` around a sleep. With
    ``freeze``, freezes its Dask worker as an exec holding the GIL does: its event loop
    runs nothing more (so no report leaves it), and the exec hangs. With ``kill``, kills
    its worker. With ``hold``, freezes its worker that many seconds, then returns (half
    a second in: the results of the exec before it have left that worker by then).
    With ``again``, a run after the first (one whose result was lost) sleeps ``again``."""
    _note(oc.log, "start", jc.n)
    sleep = jc.again if jc.again and not _first_run(oc.log, jc.n) else jc.sleep
    if jc.kill:
        os._exit(7)
    if jc.hold:
        time.sleep(0.5)
    if jc.freeze or jc.hold:
        from distributed import get_worker

        get_worker().loop.add_callback(time.sleep, jc.hold or 60)
        time.sleep(jc.hold or 60)
    time.sleep(sleep)
    jc.runs += 1
    _note(oc.log, "end", jc.n)
    return jc, "done"


def notes(path: Path) -> list[tuple[str, int, int, float]]:
    """The ``(what, n, pid, time)`` notes of `noted`, in the order written."""
    rows = []
    for line in path.read_text().splitlines():
        what, n, pid, at = line.split()
        rows.append((what, int(n), int(pid), float(at)))
    return rows
