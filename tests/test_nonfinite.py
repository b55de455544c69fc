"""NaN and infinities in contexts (issue 14, item 1).

JSON has neither: msgspec writes them as null, and a JSON or SQLite checkpoint holding
one could never be read back (9baee05 wrote it, completed the run, and then refused to
load or overwrite the file for good). Now an exec whose outcome holds one fails that
attempt with an error naming the state, the field and the format, and goes on through
retries and the error state; a run that already holds one (set before the exec) is
refused, the file left as it was. The journal (msgpack) keeps them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import (
    CheckpointError,
    JournalSerializer,
    JsonSerializer,
    KickRequest,
    Processor,
    Run,
    SqliteSerializer,
    State,
)

NAN = float("nan")
INF = float("inf")
# A float 64 with an all-ones exponent, in msgpack: bytes that look like a NaN to a
# search, inside a bytes value (no NaN there).
LOOKALIKE = b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\xcb\xff\xf0"


class OC(msgspec.Struct):
    scale: float = 1.0


class NJ(msgspec.Struct):
    n: int
    mode: str = "ok"
    marker: str = ""  # a directory for "first attempt" markers
    mean: float = 0.0
    opt: str | None = None
    blob: bytes = b""
    keyed: dict[float, int] = {}
    child: bool = False


def _first_attempt(jc: NJ) -> bool:
    """True the first time job ``jc.n`` runs (a marker file, as workers share no memory)."""
    marker = os.path.join(jc.marker, f"{jc.n}.first")
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def compute(ac: Any, oc: OC, jc: NJ) -> Any:
    mode = jc.mode
    if mode == "ok":
        jc.mean = 1.0
        return jc, "done"
    if mode == "nan":
        jc.mean = NAN
        return jc, "done"
    if mode == "nan_once":
        jc.mean = NAN if _first_attempt(jc) else 2.0
        return jc, "done"
    if mode == "inf_with_error":  # returned (not raised) errors are refused too
        jc.mean = INF
        return jc, "done", None, "a warning"
    if mode == "kick_inf":
        return jc, "done", [KickRequest(NJ(100 + jc.n, mean=-INF, child=True), "done")]
    if mode == "kick_once":
        mean = -INF if _first_attempt(jc) else 3.0
        return jc, "done", [KickRequest(NJ(100 + jc.n, mean=mean, child=True), "done")]
    if mode == "lookalike":
        # What a byte search alone would take for non-finite floats: not refused.
        jc.blob, jc.opt, jc.keyed = LOOKALIKE, None, {INF: 1, -INF: 2}
        jc.mean = -0.0
        return jc, "done"
    raise AssertionError(mode)


async def compute_async(ac: Any, oc: OC, jc: NJ) -> Any:
    await asyncio.sleep(0)
    return compute(ac, oc, jc)


MODES = ["ok", "nan", "nan_once", "inf_with_error", "kick_inf", "kick_once", "lookalike"]
KINDS = ["process", "thread", "async", "inline"]
REFUSING = {"json": JsonSerializer, "sqlite": SqliteSerializer}
SUFFIX = {"json": "run.json", "sqlite": "run.db", "journal": "run.journal"}


def make_run(marker: Path) -> Run[OC, NJ]:
    run: Run[OC, NJ] = Run("nonfinite", OC(), NJ)
    for i, mode in enumerate(MODES):
        run.add_job(NJ(i, mode, str(marker)))
    return run


def execute(run: Run[OC, NJ], kind: str, serializer: Any, **state: Any) -> Processor[Any]:
    fn = compute_async if kind == "async" else compute
    if "retry_delay" in {f.name for f in dataclasses.fields(State)}:
        state.setdefault("retry_delay", 0)  # (9baee05 has none: these tests run there too)
    kind = "process" if kind == "inline" else kind
    states = [
        State("new", fn, kind=kind, concurrency=2, max_retries=1, **state),
        State("done", terminal=True),
    ]
    processor = Processor(None, states, serializer, inline=kind == "inline")
    processor.exec(run)
    return processor


def same_float(a: float, b: float) -> bool:
    """Equal bit for bit (NaN payloads, the sign of zero)."""
    return struct.pack("<d", a) == struct.pack("<d", b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", sorted(REFUSING))
def test_an_exec_returning_a_nonfinite_float_fails_its_attempt(
    tmp_path: Path, fmt: str, kind: str
) -> None:
    cls = REFUSING[fmt]
    path = tmp_path / SUFFIX[fmt]
    run = make_run(tmp_path)
    execute(run, kind, cls(path, OC, NJ))
    back = cls(path, OC, NJ).deserialize()  # 9baee05: CheckpointError, for good
    assert back == run
    jobs = {job.context.mode if not job.context.child else f"child of {job.parent}": job
            for job in back.jobs.values()}  # fmt: skip
    name = cls.__name__

    def refused(what: str, where: str) -> str:
        return (
            f"exec of state 'new' {what} holding a non-finite float ({where}), which a "
            f"{name} checkpoint cannot store"
        )

    returned = "returned a context"
    kicked = "kicked a job with a context"
    # Always non-finite: the job keeps its prior context, retries once, then fails.
    for mode, where, what in (
        ("nan", "nan at $.mean", returned),
        ("inf_with_error", "inf at $.mean", returned),
        ("kick_inf", "-inf at $.mean of kick 0", kicked),
    ):
        job = jobs[mode]
        assert job.state == "failed", mode
        assert job.state_errors == {"new": [refused(what, where)] * 2}, mode
        assert same_float(job.context.mean, 0.0)
        assert job.kicks == 0
    # Non-finite once: one error, then the retry's transition.
    job = jobs["nan_once"]
    assert (job.state, job.context.mean) == ("done", 2.0)
    assert job.state_errors == {"new": [refused(returned, "nan at $.mean")]}
    job = jobs["kick_once"]
    assert job.state == "done" and job.kicks == 1
    assert job.state_errors == {"new": [refused(kicked, "-inf at $.mean of kick 0")]}
    child = back.jobs[f"{job.id}->0"]
    assert (child.state, child.context.mean, child.parent) == ("done", 3.0, job.id)
    # What only looks like one to the byte search goes through untouched.
    job = jobs["lookalike"]
    assert job.state == "done" and not job.state_errors
    assert job.context.blob == LOOKALIKE and job.context.keyed == {INF: 1, -INF: 2}
    assert same_float(job.context.mean, -0.0)
    assert jobs["ok"].state == "done" and jobs["ok"].context.mean == 1.0
    assert len(back.jobs) == len(MODES) + 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_the_journal_keeps_nonfinite_floats(tmp_path: Path, kind: str) -> None:
    # msgpack holds them: nothing is refused (a regression test of over-refusing;
    # 9baee05 passes it too).
    path = tmp_path / SUFFIX["journal"]
    run = make_run(tmp_path)
    execute(run, kind, JournalSerializer(path, OC, NJ))
    back = JournalSerializer(path, OC, NJ).deserialize()
    assert all(job.state == "done" for job in back.jobs.values())
    errors = {job.id: job.state_errors for job in back.jobs.values() if job.state_errors}
    assert errors == {"3": {"new": ["a warning"]}}  # returned with the transition
    means = {job.id: job.context.mean for job in back.jobs.values()}
    assert same_float(means["1"], NAN) and same_float(means["2"], NAN)
    assert same_float(means["3"], INF)
    assert same_float(means["4->0"], -INF) and same_float(means["5->0"], -INF)
    assert same_float(means["6"], -0.0)


def _good_checkpoint(tmp_path: Path, fmt: str) -> tuple[Path, bytes]:
    path = tmp_path / SUFFIX[fmt]
    run: Run[OC, NJ] = Run("r", OC(), NJ)
    for i in range(5):
        run.add_job(NJ(i, marker=str(tmp_path)))
    execute(run, "thread", REFUSING[fmt](path, OC, NJ))
    return path, path.read_bytes()


def _assert_kept(path: Path, fmt: str, before: bytes) -> None:
    assert path.read_bytes() == before
    assert not path.with_name(path.name + "-wal").exists()
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []
    back = REFUSING[fmt](path, OC, NJ).deserialize()
    assert [job.context.mean for job in back.jobs.values()] == [1.0] * 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["loaded job", "added job", "overall context"])
@pytest.mark.parametrize("fmt", sorted(REFUSING))
def test_a_nonfinite_float_set_before_exec_is_refused_and_the_file_kept(
    tmp_path: Path, fmt: str, where: str
) -> None:
    path, before = _good_checkpoint(tmp_path, fmt)
    cls = REFUSING[fmt]
    run = cls(path, OC, NJ).deserialize()
    for job in run.jobs.values():
        job.state = "new"  # work to do
    if where == "loaded job":
        run.jobs["3"].context.mean = NAN
        what = r"job '3' holds a non-finite float \(nan at \$\.context\.mean\)"
    elif where == "added job":
        run.add_job(NJ(5, mean=-INF, marker=str(tmp_path)))
        what = r"job '5' holds a non-finite float \(-inf at \$\.context\.mean\)"
    else:
        run.overall.scale = INF
        what = r"the overall context holds a non-finite float \(inf at \$\.scale\)"
    message = f"{path}: {what}, which a {cls.__name__} checkpoint cannot store"
    with pytest.raises(CheckpointError, match=message):
        execute(run, "thread", cls(path, OC, NJ))
    assert all(job.state == "new" for job in run.jobs.values())  # nothing ran
    _assert_kept(path, fmt, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["job", "overall context", "report"])
@pytest.mark.parametrize("fmt", sorted(REFUSING))
def test_serialize_refuses_a_nonfinite_float_and_keeps_the_file(
    tmp_path: Path, fmt: str, where: str
) -> None:
    # The writers themselves, as the last line of defence (a redrive, a user's
    # serialize, anything the processor did not see).
    path, before = _good_checkpoint(tmp_path, fmt)
    cls = REFUSING[fmt]
    run = cls(path, OC, NJ).deserialize()
    if where == "job":
        run.jobs["4"].context.mean = -INF
        what = r"job '4' holds a non-finite float \(-inf at \$\.context\.mean\)"
    elif where == "overall context":
        run.overall.scale = NAN
        what = r"the overall context holds a non-finite float \(nan at \$\.scale\)"
    else:
        assert run.report is not None
        run.report["wall_seconds"] = INF
        what = r"the run's report holds a non-finite float \(inf at \$\.wall_seconds\)"
    for target in (path, tmp_path / ("new-" + path.name)):  # over a file, and a new one
        with pytest.raises(CheckpointError, match=f"{target}: {what}"):
            cls(target, OC, NJ).serialize(run)
        assert not target.with_name(target.name + "-wal").exists()
    assert not (tmp_path / ("new-" + path.name)).exists()
    assert not list(tmp_path.glob(f".new-{path.name}.tmp-*"))  # nothing left behind
    _assert_kept(path, fmt, before)


def spoil_overall(ac: Any, oc: OC, jc: NJ) -> Any:
    """A thread exec that changes the run's overall context (shared in this process),
    once some checkpoint writes happened."""
    if jc.n == 5:
        time.sleep(0.5)  # a few housekeeping ticks: flushes of the jobs before
        oc.scale = NAN
    jc.mean = 1.0
    return jc, "done"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", sorted(REFUSING))
def test_a_nonfinite_float_appearing_during_the_run_fails_it_and_keeps_a_readable_file(
    tmp_path: Path, fmt: str
) -> None:
    cls = REFUSING[fmt]
    path = tmp_path / SUFFIX[fmt]
    run: Run[OC, NJ] = Run("r", OC(), NJ)
    for i in range(10):
        run.add_job(NJ(i))
    states = [
        State("new", spoil_overall, kind="thread", concurrency=1),
        State("done", terminal=True),
    ]
    message = f"{path}: the overall context holds a non-finite float \\(nan at \\$\\.scale\\)"
    with pytest.raises(CheckpointError, match=message):
        Processor(None, states, cls(path, OC, NJ, interval=0.0)).exec(run)
    assert math.isnan(run.overall.scale)
    back = cls(path, OC, NJ).deserialize()  # an earlier checkpoint, valid
    assert back.overall == OC()
    done = [job.id for job in back.jobs.values() if job.state == "done"]
    assert done == [str(i) for i in range(len(done))] and len(done) >= 5
