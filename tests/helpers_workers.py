"""Module-level job types, exec functions and a coordinator script for the worker tests.

Everything a worker process needs must be importable by name under the ``spawn``
start method, so it lives here rather than inside the test functions. Run as a
script (``python -c "import helpers_workers as h; h.main()" ARGS``) it is a small
coordinator used by the signal tests in ``test_stopping.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

import msgspec

from jorbmp import JsonSerializer, KickRequest, Processor, Run, State, StatusCount, StatusListener


class WJob(msgspec.Struct):
    """The job context of these tests."""

    n: int
    action: str = ""
    pid: int = 0
    value: int = 0


class WOC(msgspec.Struct):
    """The overall context: where marker files go and how long the slow execs sleep."""

    workdir: str
    sleep: float = 0.0


def _marker(oc: WOC, name: str) -> Path:
    return Path(oc.workdir) / name


def _first_time(oc: WOC, name: str) -> bool:
    """True exactly once per marker name (creates the marker atomically)."""
    try:
        fd = os.open(_marker(oc, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def write_pid(path: Path) -> None:
    """Write our pid so that a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)


def work(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    """A process exec whose behaviour depends on ``jc.action``; ends in "done"."""
    jc.pid = os.getpid()
    action = jc.action
    if action == "exit_always" or (action == "exit_once" and _first_time(oc, f"exit-{jc.n}")):
        os._exit(1)
    elif action == "sigkill_once":
        pidfile = _marker(oc, f"pid-{jc.n}")
        if not pidfile.exists():
            write_pid(pidfile)
            time.sleep(30)  # the test kills us meanwhile
    elif action == "term_once":
        pidfile = _marker(oc, f"pid-{jc.n}")
        if not pidfile.exists():
            write_pid(pidfile)
            time.sleep(5)  # the test sends SIGTERM meanwhile; this should never end
    elif action == "segv":
        faulthandler.disable()  # keep the test output small; the signal still kills us
        ctypes.string_at(0)
    elif action == "sleep_once":
        pidfile = _marker(oc, f"pid-{jc.n}")
        if not pidfile.exists():
            write_pid(pidfile)
            time.sleep(30)  # the state's timeout kills us meanwhile
    jc.value = jc.n * jc.n
    return jc, "done"


async def async_work(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    """Async version of `work` for timeouts: "sleep_once" hangs on its first attempt."""
    jc.pid = os.getpid()
    if jc.action == "sleep_once" and _first_time(oc, f"async-{jc.n}"):
        await asyncio.sleep(30)
    await asyncio.sleep(0)
    jc.value = jc.n * jc.n
    return jc, "done"


def spin(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    """Returns the job to its own state forever, unless ``jc.action == "finish"``."""
    time.sleep(oc.sleep)
    jc.pid = os.getpid()
    jc.value += 1
    if jc.action == "finish":
        return jc, "done"
    return jc, "spin"


def spin_finish(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    """The "spin" state after a code fix: moves every job to "done"."""
    jc.pid = os.getpid()
    jc.value += 1
    return jc, "done"


def record_pid(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    jc.pid = os.getpid()
    return jc, "done"


# -- app contexts built by a factory ------------------------------------------------


class LockedAC:
    """An app context that cannot be pickled (it holds a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tag = 7


def make_locked_ac() -> LockedAC:
    return LockedAC()


def broken_factory() -> LockedAC:
    raise ValueError("no database today")


def use_locked_ac(ac: LockedAC, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    with ac.lock:
        jc.value = ac.tag + jc.n
    jc.pid = os.getpid()
    return jc, "done"


# -- a small pipeline for comparing start methods -----------------------------------


def pipe_square(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str, list[KickRequest], str | None]:
    jc.value = jc.n * jc.n
    kicks = [KickRequest(WJob(n=jc.n * 100), "child")] if jc.n % 3 == 0 else []
    error = f"note for {jc.n}" if jc.n % 4 == 0 else None
    return jc, "plus", kicks, error


async def pipe_plus(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    await asyncio.sleep(0)
    jc.value += 1
    return jc, "done"


def pipe_child(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    if jc.action != "retried":
        jc.action = "retried"
        return jc, "child", None, "first try"
    jc.value = -jc.n
    return jc, "done"


def pipeline_states() -> list[State]:
    return [
        State("new", pipe_square, concurrency=2),
        State("plus", pipe_plus, concurrency=3),
        State("child", pipe_child, kind="thread", concurrency=2),
        State("done", terminal=True),
    ]


class Recorder(StatusListener):
    """Keeps every status update (coordinator side only)."""

    def __init__(self) -> None:
        self.updates: list[list[StatusCount]] = []

    def status_update(self, counts: list[StatusCount]) -> None:
        self.updates.append(list(counts))

    def final(self, state: str) -> StatusCount:
        return next(c for c in self.updates[-1] if c.state == state)


# -- the coordinator script used by the signal tests ----------------------------------


def slow(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    """Announces its start with a marker file, then sleeps ``oc.sleep`` seconds."""
    _marker(oc, f"started-{jc.n}").touch()
    time.sleep(oc.sleep)
    jc.pid = os.getpid()
    jc.value = jc.n * jc.n
    return jc, "done"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("workdir")
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--sleep", type=float, default=0.1)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--mp", default="fork")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    serializer = JsonSerializer(args.checkpoint, WOC, WJob, interval=0.1)
    try:
        run = serializer.deserialize()
        run.overall = WOC(args.workdir, args.sleep)  # the OC is the run's; new sleep for tests
    except FileNotFoundError:
        run = Run("signals", WOC(args.workdir, args.sleep), WJob)
        for n in range(args.jobs):
            run.add_job(WJob(n=n))
    states = [
        State("new", slow, concurrency=args.concurrency),
        State("done", terminal=True),
    ]
    proc = Processor(None, states, serializer, mp_context=args.mp, grace_period=args.grace)
    Path(args.workdir, "coordinator-ready").touch()
    proc.exec(run)
    print("COMPLETE", flush=True)


if __name__ == "__main__":
    main()


def collect_and_count_faults(ac: object, oc: WOC, jc: WJob) -> tuple[WJob, str]:
    """A full garbage collection in the worker; ``value``: the page faults it caused."""
    import gc
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    gc.collect()
    jc.value = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    jc.pid = os.getpid()
    return jc, "done"
