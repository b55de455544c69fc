"""``Processor(..., memory_limit=...)`` (issue 18), with real processes: the RSS of the
coordinator and its workers, watched from the test by a psutil monitor, stays near the
limit although the state's concurrency would let much more run; a job too big to run
alone ends in its error_state charged with "exceeded memory limit"; a job that grows
beside others is taken back and retried uncharged; what a limit means in bytes
(fractions, the cgroup's limit) and the errors a user can cause.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from jorbmp import Processor, Run, State
from jorbmp._memory_limit import available_memory, resolve_memory_limit
from jorbmp.bench._memory_fat import measure_fat

pytestmark = pytest.mark.timeout(180)

CTX = multiprocessing.get_context("fork")
MB = 1_000_000
PAGE = 4096


class Fat(msgspec.Struct):
    mb: int = 0  # touched at once
    hold: float = 0.0  # seconds held
    grow_mb: int = 0  # touched after ``grow_after`` seconds, on the first attempt only
    grow_after: float = 0.0
    marks: str = ""  # a directory: one file per attempt, named by the tag
    tag: str = ""


def _touch(mb: int) -> bytearray:
    block = bytearray(mb * MB)
    for i in range(0, len(block), PAGE):
        block[i] = 1
    return block


def fat(ac: None, oc: None, jc: Fat) -> tuple[Fat, str]:
    first = True
    if jc.marks:
        attempts = Path(jc.marks)
        first = not any(attempts.glob(f"{jc.tag}.*"))
        (attempts / f"{jc.tag}.{len(list(attempts.iterdir()))}").touch()
    held = [_touch(jc.mb)]
    if jc.grow_mb and first:
        time.sleep(jc.grow_after)
        held.append(_touch(jc.grow_mb))
    time.sleep(jc.hold)
    return jc, "done"


def tiny(ac: None, oc: None, jc: Fat) -> tuple[Fat, str]:
    return jc, "done"


def _states(**kw: object) -> list[State]:
    return [State("new", fat, **kw), State("done", terminal=True)]  # type: ignore[arg-type]


def _run(*jobs: Fat) -> Run[None, Fat]:
    run: Run[None, Fat] = Run("fat", overall=None, job_type=Fat)
    for jc in jobs:
        run.add_job(jc)
    return run


def test_the_limit_holds_while_concurrency_would_run_far_more() -> None:
    # Scenario 1 of the memory bench, small. Room for the coordinator, its workers'
    # own memory and 2-3 jobs of 80 MB; concurrency 6 alone would run 6 (~480 MB of
    # jobs). What the tree uses (the coordinator's RSS, each worker's USS) stays near
    # the limit.
    limit = psutil.Process().memory_info().rss + 6 * 20 * MB + 200 * MB
    figures = measure_fat(12, 6, limit, nbytes=80 * MB, hold=0.3)
    assert figures.done == 12 and figures.errors == 0 and figures.died == 0
    assert figures.use_peak <= 1.1 * limit, (figures.use_peak, limit)


def test_a_job_too_big_to_run_alone_is_charged_and_ends_in_its_error_state() -> None:
    # Room for the coordinator and a worker's own memory, not for 600 MB more (a
    # multiple of the coordinator's RSS grew with the suite's process: 2 x 500 MB).
    limit = psutil.Process().memory_info().rss + 150 * MB
    run = _run(Fat(mb=600, hold=5.0))
    states = [
        State("new", fat, max_retries=1, error_state="too_big"),
        State("done", terminal=True),
        State("too_big", terminal=True),
    ]
    started = time.monotonic()
    Processor(None, states, mp_context="fork", memory_limit=limit).exec(run)
    job = run.jobs["0"]
    assert job.state == "too_big"
    errors = job.state_errors["new"]
    assert len(errors) == 2, errors  # the attempt and its one retry, each charged
    for text in errors:
        m = re.fullmatch(r"exceeded memory limit \((\d+) bytes, limit (\d+)\)", text)
        assert m is not None, text
        assert int(m.group(2)) == limit and int(m.group(1)) > limit
    assert time.monotonic() - started < 9.0  # taken back, not left to hold for 5 s twice


def test_a_job_that_grows_beside_others_is_taken_back_and_retried_uncharged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for the coordinator, 4 workers' own memory and their 20 MB jobs, not for
    # the grower's 500 MB more (the limit was 5 x the coordinator's RSS: in a long
    # suite's process, room for the grower too, under own-memory accounting).
    limit = psutil.Process().memory_info().rss + 6 * 20 * MB + 200 * MB
    marks = str(tmp_path)
    jobs = [Fat(mb=20, hold=1.5, marks=marks, tag=f"small{i}") for i in range(6)]
    # Starts small like the others, then grows far past what they taught the governor.
    jobs.insert(3, Fat(mb=20, hold=0.5, grow_mb=500, grow_after=0.3, marks=marks, tag="grower"))
    run = _run(*jobs)
    with caplog.at_level(logging.WARNING, logger="jorbmp"):
        Processor(None, _states(concurrency=4), mp_context="fork", memory_limit=limit).exec(run)
    assert all(job.state == "done" for job in run.jobs.values())
    assert all(not job.state_errors and not job.retries for job in run.jobs.values())
    assert len(list(tmp_path.glob("grower.*"))) == 2  # killed once, then ran again
    taken = [r.getMessage() for r in caplog.records if "taking back worker" in r.getMessage()]
    assert taken and all("retried uncharged" in t for t in taken), taken


class Staged(msgspec.Struct):
    mb: int
    then_big: bool = False  # go on to state "big" once done here
    done_at: float = 0.0


def staged(ac: None, oc: None, jc: Staged) -> tuple[Staged, str]:
    held = _touch(jc.mb)
    time.sleep(0.3)
    del held
    jc.done_at = time.time()
    return (Staged(BIG_MB), "big") if jc.then_big else (jc, "done")


BIG_MB = 150


def test_a_state_of_big_execs_is_not_starved_by_a_state_of_small_ones() -> None:
    # Small execs fill the room; each that ends frees too little for a big one, and
    # its own state takes it back at once. The big state, held back for a second with
    # nothing running, is served first: its jobs end while small ones still wait.
    # Room for the coordinator, 8 workers' own memory and 8 small execs, with less
    # than a big one's 150 MB to spare (9 x the coordinator's RSS had room for all of
    # them under own-memory accounting: the test no longer held anything back).
    limit = psutil.Process().memory_info().rss + 8 * 20 * MB + 8 * 40 * MB + 40 * MB
    run: Run[None, Staged] = Run("starve", overall=None, job_type=Staged)
    for i in range(90):
        run.add_job(Staged(40, then_big=i in (16, 17)))
    states = [
        State("new", staged, concurrency=8),
        State("big", staged, concurrency=2),
        State("done", terminal=True),
    ]
    Processor(None, states, mp_context=CTX, memory_limit=limit).exec(run)
    assert all(job.state == "done" and not job.state_errors for job in run.jobs.values())
    big = [j.context.done_at for j in run.jobs.values() if j.context.mb == BIG_MB]
    small = [j.context.done_at for j in run.jobs.values() if j.context.mb != BIG_MB]
    assert len(big) == 2 and max(big) < max(small), (sorted(big), max(small))


# (running now, the most seen): created before the workers fork, so all share them.
_COUNT: Any = None


def counted(ac: None, oc: None, jc: Fat) -> tuple[Fat, str]:
    running, peak = _COUNT
    with running.get_lock():
        running.value += 1
        peak.value = max(peak.value, running.value)
    time.sleep(jc.hold)
    with running.get_lock():
        running.value -= 1
    return jc, "done"


@pytest.mark.parametrize("limit", [None, 0.5])
def test_a_state_of_small_execs_opens_up_to_its_concurrency(limit: float | None) -> None:
    # Unchanged without a limit; with one, a state whose execs use next to nothing
    # starts with one exec, learns, and opens up within a few.
    global _COUNT
    _COUNT = (CTX.Value("i", 0), CTX.Value("i", 0))
    run = _run(*[Fat(hold=0.3) for _ in range(24)])
    states = [State("new", counted, concurrency=6), State("done", terminal=True)]
    Processor(None, states, mp_context=CTX, memory_limit=limit).exec(run)
    assert all(job.state == "done" for job in run.jobs.values())
    assert _COUNT[1].value == 6


def test_workers_recycled_after_each_job_still_teach_the_limit() -> None:
    # With max_jobs_per_worker=1 each worker leaves with its first job's results, before
    # a sample could see it finished: the state was never learnt and ran one exec at a
    # time for the whole run.
    global _COUNT
    _COUNT = (CTX.Value("i", 0), CTX.Value("i", 0))
    run = _run(*[Fat(hold=0.3) for _ in range(16)])
    states = [
        State("new", counted, concurrency=4, max_jobs_per_worker=1),
        State("done", terminal=True),
    ]
    Processor(None, states, mp_context=CTX, memory_limit=0.5).exec(run)
    assert all(job.state == "done" for job in run.jobs.values())
    assert _COUNT[1].value >= 3, _COUNT[1].value


def test_thread_states_beside_a_limit_run_as_before() -> None:
    # The limit governs local process workers; thread and async execs run in the
    # coordinator, whose RSS counts, but nothing holds them back.
    run = _run(*[Fat() for _ in range(20)])
    states = [State("new", tiny, kind="thread", concurrency=4), State("done", terminal=True)]
    Processor(None, states, memory_limit=0.5).exec(run)
    assert all(job.state == "done" for job in run.jobs.values())


@pytest.mark.parametrize(
    "value", [0, -1, 0.0, -0.5, math.nan, math.inf, "1GB", True, [1], -math.inf]
)
def test_a_memory_limit_that_is_not_bytes_or_a_fraction_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        Processor(None, _states(), memory_limit=value)  # type: ignore[arg-type]


def test_a_limit_the_coordinator_already_exceeds_is_refused_before_anything_runs() -> None:
    run = _run(Fat())
    proc = Processor(None, _states(), memory_limit=1000)
    with pytest.raises(ValueError, match=r"memory_limit of 1000 bytes is not above the \d+ bytes"):
        proc.exec(run)
    assert run.jobs["0"].state == "new" and not run.jobs["0"].state_errors


def test_fractions_and_bytes_above_what_is_available(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_memory_limit(None) is None
    assert resolve_memory_limit(1.0, available=8 * MB) == 8 * MB
    assert resolve_memory_limit(0.25, available=8 * MB) == 2 * MB
    assert resolve_memory_limit(1.5e6, available=8 * MB) == 1_500_000  # a float above 1: bytes
    assert resolve_memory_limit(3 * MB, available=8 * MB) == 3 * MB
    with caplog.at_level(logging.WARNING, logger="jorbmp"):
        assert resolve_memory_limit(9 * MB, available=8 * MB) == 8 * MB
    assert "above the 8000000 bytes available" in caplog.text


def _cgroup_tree(tmp: Path, v2: dict[str, str], v1: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/self (cgroup, mountinfo) and cgroup mounts under ``tmp``: this
    process in /a/b of both hierarchies; ``v2``/``v1``: level ("", "a", "a/b") -> limit."""
    proc, root = tmp / "proc", tmp / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("4:memory:/a/b\n0::/a/b\n")
    (proc / "self" / "mountinfo").write_text(
        f"30 23 0:26 / {root / 'unified'} rw - cgroup2 cgroup2 rw\n"
        f"35 31 0:32 / {root / 'memory'} rw - cgroup cgroup rw,memory\n"
    )
    for mount, name, limits in (
        ("unified", "memory.max", v2),
        ("memory", "memory.limit_in_bytes", v1),
    ):
        for level, text in limits.items():
            d = root / mount / level
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text + "\n")
    return proc, root


def test_the_cgroup_memory_limit_of_a_parent_applies(tmp_path: Path) -> None:
    physical = int(psutil.virtual_memory().total)
    proc, root = _cgroup_tree(tmp_path, {"a": "123456789", "a/b": "max"}, {})
    assert available_memory(proc, root) == 123456789
    assert resolve_memory_limit(0.5, available_memory(proc, root)) == 123456789 // 2
    proc, root = _cgroup_tree(tmp_path / "v1", {}, {"a/b": "222222222", "": "9223372036854771712"})
    assert available_memory(proc, root) == 222222222
    proc, root = _cgroup_tree(tmp_path / "none", {"a/b": "max", "a": "garbage"}, {"": "-1"})
    assert available_memory(proc, root) == physical
    assert available_memory(tmp_path / "nothing", tmp_path / "none") == physical
    assert available_memory() <= physical and os.path.exists("/proc")
