"""Shared by test_journal.py and test_sqlite.py: job types, module-level execs (worker
processes import them by reference), and a coordinator to run in a subprocess and kill.

Run as ``python helpers_checkpoint.py KIND PATH JOBS`` it executes a run of ``JOBS``
slow jobs with the serializer class ``KIND`` (e.g. ``JournalSerializer``) at ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

import jorbmp
from jorbmp import KickRequest, Processor, Run, State

TESTS = Path(__file__).resolve().parent


class StopAfter(jorbmp.StatusListener):
    """Stops the processor once ``done`` jobs are in state done."""

    def __init__(self, done: int) -> None:
        self.done = done
        self.processor: Processor[Any, Any, Any] | None = None

    def status_update(self, counts: list[jorbmp.StatusCount]) -> None:
        if any(c.state == "done" and c.completed >= self.done for c in counts):
            assert self.processor is not None
            threading.Thread(target=self.processor.stop).start()


class OC(msgspec.Struct):
    workdir: str
    factor: int = 2


class JC(msgspec.Struct):
    n: int
    kicked: bool = False
    total: int = 0
    sleep: float = 0.0


class Rich(msgspec.Struct):
    """A context that exercises every encoding corner."""

    text: str = "h\u00e9llo \u2713 \u2028 \x00 'single' \"double\""
    big: int = 2**64 - 1
    neg: int = -(2**63)
    f: float = 0.1
    tiny: float = 5e-324
    huge: float = 1.7976931348623157e308
    raw: bytes = b"\x00\xff"
    nested: dict[str, list[int | None]] = msgspec.field(default_factory=lambda: {"a": [1, None]})
    when: datetime = datetime(2020, 1, 1, tzinfo=timezone.utc)
    opt: str | None = None


def rich_run() -> Run[Any, Rich]:
    run: Run[Any, Rich] = Run("rich \u2713", {"k": [1, 2]}, Rich)
    run.add_job(Rich())
    run.add_job(Rich(text="", big=0, opt="x"), state="odd state 'x'")
    run.jobs["1"].state_errors = {"odd state 'x'": ["error \u2713", "two"]}
    run.jobs["1"].parent = "0"
    odd = "id ' \" \u2713 ->0"
    run.jobs[odd] = jorbmp.Job(id=odd, context=Rich(), retries=2, kicks=3)
    return run


class OtherJC(msgspec.Struct):
    n: str


class OtherOC(msgspec.Struct):
    workdir: int


def work(ac: Any, oc: OC, jc: JC) -> Any:
    """Kicks a child once (n % 5), fails for good (n % 7), records a soft error (n % 3)."""
    if jc.sleep:
        time.sleep(jc.sleep)
    if jc.n % 5 == 0 and not jc.kicked:
        jc.kicked = True
        return jc, "new", [KickRequest(JC(n=jc.n + 10_000, kicked=True, sleep=jc.sleep), "finish")]
    if jc.n % 7 == 0:
        raise ValueError(f"job {jc.n} is unlucky")
    if jc.n % 3 == 0:
        return jc, "finish", None, "soft error"
    return jc, "finish"


def finish(ac: Any, oc: OC, jc: JC) -> Any:
    if jc.sleep:
        time.sleep(jc.sleep)
    jc.total = jc.n * oc.factor
    return jc, "done"


def loop(ac: Any, oc: OC, jc: JC) -> Any:
    """Comes back to its own state until it has gone round ``LOOPS`` times."""
    if jc.sleep:
        time.sleep(jc.sleep)
    jc.total += 1
    return jc, ("loop" if jc.total < LOOPS else "done")


LOOPS = 100


def states(concurrency: int = 2) -> list[State]:
    return [
        State("new", work, concurrency=concurrency, max_retries=1),
        State("finish", finish, concurrency=concurrency),
        State("done", terminal=True),
    ]


def make_run(jobs: int, sleep: float = 0.0) -> Run[OC, JC]:
    run: Run[OC, JC] = Run("checkpoint-test", OC(workdir="/data"), JC)
    for i in range(jobs):
        run.add_job(JC(n=i, sleep=sleep))
    return run


def expected_ids(jobs: int) -> set[str]:
    return {str(i) for i in range(jobs)} | {f"{i}->0" for i in range(0, jobs, 5)}


def check_complete(run: Run[OC, JC], jobs: int) -> None:
    """Every job id exactly as an uninterrupted run makes them, each terminal and right."""
    assert set(run.jobs) == expected_ids(jobs)
    assert len(run.jobs) == len(expected_ids(jobs))
    for job in run.jobs.values():
        n = job.context.n
        if job.id.endswith("->0"):
            assert job.parent == job.id[:-3]
            assert (job.state, job.context.total) == ("done", n * 2), job
        elif n % 7 == 0:
            assert job.state == jorbmp.FAILED, job
            assert job.state_errors["new"] == [f"ValueError: job {n} is unlucky"] * 2
        else:
            assert (job.state, job.context.total) == ("done", n * 2), job
            if n % 3 == 0:
                assert job.state_errors == {"new": ["soft error"]}


def serializer(kind: str, path: Path, **kwargs: Any) -> Any:
    return getattr(jorbmp, kind)(path, OC, JC, **kwargs)


def start_child(kind: str, path: Path, jobs: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    return subprocess.Popen(
        [sys.executable, str(TESTS / "helpers_checkpoint.py"), kind, str(path), str(jobs)],
        env=env,
        start_new_session=True,  # the test can clean up orphaned workers by group
    )


def kill_9_then_resume(kind: str, path: Path, jobs: int = 400) -> None:
    """SIGKILL a coordinator subprocess once the checkpoint shows progress, then resume
    the run from the checkpoint to completion and check it (ids exact, all terminal)."""
    child = start_child(kind, path, jobs)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert child.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no progress in the checkpoint"
            try:
                if serializer(kind, path).deserialize().counts().get("done", 0) >= 40:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        loaded = serializer(kind, path).deserialize()
        assert 0 < loaded.counts().get("done", 0) < len(loaded.jobs)
        Processor(None, states(), serializer(kind, path)).exec(loaded)
        check_complete(loaded, jobs)
        check_complete(serializer(kind, path).deserialize(), jobs)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # orphaned workers, if any


def main() -> None:
    kind, path, jobs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    run = make_run(jobs, sleep=0.004)
    jorbmp.Processor(None, states(), serializer(kind, path, interval=0.05)).exec(run)


if __name__ == "__main__":
    # Import this file as `helpers_checkpoint`, so workers pickle the execs by that name.
    import helpers_checkpoint

    helpers_checkpoint.main()
