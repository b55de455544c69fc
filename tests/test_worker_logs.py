"""What execs log in worker processes reaches the coordinator's logging, under every
start method: each record once, through the application's handlers, with
``jorbmp_state`` and ``jorbmp_job``; filtered by level in the worker. Each run is a
coordinator in a subprocess (`helpers_worker_logs`), so that its logging is set up
as an application's, from scratch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
TESTS = Path(__file__).resolve().parent
METHODS = ["fork", "spawn", "forkserver"]


def coordinator(method: str, directory: Path, scenario: str = "all") -> dict[str, int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", "import helpers_worker_logs as h; h.main()", method,
         str(directory), scenario],
        capture_output=True, text=True, timeout=90, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    counts: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return counts


def lines(path: Path) -> list[list[str]]:
    """The records of a log file, each split into its fields (multi-line records
    keep their continuation lines in the message)."""
    records: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("|", 5)
        if len(fields) == 6 and fields[0] in ("coordinator", "worker", "?"):
            records.append(fields)
        else:
            records[-1][5] += "\n" + line
    return records


@pytest.mark.parametrize("method", METHODS)
def test_worker_records_reach_the_applications_handlers_once(method: str, tmp_path: Path) -> None:
    counts = coordinator(method, tmp_path)
    assert counts == {"done": 8}  # (the huge one too)
    records = lines(tmp_path / "app.log")
    # Every record written by the coordinator's handler, none by a copy of it in a
    # forked worker.
    assert {r[0] for r in records} == {"coordinator"}
    messages = [r[5] for r in records]
    assert len(messages) == len(set(messages)), messages  # each once
    by_message = {r[5].split("\n")[0]: r for r in records}
    for n in range(8):
        assert by_message[f"job {n} says hello"][2:5] == ["app", "new", str(n)]
        assert by_message[f"job {n}: a quiet logger's warning"][1:3] == ["WARNING", "app.quiet"]
    # Below the level: never formatted, in the worker nor here.
    assert not list(tmp_path.glob("marker-*"))
    assert not any("marker" in m for m in messages)
    # An exception's traceback, formatted in the worker.
    failed = by_message["job 0 failed to look up"]
    assert failed[1] == "ERROR" and "Traceback (most recent call last):" in failed[5]
    assert "KeyError: 'missing'" in failed[5]
    # propagate=False is the coordinator's business: its own file only.
    assert not any("isolated" in m for m in messages)
    isolated = lines(tmp_path / "iso.log")
    assert [r[5] for r in isolated] == ["job 1: isolated"] and isolated[0][0] == "coordinator"
    # A thread the exec started, logging after the exec returned.
    thread = by_message["job 2: from a thread, after its exec returned"]
    assert thread[1:4] == ["WARNING", "app", "new"]
    # Arguments that cannot be formatted, a name that is not UTF-8, jorbmp's own logger.
    unformatted = next(r for m, r in by_message.items() if "cannot be formatted" in m)
    assert unformatted[4] == "3" and "RuntimeError: no str for you" in unformatted[5]
    assert "its format: 'job %d: %s'" in unformatted[5]
    assert "job 4: file caf\\udce9.txt" in by_message
    assert by_message["job 5: jorbmp's own logger"][1:5] == ["WARNING", "jorbmp", "new", "5"]
    (huge,) = [r for r in records if "huge" in r[5]]
    assert 64 * 1024 < len(huge[5]) < 66 * 1024 and huge[5].endswith("characters cut]")
    # What an ac_factory logs in a worker, before the worker is ready: no job yet.
    factories = [r for r in records if r[5].startswith("ac_factory in pid")]
    assert ["new", "None"] in [r[3:5] for r in factories]
    # The coordinator's own records are as they were (no jorbmp attributes).
    assert by_message["coordinator: the run is over"][3:5] == ["-", "-"]


def test_a_runaway_exec_is_bounded_and_says_so(tmp_path: Path) -> None:
    assert coordinator("fork", tmp_path, "runaway") == {"done": 1}
    records = lines(tmp_path / "app.log")
    said = [r for r in records if "line" in r[5] and r[2] == "app"]
    assert 500 <= len(said) <= 5000
    dropped = [r for r in records if "dropped" in r[5]]
    # One exec logging 5000 lines at once: a message's worth kept, the rest counted.
    assert dropped and dropped[0][1:5] == ["WARNING", "jorbmp", "new", "None"]
    assert sum(int(r[5].split("dropped ")[1].split()[0]) for r in dropped) + len(said) == 5000


def test_what_an_exec_logs_before_its_worker_dies_arrives(tmp_path: Path) -> None:
    assert coordinator("spawn", tmp_path, "crash") == {"failed": 1, "done": 1}
    records = lines(tmp_path / "app.log")
    assert ["ERROR", "app", "new", "0", "job 0: about to die"] in [r[1:] for r in records]
    # A long exec's records go up while it runs (SHIP_SECONDS), none lost.
    long = [r[1:] for r in records if "long exec" in r[5]]
    assert long == [["INFO", "app", "new", "1", f"job 1: long exec, line {i}"] for i in range(3)]
