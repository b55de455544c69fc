"""Reliability of the Dask backend (`jorbmp.dask`), on real clusters (issue 15).

- Job types that would reach the workers by value (defined in ``__main__``) are
  refused before anything runs; a worker that decodes contexts differently from the
  coordinator fails the state instead of silently resetting every context.
- Ctrl-C and SIGTERM work while a Dask state connects to a scheduler that never
  answers, and ``connect_timeout`` holds there.
- A timeout counts from the moment the exec starts on the worker: jobs queued behind
  a hung exec are not charged, and an abandoned exec keeps its slot.

Scripts that must run as ``__main__``, or receive signals, run in subprocesses.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import helpers_dask as h
import msgspec
import pytest

from jorbmp import Processor, Run, State, Stopped
from jorbmp.dask import DaskBackend

HERE = Path(__file__).parent


def python_env(*paths: Path) -> dict[str, str]:
    """The environment for a subprocess: ``paths`` first, then this one's path."""
    parts = [str(p) for p in paths] + [str(HERE)]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts)}


def run_script(tmp_path: Path, code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(),
        cwd=tmp_path,
    )


# -- item 1: job types that cannot travel -------------------------------------------------


MAIN_TYPES_SCRIPT = """
    import logging
    import distributed, msgspec
    from jorbmp import Processor, Run, State
    from jorbmp.dask import DaskBackend
    import main_exec


    class K(msgspec.Struct):
        url: str = ""
        size: int = 0


    if __name__ == "__main__":
        run = Run("m", None, K)
        for i in range(5):
            run.add_job(K(url=f"https://example.org/{i}", size=i + 1))
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=":0", host="127.0.0.1",
                                      silence_logs=logging.CRITICAL) as cluster:
            states = [State("new", main_exec.passthrough, backend=DaskBackend(cluster)),
                      State("done", terminal=True)]
            try:
                Processor(None, states).exec(run)
                print("RESULT completed", run.counts(), run.jobs["0"].context)
            except ValueError as exc:
                print("RESULT ValueError", exc)
            print("COUNTS", run.counts(), run.jobs["3"].context)
"""


@pytest.mark.timeout(60)
def test_job_type_in_main_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """A job type with defaults defined in the script's ``__main__`` (d14): 9baee05
    'completed' the run with every context reset to its defaults."""
    # The exec is importable (beside the script), so the job type is what is refused.
    (tmp_path / "main_exec.py").write_text("def passthrough(ac, oc, jc):\n    return jc, 'done'\n")
    proc = run_script(tmp_path, MAIN_TYPES_SCRIPT, timeout=50)
    out = proc.stdout + proc.stderr
    assert "RESULT ValueError" in proc.stdout, out
    assert "__main__.K" in proc.stdout and "importable module" in proc.stdout, out
    # Nothing ran: the jobs are where they were, with their contexts intact.
    assert "COUNTS {'new': 5} K(url='https://example.org/3', size=4)" in proc.stdout, out


class LocalJob(msgspec.Struct):
    n: int = 0


@pytest.mark.timeout(30)
def test_types_that_travel_by_value_are_refused_without_connecting() -> None:
    """A job type or OC type defined inside a function would travel by value too; the
    ValueError comes before any connection (the address here has no scheduler)."""

    class Inner(msgspec.Struct):
        n: int = 0

    dask = DaskBackend("tcp://127.0.0.1:9", connect_timeout=1)
    states = [State("new", h.first, backend=dask), State("second", terminal=True)]
    run: Run[None, Inner] = Run("local", None, Inner)
    run.add_job(Inner(n=1))
    with pytest.raises(ValueError, match=r"state 'new': the job type .*Inner is defined inside"):
        Processor(None, states).exec(run)
    assert run.counts() == {"new": 1}

    class OC(msgspec.Struct):
        workdir: str = ""

    run2: Run[OC, h.DJob] = Run("local-oc", OC(workdir="/x"), h.DJob)
    run2.add_job(h.DJob(n=1))
    with pytest.raises(ValueError, match=r"the OC type .*OC is defined inside a function"):
        Processor(None, states).exec(run2)
    assert run2.counts() == {"new": 1}


SKEW_HERE = """
import msgspec


class Skewed(msgspec.Struct):
    url: str = ""
    size: int = 0


def hop(ac, oc, jc):
    return jc, "done"
"""

# The same module as the Dask worker sees it: one field fewer.
SKEW_THERE = """
import msgspec


class Skewed(msgspec.Struct):
    url: str = ""


def hop(ac, oc, jc):
    return jc, "done"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def skewed_worker(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An in-process scheduler and one Dask worker process that imports the module
    ``skew_types`` from another directory, where its job type lacks a field. Yields
    the scheduler's address and this side's directory."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "skew_types.py").write_text(SKEW_HERE)
    (there / "skew_types.py").write_text(SKEW_THERE)
    with distributed.LocalCluster(
        n_workers=0,
        processes=False,
        host="127.0.0.1",
        scheduler_port=free_port(),
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    ) as cluster:
        address = cluster.scheduler_address
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address,
             "--nthreads", "1", "--no-nanny", "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=python_env(there),
            cwd=there,
        )  # fmt: skip
        try:
            with distributed.Client(address, set_as_default=False) as client:
                client.wait_for_workers(1, timeout=30)
            yield address, str(here)
        finally:
            worker.kill()
            worker.wait()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", [1, 0], ids=["first-job-set", "first-job-at-default"])
def test_worker_decoding_contexts_differently_fails_the_state(
    skewed_worker: tuple[str, str], monkeypatch: pytest.MonkeyPatch, first: int
) -> None:
    """The worker's job type has lost a field (as a type sent by value does): 9baee05
    completed the run with every ``size`` reset to 0; now the state fails, clearly,
    and no job changed. Also when the first jobs hold the field's default, which the
    value this process decodes from the worker's encoding fills in."""
    address, here = skewed_worker
    monkeypatch.syspath_prepend(here)
    import skew_types

    run: Run[None, skew_types.Skewed] = Run("skew", None, skew_types.Skewed)
    for i in range(6):
        run.add_job(skew_types.Skewed(url=f"u{i}", size=i + first))
    states = [
        State("new", skew_types.hop, concurrency=2, backend=DaskBackend(address)),
        State("done", terminal=True),
    ]
    with pytest.raises(RuntimeError, match="decodes job contexts differently") as info:
        Processor(None, states).exec(run)
    assert "Skewed(url='u" in str(info.value) and "arrives there as Skewed(" in str(info.value)
    assert run.counts() == {"new": 6}
    assert [job.context.size for job in run.jobs.values()] == [i + first for i in range(6)]


SET_TYPES = """
import msgspec


class Tagged(msgspec.Struct):
    tags: set[str] = set()
    runs: int = 0


def touch(ac, oc, jc):
    jc.runs += 1
    return jc, "done"
"""


@pytest.mark.timeout(60)
def test_a_set_in_another_order_is_not_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set encodes in another order in another process (string hashing differs): the
    check compares values then, and the run completes, every job run once."""
    (tmp_path / "set_types.py").write_text(SET_TYPES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", python_env(tmp_path)["PYTHONPATH"])
    import set_types

    run: Run[None, set_types.Tagged] = Run("sets", None, set_types.Tagged)
    for i in range(40):
        run.add_job(set_types.Tagged(tags={f"t{i}-{k}" for k in range(30)}))
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        dashboard_address=":0",
        host="127.0.0.1",
        silence_logs=logging.CRITICAL,
    ) as cluster:
        states = [
            State("new", set_types.touch, concurrency=8, backend=DaskBackend(cluster, max_batch=1)),
            State("done", terminal=True),
        ]
        Processor(None, states).exec(run)
    assert run.counts() == {"done": 40}
    for i, job in enumerate(run.jobs.values()):
        assert job.context.tags == {f"t{i}-{k}" for k in range(30)}
        assert job.context.runs == 1 and not job.recorded_errors()


# -- item 3: signals while a Dask state connects -------------------------------------------


@pytest.fixture
def mute_peer() -> Iterator[str]:
    """An address that accepts TCP connections and never says a word."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(100)
        yield f"tcp://127.0.0.1:{srv.getsockname()[1]}"


CONNECT_SIGNAL_SCRIPT = """
    import os, signal, socket, sys, threading, time
    import helpers_dask as h
    from jorbmp import JournalSerializer, Processor, Run, State
    from jorbmp.dask import DaskBackend

    if __name__ == "__main__":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(100)
        address = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
        run = Run("c", h.DOC(), h.DJob)
        run.add_job(h.DJob(n=0))
        ser = JournalSerializer("run.journal", overall_type=h.DOC, job_type=h.DJob)
        states = [State("new", h.first, backend=DaskBackend(address)),  # 30 s connect_timeout
                  State("second", terminal=True)]
        box = {}

        def send():
            time.sleep(1.0)
            box["t"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGNAL)

        threading.Thread(target=send, daemon=True).start()
        try:
            Processor(None, states, ser).exec(run)
        except BaseException as exc:
            print(f"RAISED {type(exc).__name__} {time.monotonic() - box['t']:.2f}")
        print("SAVED", ser.deserialize().counts())
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_connecting_to_a_mute_scheduler_ends_the_run(tmp_path: Path, sig: str) -> None:
    """d16: on 9baee05 the run hung forever and ignored the signals."""
    code = CONNECT_SIGNAL_SCRIPT.replace("signal.SIGNAL", f"signal.{sig}")
    proc = run_script(tmp_path, code, timeout=20)
    out = proc.stdout + proc.stderr
    assert "RAISED KeyboardInterrupt" in proc.stdout, out
    seconds = float(proc.stdout.split("RAISED KeyboardInterrupt ")[1].split()[0])
    assert seconds < 5, out
    assert "SAVED {'new': 1}" in proc.stdout, out


@pytest.mark.timeout(20)
def test_connect_timeout_holds_against_a_mute_scheduler(mute_peer: str) -> None:
    """A peer that accepts TCP and never answers: 9baee05 waited forever whatever the
    connect_timeout."""
    states = [
        State("new", h.first, backend=DaskBackend(mute_peer, connect_timeout=1)),
        State("second", terminal=True),
    ]
    run = make_run(2)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot connect to the Dask scheduler.*no answer"):
        Processor(None, states).exec(run)
    assert time.monotonic() - started < 6
    assert run.counts() == {"new": 2}


@pytest.mark.timeout(20)
def test_stop_while_connecting_is_honoured_at_once(mute_peer: str) -> None:
    states = [
        State("new", h.first, backend=DaskBackend(mute_peer, connect_timeout=30)),
        State("second", terminal=True),
    ]
    proc = Processor(None, states)
    run = make_run(2)
    timer = threading.Timer(0.5, proc.stop)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Stopped):
        proc.exec(run)
    assert time.monotonic() - started < 5
    assert run.counts() == {"new": 2}


def make_run(n: int) -> Run[h.DOC, h.DJob]:
    run: Run[h.DOC, h.DJob] = Run("dask", h.DOC(), h.DJob)
    for i in range(n):
        run.add_job(h.DJob(n=i))
    return run


# -- item 2: timeouts count from the exec's start; a hung exec keeps its slot -------------


TIMED_TYPES = """
import os, time

import msgspec


class TJ(msgspec.Struct):
    n: int
    sleep: float = 0.0
    runs: int = 0


class TOC(msgspec.Struct):
    log: str = ""


def _note(path, what, n):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {n} {time.time():.6f}\\n".encode())
    finally:
        os.close(fd)


def logged(ac, oc, jc):
    _note(oc.log, "start", jc.n)
    time.sleep(jc.sleep)
    jc.runs += 1
    _note(oc.log, "end", jc.n)
    return jc, "done"
"""


@pytest.fixture
def timed_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """The module ``timed_types`` (a job type and an exec noting its start and end in
    a file), importable here and in the Dask worker processes."""
    (tmp_path / "timed_types.py").write_text(TIMED_TYPES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", python_env(tmp_path)["PYTHONPATH"])
    import timed_types

    return timed_types


def peak_concurrency(log: Path) -> int:
    """Most execs running at once, from the start and end notes (an exec with no end
    yet counts as running to the end)."""
    events = []
    for line in log.read_text().splitlines():
        what, _, at = line.split()
        events.append((float(at), 1 if what == "start" else -1))
    events.sort()
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def process_cluster(workers: int, threads: int) -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=":0",
        host="127.0.0.1",
        silence_logs=logging.CRITICAL,
    )


@pytest.mark.timeout(60)
def test_timeouts_charge_only_the_hung_execs_and_concurrency_holds(
    tmp_path: Path, timed_types: Any
) -> None:
    """d2 (MODE=timeout): every 10th job hangs past the timeout. On 9baee05 jobs
    queued behind a hung exec were charged "timed out" without having run, and up
    to 4 execs ran at once at concurrency 2."""
    log = tmp_path / "execs.log"
    run = Run("timed", timed_types.TOC(log=str(log)), timed_types.TJ)
    for i in range(24):
        run.add_job(timed_types.TJ(n=i, sleep=2.0 if i % 8 == 0 else 0.02))
    with process_cluster(2, 2) as cluster:
        states = [
            State(
                "new",
                timed_types.logged,
                concurrency=2,
                timeout=0.5,
                max_retries=0,
                backend=DaskBackend(cluster, restart_hung_after=None),
            ),
            State("done", terminal=True),
        ]
        Processor(None, states).exec(run)
    failed = sorted(int(j.id) for j in run.jobs.values() if j.state == "failed")
    assert failed == [0, 8, 16], {j.id: j.state_errors for j in run.jobs.values()}
    for job in run.jobs.values():
        if job.state == "done":
            assert job.context.runs == 1 and not job.recorded_errors(), job
        else:
            assert job.state_errors == {"new": ["timed out after 0.5s (Dask task abandoned)"]}
    assert peak_concurrency(log) <= 2, log.read_text()


@pytest.mark.timeout(60)
def test_a_worker_hung_past_its_timeout_is_restarted_and_the_others_run(
    tmp_path: Path, timed_types: Any
) -> None:
    """One worker with one thread, an exec that never returns in time: its slot stays
    held until the worker is restarted, and the jobs after it run uncharged (9baee05
    charged them "timed out" while they waited behind the hung thread)."""
    log = tmp_path / "execs.log"
    run = Run("hung", timed_types.TOC(log=str(log)), timed_types.TJ)
    run.add_job(timed_types.TJ(n=0, sleep=120.0))
    for i in range(1, 5):
        run.add_job(timed_types.TJ(n=i, sleep=0.01))
    with process_cluster(1, 1) as cluster:
        states = [
            State(
                "new",
                timed_types.logged,
                concurrency=1,
                timeout=0.5,
                max_retries=0,
                backend=DaskBackend(cluster, restart_hung_after=0.5),
            ),
            State("done", terminal=True),
        ]
        started = time.monotonic()
        Processor(None, states).exec(run)
        elapsed = time.monotonic() - started
    assert run.jobs["0"].state == "failed"
    assert run.jobs["0"].state_errors == {"new": ["timed out after 0.5s (Dask task abandoned)"]}
    for i in range(1, 5):
        job = run.jobs[str(i)]
        assert job.state == "done" and job.context.runs == 1 and not job.recorded_errors(), job
    assert elapsed < 30
    # The slot stayed held: nothing started while the timed-out exec ran (it never
    # noted an end: its worker process was killed by the restart).
    starts = {}
    for line in log.read_text().splitlines():
        what, n, at = line.split()
        if what == "start":
            starts[int(n)] = float(at)
    assert min(starts[i] for i in range(1, 5)) > starts[0] + 0.9, log.read_text()
