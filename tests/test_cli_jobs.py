"""The command line as a new user tried it (issue 19, item 7): listing the jobs of a
state, redriving jobs by id, refusing a state the run never saw, ``--dry-run`` on a
live checkpoint, a closed pipe, a directory, "1 job". Real runs, real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import (
    FAILED,
    JournalSerializer,
    JsonSerializer,
    Processor,
    Run,
    SqliteSerializer,
    State,
)

pytestmark = pytest.mark.timeout(120)

SERIALIZERS: dict[str, Any] = {
    "json": JsonSerializer,
    "journal": JournalSerializer,
    "sqlite": SqliteSerializer,
}


class JC(msgspec.Struct):
    n: int


def flaky(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.n % 3 == 0:
        raise ConnectionError(f"host {jc.n % 2} unreachable")
    return jc, "done"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jorbmp", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def one_line(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jorbmp: "), out.stderr
    return lines[0]


def executed(kind: str, path: Path, jobs: int = 12) -> Path:
    """A real run: jobs 0, 3, 6, 9 fail twice and are parked in 'failed'."""
    run: Run[None, JC] = Run("cli", None, JC)
    for n in range(jobs):
        run.add_job(JC(n=n))
    states = [
        State("new", flaky, max_retries=1, retry_delay=0, kind="thread"),
        State("done", terminal=True),
    ]
    Processor(None, states, SERIALIZERS[kind](path, job_type=JC)).exec(run)
    return path


@pytest.mark.parametrize("kind", list(SERIALIZERS))
def test_status_lists_the_jobs_of_a_state(kind: str, tmp_path: Path) -> None:
    path = executed(kind, tmp_path / f"run.{kind}")
    out = cli("status", path, "--state", FAILED)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "4 jobs in state 'failed':"
    assert lines[1].split() == ["id", "retries", "last", "error"]
    # (A job parked in its error state starts there with no retries.)
    assert [line.split()[:2] for line in lines[2:]] == [
        ["0", "0"],
        ["3", "0"],
        ["6", "0"],
        ["9", "0"],
    ]
    assert lines[3].endswith("ConnectionError: host 1 unreachable")

    out = cli("status", path, "--state", FAILED, "--error-contains", "host 1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "state": FAILED,
        "error_contains": "host 1",
        "count": 2,
        "jobs": [
            {"id": "3", "retries": 0, "last_error": "ConnectionError: host 1 unreachable"},
            {"id": "9", "retries": 0, "last_error": "ConnectionError: host 1 unreachable"},
        ],
    }
    out = cli("status", path, "--state", FAILED, "--error-contains", "host 0")
    assert (
        out.stdout.splitlines()[0] == "2 jobs in state 'failed' with an error containing 'host 0':"
    )
    out = cli("status", path, "--state", "faild")
    assert out.returncode == 0
    assert out.stdout.strip() == "no job in state 'faild' (the run's states: 'done', 'failed')"
    one_line(cli("status", path, "--error-contains", "host"))  # needs --state


@pytest.mark.parametrize("kind", ["journal"])  # (the formats' writes: tests/test_cli.py)
def test_redrive_takes_job_ids(kind: str, tmp_path: Path) -> None:
    """``--job`` (repeated) and ``--jobs-from`` (a file, or - for stdin): only those
    jobs move, from any state unless --from is given; an unknown id moves nothing."""
    path = executed(kind, tmp_path / f"run.{kind}")
    out = cli("redrive", path, "--job", "3", "--job", "9", "--to", "new", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "would move 2 jobs to 'new'"
    line = one_line(cli("redrive", path, "--job", "3", "--job", "nope", "--to", "new"))
    assert "has no job 'nope'" in line and "nothing moved" in line
    ids = tmp_path / "ids.txt"
    ids.write_text("# the ones to retry\n0\n\n 6 \n1\n")
    out = cli("redrive", path, "--jobs-from", ids, "--from", FAILED, "--to", "new")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "moved 2 jobs from 'failed' to 'new'"  # 1 is done
    out = cli("redrive", path, "--jobs-from", "-", "--to", "new", stdin="1\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "moved 1 job to 'new'"
    run = SERIALIZERS[kind](path, job_type=JC).deserialize()
    assert {i for i, j in run.jobs.items() if j.state == "new"} == {"0", "1", "6"}
    assert all(run.jobs[i].retries == 0 for i in ("0", "6"))
    assert run.counts() == {"done": 7, FAILED: 2, "new": 3}
    # A directory, or a file that is not text, is one line.
    assert (
        "is a directory"
        in one_line(cli("redrive", path, "--jobs-from", tmp_path, "--to", "new")).lower()
    )
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in one_line(
        cli("redrive", path, "--jobs-from", tmp_path / "bin", "--to", "new")
    )
    assert "--from STATE" in one_line(cli("redrive", path, "--to", "new"))


def test_redrive_refuses_a_state_the_run_never_saw(tmp_path: Path) -> None:
    """A typo in --to is refused (exit 2, naming the states the run has), unless
    --force (a state the next processor declares); nothing changes meanwhile."""
    path = executed("json", tmp_path / "run.json")
    before = path.read_bytes()
    for dry in ((), ("--dry-run",)):
        line = one_line(cli("redrive", path, "--from", FAILED, "--to", "nwe", *dry))
        assert "never seen a state 'nwe'" in line and "'new'" in line and "--force" in line
        assert path.read_bytes() == before
    # --from a state no job is in stays exit code 1, naming the run's states.
    line = one_line(cli("redrive", path, "--from", "faild", "--to", "new"), code=1)
    assert "'faild'" in line and "'failed'" in line
    out = cli("redrive", path, "--from", FAILED, "--to", "nwe", "--force")
    assert out.returncode == 0 and out.stdout.strip() == "moved 4 jobs from 'failed' to 'nwe'"
    # States the run knows: those of its report (declared), and those errors were in.
    assert cli("redrive", path, "--from", "nwe", "--to", "done").returncode == 0


HOLD = textwrap.dedent(
    """
    import sys, time
    import msgspec
    from jorbmp import JournalSerializer, Processor, Run, State

    class JC(msgspec.Struct):
        n: int

    def slow(ac, oc, jc):
        if jc.n % 2:
            raise ValueError(f"odd {jc.n}")
        time.sleep(0.05)
        return jc, "done"

    run = Run("live", None, JC)
    for n in range(400):
        run.add_job(JC(n=n))
    states = [State("new", slow, kind="thread", max_retries=0), State("done", terminal=True)]
    Processor(None, states, JournalSerializer(sys.argv[1], job_type=JC, interval=0.05)).exec(run)
    """
)


def test_dry_run_and_listing_on_a_live_checkpoint(tmp_path: Path) -> None:
    """While a processor executes the checkpoint: --dry-run counts (with a note that
    the count may change), ``status --state`` lists; a real redrive is refused."""
    path = tmp_path / "run.journal"
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(path)])
    try:
        deadline = time.monotonic() + 60
        while True:
            listed = cli("status", path, "--state", FAILED, "--json")
            if listed.returncode == 0 and json.loads(listed.stdout)["count"] >= 2:
                break
            assert time.monotonic() < deadline and live.poll() is None, listed.stderr
            time.sleep(0.2)
        out = cli("redrive", path, "--job", "1", "--job", "3", "--to", "new", "--dry-run")
        assert live.poll() is None, "the run ended before the dry run: make it longer"
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "would move 2 jobs to 'new'"
        assert "in use by a running processor" in out.stderr
        refused = cli("redrive", path, "--job", "1", "--to", "new")
        assert refused.returncode == 2 and "in use" in refused.stderr
    finally:
        live.kill()
        live.wait()


def test_a_closed_pipe_and_a_directory_are_one_line_and_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run: Run[None, JC] = Run("wide", None, JC)
    for n in range(20_000):  # far more output than a pipe holds, for each command
        state = "wide" if n % 2 else f"state {n}"
        run.jobs[run.add_job(JC(n=n), state=state)].state_errors["new"] = [f"e {n}"]
    JsonSerializer(path, job_type=JC).serialize(run)
    for args in ("--json", "", "--state wide", "--state wide --json"):
        shell = (
            f"{sys.executable} -m jorbmp status {path} {args} | head -1; exit ${{PIPESTATUS[0]}}"
        )
        out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
        assert out.stdout.count("\n") == 1, out.stdout[:200]
        line = one_line(out)
        assert "broken pipe" in line
    for args in (
        ("status", tmp_path),
        ("status", tmp_path, "--json"),
        ("status", tmp_path, "--state", "x"),
    ):
        assert "is a directory" in one_line(cli(*args))


def test_one_job_is_not_1_jobs(tmp_path: Path) -> None:
    path = executed("json", tmp_path / "run.json", jobs=1)
    out = cli("status", path)
    assert out.stdout.splitlines()[0].endswith(": 1 job"), out.stdout
    assert "    1 job  ConnectionError: host <n> unreachable" in out.stdout
    out = cli("redrive", path, "--from", FAILED, "--to", "new")
    assert out.stdout.strip() == "moved 1 job from 'failed' to 'new'"
    out = cli("status", path, "--state", "new")
    assert out.stdout.splitlines()[0] == "1 job in state 'new':"


def test_run_redrive_by_job_ids() -> None:
    """`Run.redrive` in Python: ids (from any state, or only ``from_state``'s), in the
    run's order; an unknown id moves nothing."""
    run: Run[None, JC] = Run("r", None, JC)
    for n in range(4):
        run.add_job(JC(n=n), state=FAILED if n % 2 else "done")
    assert run.redrive(FAILED, "new", job_ids=["3", "0"]) == ["3"]
    assert run.redrive(None, "new", job_ids=["2", "0"]) == ["0", "2"]
    with pytest.raises(KeyError, match="no job '9'"):
        run.redrive(None, "x", job_ids=["1", "9"])
    with pytest.raises(ValueError, match="a state to move from, or job ids"):
        run.redrive(None, "x")
    assert run.counts() == {"new": 3, FAILED: 1}
