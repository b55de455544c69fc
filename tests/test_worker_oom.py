"""OOM protection: workers run with a higher ``oom_score_adj`` than the coordinator, so
that under memory pressure the kernel kills a worker, never the coordinator (Linux:
read from ``/proc/PID/oom_score_adj`` of live workers)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers_recycling as h

from jorbmp import Processor, Run, State
from jorbmp._oom import raise_oom_score


def oom_score_adj(pid: int | str) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mp_context", ["fork", "spawn", "forkserver"])
def test_live_workers_are_the_kernels_first_oom_victims(tmp_path: Path, mp_context: str) -> None:
    coordinator = oom_score_adj("self")
    pidfile, go = tmp_path / "pid", tmp_path / "go"
    oc = h.ROC(str(tmp_path / "log"), pidfile=str(pidfile), wait_for=str(go))
    run: Run[h.ROC, h.RJob] = Run("oom", oc, h.RJob)
    run.add_job(h.RJob(0))
    seen: list[int] = []

    def read_while_it_waits() -> None:
        # The exec writes its pid, then waits for `go`: its worker is alive meanwhile.
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        try:
            seen.append(oom_score_adj(pidfile.read_text()))
        finally:
            go.touch()

    reader = threading.Thread(target=read_while_it_waits)
    reader.start()
    Processor(
        None, [State("new", h.work), State("done", terminal=True)], mp_context=mp_context
    ).exec(run)
    reader.join()
    assert run.jobs["0"].state == "done"
    assert seen == [min(1000, coordinator + 500)]
    assert oom_score_adj("self") == coordinator  # the coordinator's own is untouched


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("before", "after"), [("0", "500"), ("-300", "200"), ("800", "1000")])
def test_the_score_goes_up_by_500_up_to_1000(tmp_path: Path, before: str, after: str) -> None:
    path = tmp_path / "oom_score_adj"
    path.write_text(before)
    raise_oom_score(str(path))
    assert path.read_text() == after


@pytest.mark.timeout(10)
@pytest.mark.parametrize("content", ["1000", "not a number"])
def test_the_score_is_never_lowered_nor_garbled(tmp_path: Path, content: str) -> None:
    path = tmp_path / "oom_score_adj"
    path.write_text(content)
    raise_oom_score(str(path))  # (nothing to raise, or nothing it can read: no error)
    assert path.read_text() == content
    raise_oom_score(str(tmp_path / "missing"))  # no such file, as off Linux
    assert not (tmp_path / "missing").exists()
