"""The end-of-run report and the deeper status metrics (p95, utilisation, rate waits)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import msgspec
import pytest

import jorbmp
from jorbmp import FAILED, Processor, Run, RunReport, State, Stopped

pytestmark = pytest.mark.timeout(60)


class JC(msgspec.Struct):
    n: int = 0


def burn_to_cheap(ac: Any, oc: Any, jc: JC) -> Any:
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    return jc, "cheap"


def cheap(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, "done"


async def limited(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, "done"


def make_run(n: int) -> Run[None, JC]:
    run: Run[None, JC] = Run("report")
    for i in range(n):
        run.add_job(JC(n=i))
    return run


def test_report_names_the_cpu_bound_bottleneck(listener: Any) -> None:
    states = [
        State("burn", burn_to_cheap, concurrency=1),
        State("cheap", cheap, concurrency=2, kind="thread"),
        State("done", terminal=True),
    ]
    run: Run[None, JC] = Run("report")
    for i in range(20):
        run.add_job(JC(n=i), state="burn")
    proc = Processor(None, states, None, listener)
    assert proc.exec(run) is None
    report = proc.last_report
    assert isinstance(report, RunReport)
    assert report.outcome == "complete" and report.run == "report"
    by = {s.state: s for s in report.states}
    assert [s.state for s in report.states] == ["burn", "cheap", "done", FAILED]
    assert by["burn"].execs == 20 and by["burn"].kind == "process"
    assert 0.8 <= by["burn"].utilisation <= 1.0
    assert by["cheap"].utilisation < 0.2
    # Not mean <= p95: one slow exec of twenty (a busy host) lifts the mean above it.
    assert 0.04 <= by["burn"].mean_seconds < 1.0
    assert 0.04 <= by["burn"].p95_seconds < 1.0
    assert by["done"].jobs == 20 and by["done"].terminal
    assert report.bottleneck == "burn"
    assert "state 'burn' was busy" in report.hint
    text = str(report)
    assert "burn" in text and "cheap" in text and report.hint in text
    last = listener.last()
    assert last["burn"].p95_seconds >= 0.04 and 0.8 <= last["burn"].utilisation <= 1.0


def test_report_sees_a_rate_limit_setting_the_pace() -> None:
    states = [State("new", limited, concurrency=4, rate_limit=20), State("done", terminal=True)]
    proc = Processor(None, states)
    proc.exec(make_run(20))
    report = proc.last_report
    assert report is not None
    new = report.states[0]
    assert 0.7 <= new.rate_wait_seconds <= 2.0
    assert report.bottleneck == "new"
    assert "rate limit" in report.hint


def test_report_of_an_all_terminal_run_and_of_a_stop() -> None:
    proc = Processor(None, [State("new", cheap), State("done", terminal=True)])
    proc.exec(make_run(0))
    report = proc.last_report
    assert (
        report is not None and report.bottleneck is None and report.hint == "nothing was executed"
    )

    proc = Processor(None, [State("new", forever, kind="thread"), State("done", terminal=True)])
    threading.Timer(0.3, proc.stop).start()
    with pytest.raises(Stopped):
        proc.exec(make_run(2))
    assert proc.last_report is not None and proc.last_report.outcome == "stopped"


def forever(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.01)
    return jc, "new"


def _children() -> set[str]:
    return {p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == os.getpid()}


def test_cancelling_exec_async_abandons_cleanly() -> None:
    # Children from before (e.g. multiprocessing's resource tracker, which a Dask
    # LocalCluster in an earlier test starts) are not this test's business.
    before = _children()
    proc = Processor(None, [State("new", sleepy), State("done", terminal=True)])

    async def main() -> None:
        task = asyncio.ensure_future(proc.exec_async(make_run(2)))
        await asyncio.sleep(1.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 10
    assert proc.last_report is not None and proc.last_report.outcome == "failed"
    time.sleep(0.2)
    assert _children() - before == set()  # the workers were killed, not left behind


def sleepy(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(30)
    return jc, "done"


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@pytest.mark.parametrize("fmt", ["JsonSerializer", "JournalSerializer", "SqliteSerializer"])
def test_report_is_stored_in_the_checkpoint_and_shown_by_status(tmp_path: Any, fmt: str) -> None:
    path = tmp_path / "run.ck"
    cls = getattr(jorbmp, fmt)
    states = [State("new", cheap, concurrency=2), State("done", terminal=True)]
    proc = Processor(None, states, cls(path, job_type=JC))
    proc.exec(make_run(30))
    loaded = cls(path, job_type=JC).deserialize()
    assert loaded.report is not None
    assert msgspec.convert(loaded.report, RunReport) == proc.last_report
    out = subprocess.run([sys.executable, "-m", "jorbmp", "status", str(path), "--json"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["report"]["outcome"] == "complete"
    assert data["report"]["states"][0]["execs"] == 30
    text = subprocess.run([sys.executable, "-m", "jorbmp", "status", str(path)],
                          capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    assert "latest execution:" in text and "run 'report' complete" in text
