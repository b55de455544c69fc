"""Process states on a real Dask cluster (`jorbmp.dask.DaskBackend`).

A `distributed.LocalCluster` with two worker processes is started by the tests. They
cover the exec contract on the cluster, AC built once per Dask worker, a worker killed
mid-run, a job that kills every worker it runs on, timeouts, losing the scheduler, and
resuming a Dask-written checkpoint with local workers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import helpers_dask as h
import pytest

import jorbmp._dask_pool
from jorbmp import FAILED, JournalSerializer, Processor, Run, State, Stopped
from jorbmp.dask import DaskBackend

pytestmark = pytest.mark.timeout(120)


def local_cluster() -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.LocalCluster]:
    with local_cluster() as c:
        yield c


@pytest.fixture
def client(cluster: distributed.LocalCluster) -> Iterator[distributed.Client]:
    with distributed.Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


def worker_pids(client: distributed.Client) -> set[int]:
    return set(client.run(os.getpid).values())


def make_run(n: int, oc: h.DOC | None = None, actions: dict[int, str] | None = None) -> Run:
    run: Run[h.DOC, h.DJob] = Run("dask", oc or h.DOC(), h.DJob)
    for i in range(n):
        run.add_job(h.DJob(n=i, action=(actions or {}).get(i, "")))
    return run


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- the happy path ----------------------------------------------------------------------


def test_states_run_on_the_cluster_and_locally_in_one_run(client: distributed.Client) -> None:
    """Dask, local, Dask: every job passes each state once, in order; the Dask steps ran
    on the Dask workers with an AC built once per worker (ac_factory), the local step
    in local workers."""
    dask = DaskBackend(client)
    states = [
        State("new", h.first, concurrency=2, backend=dask),
        State("second", h.second, concurrency=2),
        State("third", h.third, concurrency=2, backend=dask),
        State("done", terminal=True),
    ]
    run = make_run(500)
    proc = Processor(None, states, ac_factory=h.make_ac)
    proc.exec(run)
    assert run.counts() == {"done": 500}
    assert proc.last_report is not None
    kinds = {s.state: s.kind for s in proc.last_report.states}
    assert kinds == {"new": "dask", "second": "process", "third": "dask", "done": "", "failed": ""}
    on_dask = worker_pids(client)
    first_acs, third_acs = set(), set()
    for job in run.jobs.values():
        jc = job.context
        assert jc.trail == ["first", "second", "third"], job
        assert jc.pids[0] in on_dask and jc.pids[2] in on_dask
        assert jc.pids[1] not in on_dask and jc.pids[1] != os.getpid()
        first_acs.add(jc.ac_ids[0])
        third_acs.add(jc.ac_ids[2])
        assert not job.recorded_errors()
    # One AC per Dask worker and state, not one per task or job.
    assert 1 <= len(first_acs) <= 2 and 1 <= len(third_acs) <= 2
    # The plugins are gone from the workers after the run; the client is still usable.
    plugins = client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert not any("jorbmp" in name for names in plugins.values() for name in names)


def test_processor_wide_backend_and_a_cluster_object(cluster: distributed.LocalCluster) -> None:
    """Processor(backend=...) sends every process state to the cluster; a cluster object
    (its scheduler address) works as well as a client."""
    states = [
        State("new", h.first, concurrency=2),
        State("second", h.second, concurrency=1),
        State("third", h.third),
        State("done", terminal=True),
    ]
    run = make_run(50)
    Processor(h.DAC(), states, backend=DaskBackend(cluster)).exec(run)
    with distributed.Client(cluster, set_as_default=False) as client:
        on_dask = worker_pids(client)
    assert run.counts() == {"done": 50}
    for job in run.jobs.values():
        assert job.context.trail == ["first", "second", "third"]
        assert set(job.context.pids) <= on_dask


def test_exec_contract_on_dask(client: distributed.Client) -> None:
    """Kicks, returned errors, raised exceptions, rate limiting and unknown states behave
    exactly as with local workers."""
    dask = DaskBackend(client)
    states = [
        State("new", h.actions, concurrency=2, max_retries=2, backend=dask),
        State("second", h.second, concurrency=2, backend=dask),
        State("third", terminal=True),
    ]
    names = ["kick", "raise", "retry-once", "rate-limited", "bad-state", ""]
    run = make_run(len(names), actions=dict(enumerate(names)))
    Processor(None, states).exec(run)
    jobs = run.jobs
    kick, boom, retried, limited, bad, plain = (jobs[str(i)] for i in range(len(names)))
    assert kick.state == "third"
    children = sorted(j for j in jobs if j.startswith("0->"))
    assert children == ["0->0", "0->1", "0->2"]
    assert all(jobs[c].parent == "0" and jobs[c].state == "third" for c in children)
    assert boom.state == FAILED
    assert boom.state_errors["new"] == ["ValueError: bad input 1"] * 3
    assert retried.state == "third" and retried.state_errors == {"new": ["try again"]}
    assert limited.state == "third" and limited.state_errors == {
        "new": ["RateLimitError: slow down"]
    }
    assert bad.state == FAILED and "unknown next state 'nowhere'" in bad.state_errors["new"][0]
    assert plain.state == "third" and not plain.recorded_errors()


# -- failures ----------------------------------------------------------------------------


def test_worker_killed_mid_run_charges_its_job_and_the_run_completes(
    client: distributed.Client, tmp_path: Path
) -> None:
    """SIGKILL a Dask worker while it runs a job: that job gets "worker died", is
    retried, and every job still completes. (Concurrency 1: with two tasks on the dead
    worker it would be unknown which one ran, and neither would be charged.)"""
    states = [
        State("new", h.slow_or_marked, concurrency=1, backend=DaskBackend(client)),
        State("second", terminal=True),
    ]
    run = make_run(6, h.DOC(workdir=str(tmp_path), sleep=0.3))
    marker = tmp_path / "started"

    def killer() -> None:
        wait_for(marker.exists, 60, "the first exec")
        os.kill(int(marker.read_text()), signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    Processor(None, states).exec(run)
    thread.join(5)
    assert run.counts() == {"second": 6}
    died = [j for j in run.jobs.values() if j.recorded_errors()]
    assert len(died) == 1, [j.recorded_errors() for j in died]
    (errors,) = died[0].state_errors.values()
    assert errors[0].startswith("worker died (Dask worker tcp://")
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_job_that_kills_its_worker_is_isolated_and_charged(client: distributed.Client) -> None:
    """A job that kills every worker it runs on ends in FAILED with "worker died"
    errors; the jobs that shared a batch with it run again uncharged and complete."""
    states = [
        State("new", h.actions, concurrency=2, max_retries=1, backend=DaskBackend(client)),
        State("second", terminal=True),
    ]
    run = make_run(40, actions={25: "poison"})
    Processor(None, states).exec(run)
    poison = run.jobs["25"]
    assert poison.state == FAILED
    assert len(poison.state_errors["new"]) == 2
    assert all(e.startswith("worker died") for e in poison.state_errors["new"])
    others = [j for j in run.jobs.values() if j.id != "25"]
    assert all(j.state == "second" and not j.recorded_errors() for j in others)
    client.wait_for_workers(2, timeout=60)


def test_timeout_abandons_the_task_and_charges_the_job(client: distributed.Client) -> None:
    states = [
        State(
            "new", h.actions, concurrency=2, max_retries=0, timeout=1, backend=DaskBackend(client)
        ),
        State("second", terminal=True),
    ]
    run = make_run(6, actions={2: "hang"})
    started = time.monotonic()
    Processor(None, states).exec(run)
    assert time.monotonic() - started < 3  # did not wait for the 3 s exec
    assert run.jobs["2"].state == FAILED
    assert run.jobs["2"].state_errors == {"new": ["timed out after 1s (Dask task abandoned)"]}
    assert sum(j.state == "second" for j in run.jobs.values()) == 5


def test_ac_factory_failing_on_the_workers_is_a_clear_error(client: distributed.Client) -> None:
    states = [State("new", h.first, backend=DaskBackend(client)), State("second", terminal=True)]
    run = make_run(3)
    with pytest.raises(RuntimeError, match="cannot set up the Dask workers.*no credentials"):
        Processor(None, states, ac_factory=h.failing_ac).exec(run)
    assert run.counts() == {"new": 3}


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.journal"
    states = [
        State("new", h.first, backend=DaskBackend("tcp://127.0.0.1:9", connect_timeout=1)),
        State("second", terminal=True),
    ]
    run = make_run(3)
    ser = JournalSerializer(path, overall_type=h.DOC, job_type=h.DJob)
    with pytest.raises(RuntimeError, match="cannot connect to the Dask scheduler at 'tcp://127"):
        Processor(None, states, ser).exec(run)
    assert ser.deserialize().counts() == {"new": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def separate_cluster(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A scheduler and two workers in their own processes: the scheduler can be killed."""
    address = f"tcp://127.0.0.1:{free_port()}"
    paths = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    dask_cli = [sys.executable, "-m"]
    scheduler = subprocess.Popen(
        [*dask_cli, "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        **quiet,
    )  # fmt: skip
    workers = subprocess.Popen(
        [*dask_cli, "distributed.cli.dask_worker", address, "--nworkers", "2",
         "--nthreads", "1", "--no-dashboard"],
        **quiet,
    )  # fmt: skip
    try:
        with distributed.Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield scheduler, address
    finally:
        for proc in (workers, scheduler):
            proc.kill()
            proc.wait()


def test_losing_the_scheduler_stops_the_run_with_a_valid_checkpoint(
    separate_cluster: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    """The scheduler is killed mid-run: exec raises an error naming it within seconds,
    the checkpoint holds every finished transition, and a local resume completes it."""
    scheduler, address = separate_cluster
    path = tmp_path / "run.journal"
    run = make_run(40, h.DOC(workdir=str(tmp_path), sleep=0.2))
    states = [
        State("new", h.slow_or_marked, concurrency=2, backend=DaskBackend(address)),
        State("second", h.second, concurrency=2),
        State("third", terminal=True),
    ]
    ser = JournalSerializer(path, overall_type=h.DOC, job_type=h.DJob)
    marker = tmp_path / "started"

    def kill_scheduler() -> None:
        wait_for(marker.exists, 60, "the first exec")
        time.sleep(0.5)
        scheduler.kill()

    threading.Thread(target=kill_scheduler, daemon=True).start()
    with pytest.raises(RuntimeError, match="state 'new': lost the Dask scheduler") as info:
        Processor(None, states, ser).exec(run)
    assert address in str(info.value)
    assert scheduler.wait(5) is not None
    saved = JournalSerializer(path, overall_type=h.DOC, job_type=h.DJob).deserialize()
    assert 0 < saved.counts().get("third", 0) < 40
    resume(saved, path)


def test_scheduler_gone_unnoticed_is_found_by_the_ping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-process LocalCluster closed gracefully leaves the client believing it is
    connected and the tasks pending forever; the periodic ping ends the run instead."""
    monkeypatch.setattr(jorbmp._dask_pool, "PING_TIMEOUT", 2.0)
    run = make_run(40, h.DOC(workdir=str(tmp_path), sleep=0.2))
    with local_cluster() as own:
        states = [
            State("new", h.slow_or_marked, concurrency=2, backend=DaskBackend(own)),
            State("second", terminal=True),
        ]
        marker = tmp_path / "started"

        def close_cluster() -> None:
            wait_for(marker.exists, 60, "the first exec")
            own.close()

        closer = threading.Thread(target=close_cluster, daemon=True)
        closer.start()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="state 'new': lost the Dask scheduler"):
            Processor(None, states).exec(run)
        assert time.monotonic() - started < 30
        closer.join(30)  # before the second close on leaving: distributed cannot overlap them


@pytest.mark.timeout(60)
def test_abandoning_with_a_hung_scheduler_returns_at_once(
    separate_cluster: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    """d18: the scheduler hangs (SIGSTOP) mid-run, then the run is stopped and its grace
    period ends (as a second Ctrl-C does at once): 9baee05 waited 10 s more for the
    hung scheduler to drop the plugin; now exec raises Stopped at once."""
    scheduler, address = separate_cluster
    run = make_run(40, h.DOC(workdir=str(tmp_path), sleep=0.5))
    states = [
        State("new", h.slow_or_marked, concurrency=1, backend=DaskBackend(address)),
        State("second", terminal=True),
    ]
    proc = Processor(None, states, grace_period=0.5)
    stopped: list[float] = []

    def hang_then_stop() -> None:
        wait_for((tmp_path / "started").exists, 60, "the first exec")
        scheduler.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        stopped.append(time.monotonic())
        proc.stop()

    threading.Thread(target=hang_then_stop, daemon=True).start()
    try:
        with pytest.raises(Stopped):
            proc.exec(run)
        took = time.monotonic() - stopped[0]
    finally:
        scheduler.send_signal(signal.SIGCONT)
    assert took < 5, took


def test_dask_checkpoint_resumes_with_local_workers(
    client: distributed.Client, tmp_path: Path
) -> None:
    """Stop a Dask-backed run midway; its checkpoint resumes with the local backend."""
    path = tmp_path / "run.journal"
    run = make_run(60, h.DOC(sleep=0.05))
    dask = DaskBackend(client)
    states = [
        State("new", h.first, concurrency=2, backend=dask),
        State("second", h.second, concurrency=2, backend=dask),
        State("third", terminal=True),
    ]
    proc = Processor(None, states, JournalSerializer(path, overall_type=h.DOC, job_type=h.DJob))
    threading.Timer(0.8, proc.stop).start()
    with pytest.raises(Stopped):
        proc.exec(run)
    saved = JournalSerializer(path, overall_type=h.DOC, job_type=h.DJob).deserialize()
    assert 0 < saved.counts().get("third", 0) < 60
    resume(saved, path)


def resume(saved: Run[h.DOC, h.DJob], path: Path) -> None:
    """Finish ``saved`` with local workers; every job ends with first and second done once."""
    states = [
        State("new", h.first, concurrency=2),
        State("second", h.second, concurrency=2),
        State("third", terminal=True),
    ]
    saved.overall.sleep = 0.0
    Processor(None, states, JournalSerializer(path, overall_type=h.DOC, job_type=h.DJob)).exec(
        saved
    )
    assert saved.counts() == {"third": len(saved.jobs)}
    for job in saved.jobs.values():
        trail = job.context.trail
        assert trail in (["first", "second"], ["slow", "second"]), job


# -- validation --------------------------------------------------------------------------


def test_inline_mode_runs_dask_states_here_for_debugging() -> None:
    """inline=True wins over backend=: the exec runs in this process, no cluster needed."""
    states = [
        State("new", h.first, backend=DaskBackend("tcp://127.0.0.1:9", connect_timeout=1)),
        State("second", terminal=True),
    ]
    run = make_run(3)
    Processor(h.DAC(), states, inline=True).exec(run)
    assert run.counts() == {"second": 3}
    assert all(job.context.pids == [os.getpid()] for job in run.jobs.values())


def test_backend_validation() -> None:
    with pytest.raises(ValueError, match="state 'x': backend= is for process states"):
        Processor(None, [State("x", h.first, kind="thread", backend=DaskBackend("tcp://h:1"))])
    with pytest.raises(ValueError, match="state 'x': backend must be a backend"):
        Processor(None, [State("x", h.first, backend="tcp://h:1")])
    with pytest.raises(ValueError, match="Processor: backend must be a backend"):
        Processor(None, [State("x", h.first)], backend=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DaskBackend needs a scheduler address"):
        DaskBackend(42)
    assert repr(DaskBackend("tcp://h:1")) == "DaskBackend('tcp://h:1')"
