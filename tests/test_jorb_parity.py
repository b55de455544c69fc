"""Ports of every behaviour in Go jorb's processor tests, plus what jorbmp adds on top."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgspec
import pytest
from aiolimiter import AsyncLimiter

from jorbmp import (
    FAILED,
    AIMDRateLimiter,
    JsonSerializer,
    KickRequest,
    Processor,
    RateLimitError,
    Run,
    State,
    Stopped,
)

pytestmark = pytest.mark.timeout(60)


class JC(msgspec.Struct):
    count: int = 0
    passes: int = 0
    note: str = ""


class OC(msgspec.Struct):
    workdir: str = "/tmp"


# -- exec functions (module level: process states pickle them by reference) ----------


def to_done(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    jc.count += 1
    return jc, "done"


def to_middle(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    jc.count += 1
    return jc, "middle"


async def sleep_1s_to_done(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    await asyncio.sleep(1)
    return jc, "done"


async def sleep_1s_to_middle(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    await asyncio.sleep(1)
    return jc, "middle"


def retry_with_error_until_3(ac: Any, oc: Any, jc: JC) -> tuple[JC, str, None, str | None]:
    jc.count += 1
    if jc.count <= 3:
        return jc, "new", None, f"not yet ({jc.count})"
    return jc, "done", None, None


def loop_10_times(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    jc.count += 1
    return jc, ("done" if jc.count >= 10 else "new")


def error_to_done(ac: Any, oc: Any, jc: JC) -> tuple[JC, str, None, Exception]:
    return jc, "done", None, ValueError(f"bad thing {jc.note}")


def fan_out_10(ac: Any, oc: Any, jc: JC) -> tuple[JC, str, list[KickRequest[JC]]]:
    kicks = [KickRequest(JC(count=i, note=jc.note), "leaf") for i in range(10)]
    return jc, "done", kicks


def leaf(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    jc.passes += 1
    return jc, "done"


def always_raises(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    jc.count += 1  # must not survive: a raised exec keeps the prior context
    raise RuntimeError(f"boom {jc.note}")


def unknown_next(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    return jc, "nowhere"


def new_run(n: int, name: str = "test", state: str = "new") -> Run[OC, JC]:
    run: Run[OC, JC] = Run(name, OC())
    for i in range(n):
        run.add_job(JC(note=str(i)), state=state)
    return run


def states_of(run: Run[Any, Any]) -> dict[str, int]:
    return run.counts()


# -- jorb's tests ------------------------------------------------------------------


def test_ten_one_second_async_jobs_run_in_parallel() -> None:
    run = new_run(10)
    proc = Processor(
        None, [State("new", sleep_1s_to_done, concurrency=10), State("done", terminal=True)]
    )
    start = time.monotonic()
    proc.exec(run)
    assert time.monotonic() - start < 2.0
    assert states_of(run) == {"done": 10}


def test_all_terminal_run_executes_nothing_and_sends_one_update(listener: Any) -> None:
    run = new_run(3, state="done")
    before = {k: v.last_update for k, v in run.jobs.items()}
    Processor(None, [State("new", to_done), State("done", terminal=True)], None, listener).exec(run)
    assert len(listener.updates) == 1
    assert listener.last()["done"].completed == 3
    assert {k: v.last_update for k, v in run.jobs.items()} == before


def test_two_sequential_states() -> None:
    run = new_run(20)
    states = [
        State("new", to_middle, concurrency=2),
        State("middle", to_done, concurrency=2),
        State("done", terminal=True),
    ]
    Processor(None, states).exec(run)
    assert states_of(run) == {"done": 20}
    assert all(job.context.count == 2 for job in run.jobs.values())
    assert all(job.state_errors == {} for job in run.jobs.values())


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_retry_by_returning_same_state_with_error(kind: str) -> None:
    run = new_run(3)
    states = [
        State("new", retry_with_error_until_3, kind=kind, max_retries=0),  # type: ignore[arg-type]
        State("done", terminal=True),
    ]
    Processor(None, states).exec(run)
    for job in run.jobs.values():
        assert job.state == "done"
        assert job.context.count == 4  # the context kept every update
        assert job.state_errors == {"new": ["not yet (1)", "not yet (2)", "not yet (3)"]}


def test_two_rate_limited_states() -> None:
    run = new_run(10)
    states = [
        State("new", sleep_1s_to_middle, concurrency=10, rate_limit=10),
        State("middle", sleep_1s_to_done, concurrency=10, rate_limit=10),
        State("done", terminal=True),
    ]
    start = time.monotonic()
    Processor(None, states).exec(run)
    assert time.monotonic() - start < 4.0
    assert states_of(run) == {"done": 10}


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_rate_limit_one_per_second(kind: str) -> None:
    run = new_run(3)
    states = [
        State("new", to_done, concurrency=3, rate_limit=1, kind=kind),
        State("done", terminal=True),
    ]  # type: ignore[arg-type]
    start = time.monotonic()
    Processor(None, states).exec(run)
    assert time.monotonic() - start > 2.0
    assert states_of(run) == {"done": 3}


def test_aiolimiter_instance_is_shared_by_all_workers() -> None:
    run = new_run(4)
    limiter = AsyncLimiter(1, 0.5)  # one per half second
    states = [
        State("new", to_done, concurrency=4, rate_limit=limiter),
        State("done", terminal=True),
    ]
    start = time.monotonic()
    Processor(None, states).exec(run)
    assert time.monotonic() - start > 1.4
    assert states_of(run) == {"done": 4}


def test_loop_exits_after_ten_passes() -> None:
    run = new_run(5)
    Processor(
        None, [State("new", loop_10_times, concurrency=2), State("done", terminal=True)]
    ).exec(run)
    assert all(job.context.count == 10 and job.state == "done" for job in run.jobs.values())


def test_errors_recorded_and_run_reloaded_from_json(tmp_path: Any) -> None:
    path = tmp_path / "run.json"
    run = new_run(5)
    ser = JsonSerializer(path, overall_type=OC, job_type=JC)
    Processor(None, [State("new", error_to_done), State("done", terminal=True)], ser).exec(run)
    loaded = JsonSerializer(path, overall_type=OC, job_type=JC).deserialize()
    assert loaded == run
    assert loaded.overall == OC()
    for job_id, job in loaded.jobs.items():
        assert job.state == "done"
        assert job.state_errors == {"new": [f"ValueError: bad thing {job_id}"]}
        assert isinstance(job.context, JC)


def test_first_step_fans_out_into_ten_by_ten_kicks() -> None:
    run = new_run(10)
    states = [
        State("new", fan_out_10, concurrency=2),
        State("leaf", leaf, concurrency=2),
        State("done", terminal=True),
    ]
    Processor(None, states).exec(run)
    assert len(run.jobs) == 110
    assert states_of(run) == {"done": 110}
    for p in range(10):
        for n in range(10):
            child = run.jobs[f"{p}->{n}"]
            assert child.parent == str(p)
            assert child.context.count == n
            assert child.context.note == str(p)
            assert child.context.passes == 1


class Budget:
    """A shared budget of exec runs (the AC of the fairness test)."""

    def __init__(self, runs: int) -> None:
        self.left = runs
        self.lock = threading.Lock()


def spend_budget(ac: Budget, oc: Any, jc: JC) -> tuple[JC, str]:
    with ac.lock:
        if ac.left <= 0:
            return jc, "done"
        ac.left -= 1
    jc.passes += 1
    return jc, "new"


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_fifo_fairness(kind: str) -> None:
    run = new_run(5)
    states = [State("new", spend_budget, concurrency=1, kind=kind), State("done", terminal=True)]  # type: ignore[arg-type]
    Processor(Budget(10), states).exec(run)
    assert [job.context.passes for job in run.jobs.values()] == [2, 2, 2, 2, 2]


class Flaky:
    """An async 'API' that rate limits the first three calls."""

    def __init__(self) -> None:
        self.calls = 0


async def call_flaky_api(ac: Flaky, oc: Any, jc: JC) -> tuple[JC, str]:
    ac.calls += 1
    if ac.calls <= 3:
        raise RateLimitError("429 Too Many Requests")
    return jc, "done"


def test_aimd_backs_off_on_three_rate_limit_errors() -> None:
    run = new_run(1)
    limiter = AIMDRateLimiter(20, 1, 50, interval=0.01)
    states = [
        State("new", call_flaky_api, rate_limit=limiter, max_retries=0),
        State("done", terminal=True),
    ]
    api = Flaky()
    Processor(api, states).exec(run)
    job = run.jobs["0"]
    assert job.state == "done"  # rate limit errors are not failed attempts
    assert job.state_errors == {"new": ["RateLimitError: 429 Too Many Requests"] * 3}
    assert api.calls == 4
    assert limiter.rate < 20


async def forever(ac: Any, oc: Any, jc: JC) -> tuple[JC, str]:
    await asyncio.sleep(0.01)
    jc.count += 1
    return jc, "new"


def test_stop_a_never_ending_run_vs_a_completing_one(tmp_path: Any) -> None:
    run = new_run(3)
    ser = JsonSerializer(tmp_path / "r.json", overall_type=OC, job_type=JC)
    proc = Processor(
        None, [State("new", forever, concurrency=3), State("done", terminal=True)], ser
    )
    threading.Timer(0.3, proc.stop).start()
    start = time.monotonic()
    with pytest.raises(Stopped):
        proc.exec(run)
    assert time.monotonic() - start < 5
    loaded = JsonSerializer(tmp_path / "r.json", overall_type=OC, job_type=JC).deserialize()
    assert loaded == run
    assert all(job.context.count > 0 for job in loaded.jobs.values())

    done_run = new_run(3)
    Processor(None, [State("new", to_done), State("done", terminal=True)]).exec(done_run)
    assert states_of(done_run) == {"done": 3}


# -- what jorbmp adds ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_raised_exception_retries_then_failed(kind: str) -> None:
    run = new_run(2)
    states = [State("new", always_raises, kind=kind, max_retries=2), State("done", terminal=True)]  # type: ignore[arg-type]
    proc = Processor(None, states)
    assert [s.trigger_state for s in proc.states] == ["new", "done", FAILED]
    proc.exec(run)
    for job_id, job in run.jobs.items():
        assert job.state == FAILED
        assert job.context.count == 0  # prior context kept
        assert job.state_errors == {"new": [f"RuntimeError: boom {job_id}"] * 3}


def test_unknown_next_state_is_a_recorded_failed_attempt() -> None:
    run = new_run(1)
    Processor(None, [State("new", unknown_next, max_retries=1), State("done", terminal=True)]).exec(
        run
    )
    job = run.jobs["0"]
    assert job.state == FAILED
    assert len(job.state_errors["new"]) == 2
    assert "unknown next state 'nowhere'" in job.state_errors["new"][0]


def test_kick_ids_never_collide_across_loops_and_restarts(tmp_path: Any) -> None:
    path = tmp_path / "k.json"
    run = new_run(1)
    states = [State("new", kick_once_per_pass), State("done", terminal=True)]
    Processor(None, states, JsonSerializer(path, OC, JC)).exec(run)
    assert sorted(run.jobs) == ["0", "0->0", "0->1", "0->2"]
    # Resume: the parent goes back to "new" and kicks again; ids continue from its count.
    loaded = JsonSerializer(path, OC, JC).deserialize()
    loaded.jobs["0"].state = "new"
    loaded.jobs["0"].context.count = 0
    Processor(None, states, JsonSerializer(path, OC, JC)).exec(loaded)
    assert sorted(loaded.jobs) == ["0", "0->0", "0->1", "0->2", "0->3", "0->4", "0->5"]
    assert loaded.jobs["0->3"].parent == "0"


def test_kicks_skip_ids_already_taken() -> None:
    # A parent whose kick count was lost (reset here by hand) must not replace the jobs
    # it kicked before: its new kicks take the next free ids.
    run = new_run(1)
    states = [State("new", kick_once_per_pass), State("done", terminal=True)]
    Processor(None, states).exec(run)
    before = {job_id: job.last_update for job_id, job in run.jobs.items() if job.parent}
    run.jobs["0"].state, run.jobs["0"].kicks, run.jobs["0"].context.count = "new", 0, 0
    Processor(None, states).exec(run)
    assert sorted(run.jobs) == ["0", "0->0", "0->1", "0->2", "0->3", "0->4", "0->5"]
    assert all(run.jobs[job_id].last_update == t for job_id, t in before.items())
    assert run.jobs["0"].kicks == 6


def kick_300(ac: Any, oc: Any, jc: JC) -> tuple[JC, str, list[KickRequest[JC]]]:
    if jc.note == "kid":
        return jc, "done", []
    return jc, "done", [KickRequest(JC(note="kid", count=i), "new") for i in range(300)]


def test_a_parent_kicking_hundreds_numbers_them_all() -> None:
    run = new_run(1)
    Processor(None, [State("new", kick_300), State("done", terminal=True)]).exec(run)
    assert len(run.jobs) == 301
    assert [run.jobs[f"0->{i}"].context.count for i in range(300)] == list(range(300))
    assert all(job.state == "done" for job in run.jobs.values())


def kick_once_per_pass(ac: Any, oc: Any, jc: JC) -> tuple[JC, str, list[KickRequest[JC]]]:
    jc.count += 1
    return jc, ("done" if jc.count >= 3 else "new"), [KickRequest(JC(note="kid"), "done")]
