"""``python -m jorbmp status|redrive`` through real subprocesses on real checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import FAILED, JsonSerializer, Processor, Run, State

pytestmark = pytest.mark.timeout(60)


class JC(msgspec.Struct):
    n: int
    fixed: bool = False


def flaky(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.n % 3 == 0 and not jc.fixed:
        raise ConnectionError(f"host {jc.n % 2} unreachable")
    return jc, "done"


def fixed(ac: Any, oc: Any, jc: JC) -> Any:
    jc.fixed = True
    return jc, "done"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jorbmp", *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "run.json"
    run: Run[None, JC] = Run("cli", None, JC)
    for n in range(12):
        run.add_job(JC(n=n))
    states = [State("new", flaky, max_retries=1, kind="thread"), State("done", terminal=True)]
    Processor(None, states, JsonSerializer(path, job_type=JC)).exec(run)
    assert run.counts() == {"done": 8, FAILED: 4}
    return path


def test_status_text(checkpoint: Path) -> None:
    out = cli("status", str(checkpoint))
    assert out.returncode == 0, out.stderr
    assert "run 'cli'" in out.stdout and "12 jobs" in out.stdout
    assert "done    8" in out.stdout and "failed  4" in out.stdout
    # One kind, with its raw texts; the jobs left the state that failed (for 'failed').
    assert "ConnectionError: host <n> unreachable" in out.stdout
    assert "'ConnectionError: host 0 unreachable'" in out.stdout
    assert "old: all 4 jobs left that state since (now 'failed' 4)" in out.stdout


def test_status_json_field_by_field(checkpoint: Path) -> None:
    out = cli("status", str(checkpoint), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["name"] == "cli"
    assert data["jobs"] == 12
    assert data["states"] == {"done": 8, "failed": 4}
    assert data["errors"] == [
        {"fingerprint": "ConnectionError: host <n> unreachable", "jobs": 4,
         "states": {"new": 4}, "current": 0, "moved": {"failed": 4},
         "examples": ["0", "3", "6", "9"],
         "texts": ["ConnectionError: host 0 unreachable", "ConnectionError: host 1 unreachable"]},
    ]  # fmt: skip
    assert data["error_kinds"] == 1


def test_redrive_dry_run_then_real_then_exec_completes(checkpoint: Path) -> None:
    before = checkpoint.read_bytes()
    # 'retry' is a state the run has never seen (the fixed code declares it): --force.
    out = cli("redrive", str(checkpoint), "--from", "failed", "--to", "retry",
              "--error-contains", "host 1", "--dry-run", "--force")  # fmt: skip
    assert out.returncode == 0 and "would move 2 jobs" in out.stdout
    assert checkpoint.read_bytes() == before

    out = cli("redrive", str(checkpoint), "--from", "failed", "--to", "retry", "--force")
    assert out.returncode == 0 and "moved 4 jobs from 'failed' to 'retry'" in out.stdout
    run = JsonSerializer(checkpoint, job_type=JC).deserialize()
    assert run.counts() == {"done": 8, "retry": 4}
    assert all(run.jobs[i].retries == 0 for i in ("0", "3", "6", "9"))

    states = [State("retry", fixed, kind="thread"), State("done", terminal=True)]
    Processor(None, states, JsonSerializer(checkpoint, job_type=JC)).exec(run)
    final = JsonSerializer(checkpoint, job_type=JC).deserialize()
    assert final.counts() == {"done": 12}
    assert final.jobs["3"].context.fixed


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from jorbmp.checkpoint.base import CheckpointLock
    CheckpointLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_redrive_refuses_a_checkpoint_in_use(checkpoint: Path) -> None:
    before = checkpoint.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(checkpoint)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        out = cli("redrive", str(checkpoint), "--from", "failed", "--to", "new")
        assert out.returncode == 2
        assert "in use by another running processor" in out.stderr
        assert checkpoint.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("content", [b"", b"{not json", b"\x00\x01garbage"])
def test_unreadable_checkpoints_fail_clearly_and_stay_unchanged(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    for args in (("status", str(path)), ("redrive", str(path), "--from", "a", "--to", "b")):
        out = cli(*args)
        assert out.returncode == 2
        assert str(path) in out.stderr
        assert path.read_bytes() == content


def test_missing_checkpoint(tmp_path: Path) -> None:
    out = cli("status", str(tmp_path / "none.json"))
    assert out.returncode == 2 and "no checkpoint at" in out.stderr
