"""Stopping for real: `Processor.stop()` from another thread, and SIGINT / SIGTERM sent
to a coordinator running in a subprocess. Checkpoints are checked on disk after each
stop, and every stopped run is resumed to completion.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import helpers_workers as h  # noqa: E402

from jorbmp import (  # noqa: E402
    JsonSerializer,
    Processor,
    Run,
    State,
    StatusCount,
    StatusListener,
    Stopped,
)

MP = pytest.mark.parametrize("mp_context", ["fork", "spawn"])


def load(path: Path) -> Run[h.WOC, h.WJob]:
    return JsonSerializer(path, h.WOC, h.WJob).deserialize()


# -- Processor.stop() -------------------------------------------------------------------


def spin_states() -> list[State]:
    return [State("spin", h.spin, concurrency=2), State("done", terminal=True)]


@pytest.mark.timeout(30)
@MP
def test_stop_from_thread_then_reuse_and_resume(tmp_path: Path, mp_context: str) -> None:
    path = tmp_path / "spin.json"
    run: Run[h.WOC, h.WJob] = Run("spin", h.WOC(str(tmp_path), sleep=0.02), h.WJob)
    for i in range(6):
        run.add_job(h.WJob(n=i), state="spin")
    proc = Processor(
        None,
        spin_states(),
        JsonSerializer(path, h.WOC, h.WJob, interval=0.1),
        mp_context=mp_context,
        grace_period=10,
    )
    stop_called: list[float] = []

    def stopper() -> None:
        # Once some work is done (the run in memory has results), not after a fixed
        # second: under load, spawned workers may not have finished an exec by then.
        deadline = time.monotonic() + 20
        while not sum(job.context.value for job in run.jobs.values()):
            if time.monotonic() > deadline:
                break  # (stop anyway: the test then fails on the saved work)
            time.sleep(0.01)
        stop_called.append(time.monotonic())
        proc.stop()

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    with pytest.raises(Stopped):
        proc.exec(run)
    stopped_after = time.monotonic() - stop_called[0]
    thread.join(5)
    assert stopped_after < 3, f"exec took {stopped_after:.1f}s to stop"

    # The final checkpoint is on disk, loadable, and equal to the run in memory.
    saved = load(path)
    assert set(saved.jobs) == {str(i) for i in range(6)}
    assert all(job.state == "spin" for job in saved.jobs.values())
    assert all(job.state_errors == {} for job in saved.jobs.values())
    assert sum(job.context.value for job in saved.jobs.values()) > 0  # work was saved
    for job_id, job in saved.jobs.items():
        assert job.context == run.jobs[job_id].context

    # The same processor (and serializer) then executes a run that completes: it returns
    # normally, the stop does not linger. Keep a copy of the stopped run's checkpoint.
    resume_path = tmp_path / "resume.json"
    shutil.copyfile(path, resume_path)
    other: Run[h.WOC, h.WJob] = Run("finish", h.WOC(str(tmp_path)), h.WJob)
    for i in range(3):
        other.add_job(h.WJob(n=i, action="finish"), state="spin")
    assert proc.exec(other) is None
    assert all(job.state == "done" for job in other.jobs.values())

    # Resume the stopped run from its checkpoint with the "fixed" state.
    path = resume_path
    resumed = load(path)
    fixed = [State("spin", h.spin_finish, concurrency=2), State("done", terminal=True)]
    Processor(None, fixed, JsonSerializer(path, h.WOC, h.WJob), mp_context=mp_context).exec(resumed)
    final = load(path)
    assert set(final.jobs) == {str(i) for i in range(6)}
    for job_id, job in final.jobs.items():
        assert job.state == "done"
        assert job.context.value == saved.jobs[job_id].context.value + 1


@pytest.mark.timeout(30)
def test_stop_from_thread_async_and_thread_states(tmp_path: Path) -> None:
    """stop() also ends runs whose work is in async and thread states."""
    path = tmp_path / "mixed.json"
    run: Run[h.WOC, h.WJob] = Run("mixed", h.WOC(str(tmp_path), sleep=0.02), h.WJob)
    for i in range(4):
        run.add_job(h.WJob(n=i), state="spin")
    states = [State("spin", h.spin, kind="thread", concurrency=2), State("done", terminal=True)]
    proc = Processor(None, states, JsonSerializer(path, h.WOC, h.WJob, interval=0.1))
    timer = threading.Timer(0.5, proc.stop)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Stopped):
        proc.exec(run)
    assert time.monotonic() - started < 4
    saved = load(path)
    assert all(job.state == "spin" for job in saved.jobs.values())
    assert sum(job.context.value for job in saved.jobs.values()) > 0


class StopWhenExecuting(StatusListener):
    """Stops the processor (from its own thread: no other thread while workers fork)
    once jobs execute; keeps the last counts."""

    def __init__(self) -> None:
        self.proc: Processor | None = None
        self.last: list[StatusCount] = []

    def status_update(self, counts: list[StatusCount]) -> None:
        self.last = counts
        if self.proc is not None and counts[0].executing:
            self.proc.stop()


@pytest.mark.timeout(30)
def test_abandoned_execs_end_as_waiting_in_the_final_status(tmp_path: Path) -> None:
    """After the grace period, execs still running are abandoned: the final status shows
    their jobs waiting, none executing, and their workers are gone when exec returns."""
    path = tmp_path / "slow.json"
    run: Run[h.WOC, h.WJob] = Run("slow", h.WOC(str(tmp_path), sleep=30), h.WJob)
    for i in range(3):
        run.add_job(h.WJob(n=i), state="spin")
    listener = StopWhenExecuting()
    proc = Processor(
        None,
        spin_states(),
        JsonSerializer(path, h.WOC, h.WJob),
        listener,
        grace_period=0.2,
    )
    listener.proc = proc
    before = {c.pid for c in psutil.Process().children()}  # a resource tracker, say
    with pytest.raises(Stopped):
        proc.exec(run)
    spin = listener.last[0]
    assert (spin.state, spin.executing, spin.waiting) == ("spin", 0, 3)
    assert all(job.state == "spin" and job.context.value == 0 for job in load(path).jobs.values())
    assert {c.pid for c in psutil.Process().children()} <= before


@pytest.mark.timeout(30)
def test_run_that_completes_without_stop_returns_normally(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    run: Run[h.WOC, h.WJob] = Run("ok", h.WOC(str(tmp_path)), h.WJob)
    for i in range(5):
        run.add_job(h.WJob(n=i, action="finish"), state="spin")
    proc = Processor(None, spin_states(), JsonSerializer(path, h.WOC, h.WJob))
    assert proc.exec(run) is None
    assert all(job.state == "done" for job in load(path).jobs.values())


# -- real signals, coordinator in a subprocess ---------------------------------------------


def start_coordinator(
    tmp_path: Path, *args: str, stdout_name: str = "out", new_session: bool = False
) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    env.pop("JORBMP_INLINE", None)
    err = tmp_path / f"{stdout_name}.err"
    with open(tmp_path / f"{stdout_name}.out", "wb") as out, open(err, "wb") as errf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import helpers_workers as h; h.main()",
                str(tmp_path / "run.json"),
                str(tmp_path),
                *args,
            ],
            stdout=out,
            stderr=errf,
            env=env,
            start_new_session=new_session,
        )
    return proc, err


def wait_for(  # type: ignore[no-untyped-def]
    predicate, timeout: float, what: str, coordinator: tuple[subprocess.Popen[bytes], Path]
) -> None:
    """Wait for ``predicate()``; fail at once if the coordinator exits meanwhile, and
    with its stderr either way: one that failed at its start would read as a slow one,
    20 s later (a full run on a loaded host timed out so, its stderr unseen)."""
    proc, err = coordinator
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None and not predicate():  # (it may have just come true)
            raise AssertionError(
                f"the coordinator exited ({proc.returncode}) before {what}: "
                f"{err.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what} (the coordinator still runs): "
                f"{err.read_text()[-2000:]}"
            )
        time.sleep(0.01)


def started_ids(tmp_path: Path) -> set[str]:
    return {p.name.removeprefix("started-") for p in tmp_path.glob("started-*")}


def finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def resume_to_completion(tmp_path: Path, mp_context: str, n: int) -> None:
    proc, err = start_coordinator(
        tmp_path, "--sleep", "0", "--mp", mp_context, stdout_name="resume"
    )
    rc = finish(proc, 25)
    assert rc == 0, err.read_text()[-2000:]
    assert (tmp_path / "resume.out").read_text().strip() == "COMPLETE"
    final = load(tmp_path / "run.json")
    assert set(final.jobs) == {str(i) for i in range(n)}
    for job in final.jobs.values():
        assert job.state == "done", job
        assert job.state_errors == {}, job
        assert job.context.value == job.context.n**2


@pytest.mark.timeout(60)
@MP
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_gracefully_and_run_resumes(
    tmp_path: Path, mp_context: str, sig: signal.Signals
) -> None:
    n = 40
    proc, err = start_coordinator(
        tmp_path, "--jobs", str(n), "--sleep", "0.1", "--grace", "20", "--mp", mp_context
    )
    try:
        wait_for(lambda: started_ids(tmp_path), 20, "the first exec to start", (proc, err))
        assert (tmp_path / "run.json").exists()  # written at the start of exec
        proc.send_signal(sig)
        signalled = time.monotonic()
        rc = finish(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - signalled < 10
    stderr = err.read_text()
    assert rc != 0, stderr[-2000:]
    assert "KeyboardInterrupt" in stderr, stderr[-2000:]
    assert "COMPLETE" not in (tmp_path / "out.out").read_text()

    saved = load(tmp_path / "run.json")
    assert set(saved.jobs) == {str(i) for i in range(n)}
    started = started_ids(tmp_path)
    for job in saved.jobs.values():
        assert job.state in ("new", "done"), job
        assert job.state_errors == {}, job
        if job.state == "done":
            assert job.id in started
            assert job.context.value == job.context.n**2
    # Graceful: execs that were running got to finish and their results were saved.
    assert {j.id for j in saved.jobs.values() if j.state == "done"} == started
    assert any(job.state == "new" for job in saved.jobs.values()), "stopped too late to test"

    resume_to_completion(tmp_path, mp_context, n)


def signal_group_midway(
    tmp_path: Path, mp_context: str, n: int, sig: signal.Signals
) -> tuple[int, str]:
    """Start a coordinator in its own process group, send ``sig`` to the whole group
    once both workers run a job, and return its exit code and stderr."""
    proc, err = start_coordinator(
        tmp_path,
        "--jobs", str(n), "--sleep", "0.5", "--grace", "20", "--mp", mp_context,
        new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: len(started_ids(tmp_path)) >= 2, 20, "both workers to start a job", (proc, err)
        )
        os.killpg(proc.pid, sig)
        rc = finish(proc, 20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, err.read_text()


@pytest.mark.timeout(60)
@MP
def test_ctrl_c_to_process_group_stops_gracefully(tmp_path: Path, mp_context: str) -> None:
    """A terminal's Ctrl-C reaches the coordinator and every worker (one process group):
    workers keep executing, the coordinator stops gracefully, nothing is charged."""
    n = 8
    rc, stderr = signal_group_midway(tmp_path, mp_context, n, signal.SIGINT)
    assert rc != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    # Only the coordinator's KeyboardInterrupt: no worker printed a traceback.
    assert stderr.count("Traceback (most recent call last)") == 1, stderr[-2000:]
    saved = load(tmp_path / "run.json")
    started = started_ids(tmp_path)
    for job in saved.jobs.values():
        assert job.state_errors == {}, job
        assert job.state == ("done" if job.id in started else "new"), job
    resume_to_completion(tmp_path, mp_context, n)


@pytest.mark.timeout(60)
@MP
def test_sigterm_to_process_group_charges_nothing(tmp_path: Path, mp_context: str) -> None:
    """``kill -TERM -PGID`` (systemd's stop) kills the workers too: the coordinator still
    stops gracefully, and the jobs the workers died in go back to their state uncharged."""
    n = 8
    rc, stderr = signal_group_midway(tmp_path, mp_context, n, signal.SIGTERM)
    assert rc != 0 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    saved = load(tmp_path / "run.json")
    assert any(job.state == "new" for job in saved.jobs.values())
    for job in saved.jobs.values():
        assert job.state_errors == {}, job
        assert job.retries == 0, job
        assert job.state in ("new", "done"), job
    resume_to_completion(tmp_path, mp_context, n)


@pytest.mark.timeout(60)
@MP
def test_second_sigint_abandons_long_execs(tmp_path: Path, mp_context: str) -> None:
    n = 6
    proc, err = start_coordinator(
        tmp_path, "--jobs", str(n), "--sleep", "60", "--grace", "60", "--mp", mp_context
    )
    try:
        wait_for(
            lambda: len(started_ids(tmp_path)) >= 2, 20, "both workers to start a job", (proc, err)
        )
        workers = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "the first Ctrl-C must wait for executing jobs"
        proc.send_signal(signal.SIGINT)
        second = time.monotonic()
        rc = finish(proc, 15)
        exited_after = time.monotonic() - second
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert exited_after < 5, f"exit took {exited_after:.1f}s after the second SIGINT"
    assert rc != 0
    assert "KeyboardInterrupt" in stderr, stderr[-2000:]
    _, alive = psutil.wait_procs(workers, timeout=3)
    for p in alive:
        p.kill()
    assert not alive, "abandoned workers outlived their coordinator"

    saved = load(tmp_path / "run.json")
    assert set(saved.jobs) == {str(i) for i in range(n)}
    for job in saved.jobs.values():
        assert job.state == "new", job  # abandoned jobs stay in their prior state
        assert job.state_errors == {}, job

    resume_to_completion(tmp_path, mp_context, n)


@pytest.mark.timeout(60)
@MP
def test_sigint_during_long_exec_with_short_grace_abandons(tmp_path: Path, mp_context: str) -> None:
    """One Ctrl-C and a grace period shorter than the exec: abandoned after the grace."""
    n = 4
    proc, err = start_coordinator(
        tmp_path, "--jobs", str(n), "--sleep", "60", "--grace", "0.5", "--mp", mp_context
    )
    try:
        wait_for(lambda: started_ids(tmp_path), 20, "a job to start", (proc, err))
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        rc = finish(proc, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - signalled < 5
    assert rc != 0 and "KeyboardInterrupt" in err.read_text()
    saved = load(tmp_path / "run.json")
    assert all(job.state == "new" for job in saved.jobs.values())
    resume_to_completion(tmp_path, mp_context, n)


@pytest.mark.timeout(60)
def test_sigkill_of_coordinator_resumes_at_least_once(tmp_path: Path) -> None:
    """A coordinator killed with SIGKILL leaves a loadable checkpoint (and no lock); the
    re-run completes, and its workers do not outlive it."""
    n = 30
    proc, err = start_coordinator(tmp_path, "--jobs", str(n), "--sleep", "0.05", "--mp", "fork")
    try:
        wait_for(lambda: len(started_ids(tmp_path)) >= 4, 20, "some jobs to start", (proc, err))
        time.sleep(0.3)  # let a checkpoint interval pass
        workers = psutil.Process(proc.pid).children()
        assert workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    for p in alive:
        p.kill()
    assert not alive, "workers outlived their coordinator"
    saved = load(tmp_path / "run.json")
    assert set(saved.jobs) == {str(i) for i in range(n)}
    assert all(job.state in ("new", "done") for job in saved.jobs.values())
    resume_to_completion(tmp_path, "fork", n)


@pytest.mark.timeout(30)
def test_stop_outside_exec_does_not_carry_over(tmp_path: Path) -> None:
    run: Run[h.WOC, h.WJob] = Run("idle", h.WOC(str(tmp_path), sleep=0.0), h.WJob)
    for i in range(3):
        run.add_job(h.WJob(n=i))
    proc = Processor(None, [State("new", h.slow, kind="thread"), State("done", terminal=True)])
    proc.stop()  # nothing is executing: ignored
    proc.exec(run)
    assert run.counts() == {"done": 3}


@pytest.mark.timeout(60)
def test_ctrl_c_ends_exec_with_keyboard_interrupt_even_when_the_run_completes(
    tmp_path: Path,
) -> None:
    # Both jobs are running when Ctrl-C comes; they finish, and that completes the run.
    # 9baee05 then returned from exec as if nothing had happened.
    proc, err = start_coordinator(
        tmp_path, "--jobs", "2", "--sleep", "1.0", "--concurrency", "2", "--grace", "20"
    )
    try:
        wait_for(lambda: len(started_ids(tmp_path)) == 2, 20, "both jobs to start", (proc, err))
        proc.send_signal(signal.SIGINT)
        rc = finish(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert rc != 0
    assert "KeyboardInterrupt" in stderr, stderr[-2000:]
    assert "COMPLETE" not in (tmp_path / "out.out").read_text()
    saved = load(tmp_path / "run.json")
    assert saved.counts() == {"done": 2}  # the final checkpoint has both
