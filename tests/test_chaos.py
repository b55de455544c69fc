"""Kill the coordinator with SIGKILL at random moments, restart it, and lose nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chaos_coordinator import JC, KICK_EVERY, serializer

import jorbmp

SCRIPT = Path(__file__).parent / "chaos_coordinator.py"
JOBS = 3000
KILLS = 3


def start(path: Path, fmt: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(path), fmt, str(JOBS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so the kill below reaches the coordinator only
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fmt", ["json", "journal", "sqlite"])
def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"chaos.{fmt}"
    rng = random.Random(fmt)
    kills = 0
    for _ in range(KILLS * 3):
        proc = start(path, fmt)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        time.sleep(rng.uniform(0.2, 1.2))
        if proc.poll() is not None:
            proc.communicate()  # reads and closes its pipes
            break  # finished before we could kill it
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        kills += 1
        if kills == KILLS:
            break
    assert kills == KILLS, "the run finished too fast to kill it enough times"
    proc = start(path, fmt)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().endswith("complete")

    run = serializer(str(path), fmt).deserialize()
    parents = {str(n) for n in range(JOBS)}
    kids = {f"{n}->0" for n in range(JOBS) if n % KICK_EVERY == 0}
    assert set(run.jobs) == parents | kids  # exactly these ids: nothing lost, no kick twice
    for job in run.jobs.values():
        assert job.state == "done", job
        jc: JC = job.context
        assert jc.b_done >= 1
        if job.parent is None:
            assert jc.a_done >= 1 and not jc.kid
        else:
            assert jc.kid and jc.a_done == 0 and job.parent == str(jc.n)
            assert run.jobs[job.parent].kicks == 1
    assert isinstance(run, jorbmp.Run)
