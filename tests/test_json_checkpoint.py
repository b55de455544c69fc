"""JsonSerializer: atomic snapshots, clear errors, never overwriting what it cannot read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import CheckpointError, JsonSerializer, Processor, Run, State

pytestmark = pytest.mark.timeout(60)


class OC(msgspec.Struct):
    workdir: str


class JC(msgspec.Struct):
    count: int = 0


class JC2(msgspec.Struct):
    count: str = ""


def step(ac: Any, oc: OC, jc: JC) -> Any:
    jc.count += 1
    return jc, ("done" if jc.count >= 2 else "new")


STATES = [State("new", step, concurrency=2), State("done", terminal=True)]


def make_run(n: int = 5) -> Run[OC, JC]:
    run: Run[OC, JC] = Run("ck", OC("/data"))
    for _ in range(n):
        run.add_job(JC())
    return run


def test_round_trip_and_format(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.json"
    run = make_run()
    Processor(None, STATES, JsonSerializer(path, OC, JC)).exec(run)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.count("\n") >= 6  # one job per line: grep and sed friendly
    assert '"workdir":"/data"' in text
    loaded = JsonSerializer(path, overall_type=OC, job_type=JC).deserialize()
    assert loaded == run and loaded.overall == OC("/data")
    assert loaded.next_id == 5
    assert loaded.add_job(JC()) == "5"


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        JsonSerializer(tmp_path / "none.json", OC, JC).deserialize()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b" \n", "empty"),  # 0 bytes: no checkpoint (test_checkpoint_safety)
        (b'{"format":1,"name":"x","next_id":0,"overall":{"workdir":"/"},"jobs":[', "not a valid"),
        (os.urandom(256), "not a valid"),
        (b'{"format":99,"name":"x","next_id":0,"overall":{"workdir":"/"},"jobs":[]}', "format 99"),
    ],
)
def test_bad_checkpoints_raise_and_are_never_overwritten(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    ser = JsonSerializer(path, OC, JC)
    with pytest.raises(CheckpointError, match=reason) as info:
        ser.deserialize()
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        Processor(None, STATES, ser).exec(make_run())
    assert path.read_bytes() == content


def test_checkpoint_of_other_types_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run = make_run(2)
    Processor(None, STATES, JsonSerializer(path, OC, JC)).exec(run)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"\$\.jobs\[0\]\.context\.count"):
        JsonSerializer(path, OC, JC2).deserialize()
    assert path.read_bytes() == before


def test_untyped_load_gives_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    Processor(None, STATES, JsonSerializer(path, OC, JC)).exec(make_run(1))
    loaded = JsonSerializer(path).deserialize()
    assert loaded.jobs["0"].context == {"count": 2}
    assert loaded.overall == {"workdir": "/data"}


def test_resume_finishes_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    run = make_run(4)
    ser = JsonSerializer(path, OC, JC)
    # Only the first step is available: every job ends parked in "new" after one pass.
    Processor(None, [State("new", park, max_retries=0), State("parked", terminal=True)], ser).exec(
        run
    )
    loaded = JsonSerializer(path, OC, JC).deserialize()
    for job in loaded.jobs.values():
        job.state = "new"  # a redrive
    Processor(None, STATES, JsonSerializer(path, OC, JC)).exec(loaded)
    final = JsonSerializer(path, OC, JC).deserialize()
    assert final.counts() == {"done": 4}
    assert all(job.context.count == 2 for job in final.jobs.values())


def park(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "parked"


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from jorbmp.checkpoint.base import CheckpointLock
    from pathlib import Path
    lock = CheckpointLock(Path(sys.argv[1]))
    lock.acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_checkpoint_in_use_is_refused_until_its_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            CheckpointError, match=f"in use by another running processor \\(pid {holder.pid}\\)"
        ):
            Processor(None, STATES, JsonSerializer(path, OC, JC)).exec(make_run())
    finally:
        holder.kill()
        holder.wait()
    # The OS dropped the lock with the process: a resume is never refused after a crash.
    time.sleep(0.05)
    run = make_run()
    Processor(None, STATES, JsonSerializer(path, OC, JC)).exec(run)
    assert run.counts() == {"done": 5}


def test_interval_batches_writes(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    ser = JsonSerializer(path, OC, JC, interval=3600)
    writes = 0
    original = ser.serialize

    def counting(run: Any) -> None:
        nonlocal writes
        writes += 1
        original(run)

    ser.serialize = counting  # type: ignore[method-assign]
    Processor(None, STATES, ser).exec(make_run(200))
    assert writes == 2  # the initial snapshot and the final one, nothing in between
