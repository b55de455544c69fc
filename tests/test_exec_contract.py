"""The exec contract: return shapes, errors, retries, kicks and atomic transitions."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from typing import Any

import msgspec
import pytest

from jorbmp import (
    FAILED,
    Job,
    JournalSerializer,
    KickRequest,
    NilStatusListener,
    Processor,
    RateLimitError,
    Run,
    Serializer,
    State,
    StatusCount,
)
from jorbmp._execute import ContextCodec, run_batch
from jorbmp._protocol import FAILED_ATTEMPT, OK

pytestmark = pytest.mark.timeout(60)


class JC(msgspec.Struct):
    count: int = 0
    tag: str = ""
    pid: int = 0


class Other(msgspec.Struct):
    something: str = "x"


def run_of(n: int, state: str = "new") -> Run[None, JC]:
    run: Run[None, JC] = Run("contract")
    for i in range(n):
        run.add_job(JC(tag=str(i)), state=state)
    return run


def two_tuple(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "done"


def three_tuple_no_kicks(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "done", None


def four_tuple_str_error(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "parked", [], "remote said no"


def returns_int(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return 42


def returns_five(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, "done", None, None, None


def returns_bad_state_type(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, 7


def returns_other_type(ac: Any, oc: Any, jc: JC) -> Any:
    return Other(), "done"


def returns_unencodable_context(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    jc.tag = object()  # type: ignore[assignment]
    return jc, "done"


def returns_context_of_wrong_field_type(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count = "many"  # type: ignore[assignment]  # encodes, but is not a valid JC
    return jc, "done"


BAD_TAGS = {"20", "33", "41"}


def some_unencodable_contexts(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    if jc.tag in BAD_TAGS:
        jc.tag = object()  # type: ignore[assignment]
    return jc, "done"


def some_invalid_contexts(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    if jc.tag in BAD_TAGS:
        jc.count = "many"  # type: ignore[assignment]  # encodes, but is not a valid JC
    return jc, "done"


def some_unencodable_kicks(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.tag.startswith("kid"):
        return jc, "done"
    jc.count += 1
    kid = JC(tag="kid-" + jc.tag)
    if jc.tag in BAD_TAGS:
        kid.pid = 2**70  # too big for msgpack
    return jc, "done", [KickRequest(JC(tag="kid"), "done"), KickRequest(kid, "new")]


def some_invalid_kicks(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.tag.startswith("kid"):
        return jc, "done"
    jc.count += 1
    kid = JC(tag="kid-" + jc.tag)
    if jc.tag in BAD_TAGS:
        kid.count = "many"  # type: ignore[assignment]  # encodes, but is not a valid JC
    return jc, "done", [KickRequest(JC(tag="kid"), "done"), KickRequest(kid, "new")]


def kicks_unknown_state(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "done", [KickRequest(JC(tag="kid"), "done"), KickRequest(JC(), "nowhere")]


def kicks_bad_context(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "done", [KickRequest(JC(tag="ok"), "done"), KickRequest(Other(), "done")]


def kicks_context_of_wrong_field_type(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    bad = JC(count="many")  # type: ignore[arg-type]  # encodes, but is not a valid JC
    return jc, "done", [KickRequest(JC(tag="ok"), "done"), KickRequest(bad, "done")]


def kicks_unencodable_context(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    return jc, "done", [KickRequest(JC(tag=object()), "done")]  # type: ignore[arg-type]


def kick_not_a_request(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, "done", ["not a kick"]


def rate_limit_returned(ac: Any, oc: Any, jc: JC) -> Any:
    jc.count += 1
    if jc.count == 1:
        return jc, "done", None, RateLimitError("slow down", retry_after=0.5)
    return jc, "done"


def record_pid(ac: Any, oc: Any, jc: JC) -> Any:
    jc.pid = os.getpid()
    return jc, "done"


async def async_record_pid(ac: Any, oc: Any, jc: JC) -> Any:
    jc.pid = os.getpid()
    return jc, "done"


def states(fn: Any, **kw: Any) -> list[State]:
    return [State("new", fn, **kw), State("parked", terminal=True), State("done", terminal=True)]


@pytest.mark.parametrize("fn", [two_tuple, three_tuple_no_kicks])
def test_short_return_shapes(fn: Any) -> None:
    run = run_of(3)
    Processor(None, states(fn)).exec(run)
    assert all(j.state == "done" and j.context.count == 1 for j in run.jobs.values())


def test_returned_string_error_is_recorded_and_transition_applied() -> None:
    run = run_of(2)
    Processor(None, states(four_tuple_str_error, max_retries=0)).exec(run)
    for job in run.jobs.values():
        assert job.state == "parked"
        assert job.context.count == 1
        assert job.state_errors == {"new": ["remote said no"]}


@pytest.mark.parametrize(
    ("fn", "text"),
    [
        (returns_int, "returned int"),
        (returns_five, "returned a 5-tuple"),
        (returns_bad_state_type, "next_state of type int"),
        (returns_other_type, "not a valid JC"),
        (returns_unencodable_context, "returned a context that cannot be encoded: Encoding"),
        (returns_context_of_wrong_field_type, "not a valid JC"),
        (kicks_unknown_state, "unknown state 'nowhere'"),
        (kicks_bad_context, "kicked a job with a context that is not a valid JC: got Other"),
        (kicks_context_of_wrong_field_type, "kicked a job with a context that is not a valid JC"),
        (kicks_unencodable_context, "kicked a job with a context that cannot be encoded"),
        (kick_not_a_request, "expected KickRequest"),
    ],
)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_malformed_returns_are_failed_attempts_and_nothing_applies(
    fn: Any, text: str, kind: str
) -> None:
    run = run_of(1)
    Processor(None, states(fn, max_retries=1, kind=kind)).exec(run)
    job = run.jobs["0"]
    assert job.state == FAILED
    assert job.context.count == 0  # atomic: not even the context changed
    assert len(job.state_errors["new"]) == 2
    assert text in job.state_errors["new"][0], job.state_errors
    assert list(run.jobs) == ["0"]  # no kick was applied either


@pytest.mark.parametrize(
    ("fn", "text"),
    [
        (some_unencodable_contexts, "returned a context that cannot be encoded"),
        (some_invalid_contexts, "returned a context that is not a valid JC"),
    ],
)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_bad_context_in_a_batch_fails_only_its_own_job(fn: Any, text: str, kind: str) -> None:
    # Workers return a batch's contexts as one array (see jorbmp._protocol.Results):
    # one that cannot be encoded, or does not decode, must not fail its neighbours.
    run = run_of(60)
    Processor(None, states(fn, max_retries=0, kind=kind)).exec(run)
    for job in run.jobs.values():
        if job.context.tag in BAD_TAGS:
            assert (job.state, job.context.count) == (FAILED, 0)
            assert text in job.state_errors["new"][0], job.state_errors
        else:
            assert (job.state, job.context.count, job.recorded_errors()) == ("done", 1, {})


@pytest.mark.parametrize(
    ("fn", "text"),
    [
        (some_unencodable_kicks, "kicked a job with a context that cannot be encoded"),
        (some_invalid_kicks, "kicked a job with a context that is not a valid JC"),
    ],
)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_bad_kick_in_a_batch_fails_only_its_own_job(fn: Any, text: str, kind: str) -> None:
    # Kicks of a batch travel as one array too (see jorbmp._protocol.Results).
    run = run_of(60)
    Processor(None, states(fn, max_retries=0, kind=kind)).exec(run)
    parents = [job for job in run.jobs.values() if job.parent is None]
    for job in parents:
        kids = sorted(j.context.tag for j in run.jobs.values() if j.parent == job.id)
        if job.context.tag in BAD_TAGS:
            assert (job.state, job.context.count, kids) == (FAILED, 0, [])
            assert text in job.state_errors["new"][0], job.state_errors
        else:
            assert (job.state, job.context.count, job.recorded_errors()) == ("done", 1, {})
            assert kids == ["kid", "kid-" + job.context.tag]
    assert len(run.jobs) == 60 + 2 * (60 - len(BAD_TAGS))
    assert all(job.state == "done" for job in run.jobs.values() if job.parent is not None)


def kick_into_own_state(ac: Any, oc: Any, jc: JC) -> Any:
    order.append(jc.tag)
    if jc.tag.startswith("kid"):
        return jc, "done"
    jc.count += 1
    kids = [KickRequest(JC(tag=f"kid{jc.tag}.{2 * jc.count + i - 2}"), "new") for i in range(2)]
    return jc, ("new" if jc.count == 1 else "done"), kids


order: list[str] = []


@pytest.mark.parametrize("debug", [False, True])
def test_kicked_jobs_queue_before_their_parent(debug: bool, caplog: Any) -> None:
    # As with any transition, a parent's kicks join their queue before the parent
    # does, in the batch's order; the same with debug logging on (the general path).
    if debug:
        caplog.set_level(logging.DEBUG, logger="jorbmp")
    order.clear()
    run = run_of(3)
    Processor(None, states(kick_into_own_state, kind="thread")).exec(run)
    assert order == [
        "0", "1", "2",
        "kid0.0", "kid0.1", "0", "kid1.0", "kid1.1", "1", "kid2.0", "kid2.1", "2",
        "kid0.2", "kid0.3", "kid1.2", "kid1.3", "kid2.2", "kid2.3",
    ]  # fmt: skip
    assert run.jobs["0"].kicks == 4
    assert sorted(run.jobs) == sorted(
        [str(i) for i in range(3)] + [f"{i}->{k}" for i in range(3) for k in range(4)]
    )


def test_run_batch_keeps_plain_outcomes_in_columns_and_the_rest_whole() -> None:
    codec = ContextCodec(JC)
    jcs = [JC(tag=str(i)) for i in range(4)]
    results = run_batch("new", some_unencodable_contexts, None, None, jcs, codec)
    assert (results.plain, results.next_states, results.others) == ([0, 0, 0, 0], ["done"], [])
    decoded = msgspec.msgpack.decode(results.contexts, type=list[JC])
    assert decoded == [JC(count=1, tag=str(i)) for i in range(4)]
    # The coordinator's general path sees them as whole outcomes.
    whole = list(results.outcomes())
    assert [(o.code, o.next_state) for o in whole] == [(OK, "done")] * 4
    assert msgspec.msgpack.decode(whole[2].context, type=JC) == JC(count=1, tag="2")
    # One context that cannot be encoded: every outcome of the batch travels whole,
    # and only that one is a failed attempt.
    jcs = [JC(tag="1"), JC(tag="20")]
    results = run_batch("new", some_unencodable_contexts, None, None, jcs, codec)
    assert results.plain == [-1, -1]
    assert [o.code for o in results.others] == [OK, FAILED_ATTEMPT]
    assert "cannot be encoded" in (results.others[1].error or "")


def test_run_batch_keeps_kicks_in_columns() -> None:
    codec = ContextCodec(JC)
    jcs = [JC(tag=str(i)) for i in range(3)] + [JC(tag="kid")]
    results = run_batch("new", some_invalid_kicks, None, None, jcs, codec)
    assert (results.plain, results.next_states) == ([0, 0, 0, 0], ["done", "new"])
    assert (results.kick_counts, results.kick_states) == ([2, 2, 2, 0], [0, 1] * 3)
    kids = msgspec.msgpack.decode(results.kick_contexts, type=list[JC])
    assert [kid.tag for kid in kids] == ["kid", "kid-0", "kid", "kid-1", "kid", "kid-2"]
    # The coordinator's general path sees whole outcomes, each with its own kicks.
    whole = list(results.outcomes())
    assert [o.kick_states for o in whole] == [["done", "new"]] * 3 + [None]
    kicked = msgspec.msgpack.decode(whole[1].kick_contexts, type=list[JC])
    assert [kid.tag for kid in kicked] == ["kid", "kid-1"]
    # A kick that cannot be encoded: the batch travels whole, with the kicks.
    jcs = [JC(tag="1"), JC(tag="20")]
    results = run_batch("new", some_unencodable_kicks, None, None, jcs, codec)
    assert (results.plain, results.kick_counts) == ([-1, -1], [])
    assert [o.code for o in results.others] == [OK, FAILED_ATTEMPT]
    assert results.others[0].kick_states == ["done", "new"]
    assert "kicked a job with a context that cannot be encoded" in (results.others[1].error or "")


def test_returned_rate_limit_error_waits_retry_after_without_failing() -> None:
    run = run_of(1)
    start = time.monotonic()
    Processor(None, states(rate_limit_returned, max_retries=0, kind="thread")).exec(run)
    assert time.monotonic() - start >= 0.5
    job = run.jobs["0"]
    assert job.state == "done"
    assert job.context.count == 2
    assert job.state_errors == {"new": ["RateLimitError: slow down"]}


def test_max_retries_none_retries_until_success(tmp_path: Any) -> None:
    run = run_of(1)
    states_ = states(fail_until_file_count, max_retries=None, kind="thread", retry_delay=0)
    Processor(None, states_).exec(run)
    assert run.jobs["0"].state == "done"
    assert len(run.jobs["0"].state_errors["new"]) == 5


_attempts = {"n": 0}


def fail_until_file_count(ac: Any, oc: Any, jc: JC) -> Any:
    _attempts["n"] += 1
    if _attempts["n"] <= 5:
        raise OSError("transient")
    return jc, "done"


def test_error_state_can_be_a_declared_state() -> None:
    run = run_of(1)
    proc = Processor(
        None,
        [
            State("new", returns_int, max_retries=0, error_state="parked"),
            State("parked", terminal=True),
            State("done", terminal=True),
        ],
    )
    assert FAILED not in [s.trigger_state for s in proc.states]
    proc.exec(run)
    assert run.jobs["0"].state == "parked"


def test_process_state_runs_in_workers_async_and_thread_in_coordinator() -> None:
    for fn, kind, same in [
        (record_pid, "process", False),
        (async_record_pid, "auto", True),
        (record_pid, "thread", True),
    ]:
        run = run_of(2)
        Processor(None, states(fn, kind=kind, concurrency=2)).exec(run)
        pids = {j.context.pid for j in run.jobs.values()}
        assert (pids == {os.getpid()}) is same, (kind, pids)


def test_inline_runs_process_states_in_the_coordinator(monkeypatch: Any) -> None:
    run = run_of(3)
    Processor(None, states(record_pid, concurrency=2), inline=True).exec(run)
    assert {j.context.pid for j in run.jobs.values()} == {os.getpid()}
    monkeypatch.setenv("JORBMP_INLINE", "1")
    run = run_of(3)
    Processor(None, states(record_pid, concurrency=2)).exec(run)
    assert {j.context.pid for j in run.jobs.values()} == {os.getpid()}


def test_add_job_while_executing_raises() -> None:
    run = run_of(1)
    seen: list[str] = []

    class Adder(NilStatusListener):
        def status_update(self, counts: list[StatusCount]) -> None:
            try:
                run.add_job(JC())
            except RuntimeError as exc:
                seen.append(str(exc))

    Processor(None, states(two_tuple), None, Adder()).exec(run)
    assert seen and "while a processor is executing" in seen[0]
    run.add_job(JC())  # fine again afterwards
    assert list(run.jobs) == ["0", "1"]


def test_job_fields_and_ids() -> None:
    run: Run[None, JC] = Run("ids")
    assert run.add_job(JC()) == "0"
    assert run.add_job(JC(), state="middle") == "1"
    assert run.job_type is JC
    job = run.jobs["1"]
    assert (job.id, job.state, job.state_errors, job.parent) == ("1", "middle", {}, None)
    assert job.last_update.tzinfo is not None
    assert "middle=1" in repr(run) and "new=1" in repr(run)


def test_unknown_job_state_in_run_is_rejected_clearly() -> None:
    run = run_of(1, state="typo")
    with pytest.raises(ValueError, match="'typo'"):
        Processor(None, states(two_tuple)).exec(run)


def test_exec_async_inside_a_running_loop() -> None:
    async def main() -> Run[None, JC]:
        run = run_of(4)
        await Processor(None, states(two_tuple, concurrency=2)).exec_async(run)
        return run

    run = asyncio.run(main())
    assert run.counts() == {"done": 4}


def test_logging_is_silent_by_default_and_debug_names_jobs(caplog: Any) -> None:
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("jorbmp").handlers)
    with caplog.at_level(logging.DEBUG, logger="jorbmp"):
        Processor(None, states(two_tuple, kind="thread")).exec(run_of(1))
    assert any("job 0: new -> done" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def exits(ac: Any, oc: Any, jc: JC) -> Any:
    raise SystemExit(3)


async def async_exits(ac: Any, oc: Any, jc: JC) -> Any:
    raise SystemExit(3)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("fn", "kind", "inline"),
    [(exits, "thread", False), (async_exits, "async", False), (exits, "process", True),
     (exits, "process", False)],
)  # fmt: skip
def test_sys_exit_in_an_exec_is_a_failed_attempt(fn: Any, kind: str, inline: bool) -> None:
    run = run_of(1)
    Processor(None, states(fn, kind=kind, max_retries=1), inline=inline).exec(run)
    job = run.jobs["0"]
    assert job.state == FAILED
    assert job.state_errors == {"new": ["SystemExit: 3"] * 2}


def test_raised_traceback_is_logged_at_debug(caplog: Any) -> None:
    with caplog.at_level(logging.DEBUG, logger="jorbmp"):
        Processor(None, states(returns_then_raises, max_retries=0)).exec(run_of(1))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback (most recent call last)" in text
    assert "returns_then_raises" in text and "KeyError: 'missing'" in text


def returns_then_raises(ac: Any, oc: Any, jc: JC) -> Any:
    return {}["missing"]


class CountingSerializer(Serializer):
    """A user's serializer that overrides only `job_changed`."""

    def __init__(self) -> None:
        self.changed: list[tuple[str, str]] = []

    def job_changed(self, job: Job[Any]) -> None:
        self.changed.append((job.id, job.state))

    def deserialize(self) -> Run[Any, Any]:
        raise FileNotFoundError

    def serialize(self, run: Run[Any, Any]) -> None:
        pass


def kick_two(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.tag.startswith("kid"):
        return jc, "done"
    return jc, "done", [KickRequest(JC(tag="kid-a"), "new"), KickRequest(JC(tag="kid-b"), "done")]


def test_a_serializer_overriding_only_job_changed_hears_of_every_change() -> None:
    run = run_of(3)
    serializer = CountingSerializer()
    Processor(None, states(kick_two), serializer).exec(run)
    assert len(run.jobs) == 9
    # 3 parents finish, 6 kids are created, the 3 kicked into "new" finish too.
    assert len(serializer.changed) == 12
    last = dict(serializer.changed)
    assert last == {job_id: job.state for job_id, job in run.jobs.items()}


def to_done_in_a_thread(ac: Any, oc: Any, jc: JC) -> Any:
    return jc, "done"


@pytest.mark.parametrize(
    ("fn", "kind", "inline"),
    [
        (two_tuple, "process", False),
        (two_tuple, "process", True),
        (to_done_in_a_thread, "thread", False),
        (async_record_pid, "async", False),
    ],
)
def test_a_finished_run_is_freed_as_soon_as_it_is_dropped(
    fn: Any, kind: str, inline: bool, tmp_path: Any
) -> None:
    # The coordinator, its lanes and backends refer to each other; after the run they
    # must let go of it, or its jobs stay in memory until a full garbage collection.
    gc.disable()
    try:
        run = run_of(20)
        jobs = run.jobs
        serializer = JournalSerializer(tmp_path / "run.journal", job_type=JC)
        Processor(None, states(fn, kind=kind), serializer, inline=inline).exec(run)
        assert all(job.state == "done" for job in jobs.values())
        del run
        assert sys.getrefcount(jobs) == 2  # ``jobs`` and getrefcount's argument
    finally:
        gc.enable()
