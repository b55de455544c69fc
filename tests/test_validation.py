"""`Processor(...)` rejects bad state lists with a ValueError naming the state."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from aiolimiter import AsyncLimiter

from jorbmp import FAILED, AIMDRateLimiter, Processor, State

pytestmark = pytest.mark.timeout(10)


def ok(ac: Any, oc: Any, jc: Any) -> Any:
    return jc, "done"


async def aok(ac: Any, oc: Any, jc: Any) -> Any:
    return jc, "done"


class AsyncCallable:
    async def __call__(self, ac: Any, oc: Any, jc: Any) -> Any:
        return jc, "done"


DONE = State("done", terminal=True)


def make_closure() -> Any:
    captured = 1

    def closure(ac: Any, oc: Any, jc: Any) -> Any:
        return jc, "done" if captured else "new"

    return closure


@pytest.mark.parametrize(
    ("states", "match"),
    [
        ([State("a", ok), State("a", ok), DONE], "state 'a' is declared twice"),
        ([State("a"), DONE], "state 'a' is not terminal and has no exec"),
        ([State("a", ok, concurrency=0), DONE], "state 'a': concurrency must be >= 1"),
        ([State("lam", lambda ac, oc, jc: (jc, "done")), DONE], "state 'lam': exec .* pickled"),
        ([State("clo", make_closure()), DONE], "state 'clo': exec .* pickled"),
        ([State("co", aok, kind="process"), DONE], "state 'co': exec is a coroutine"),
        ([State("co", aok, kind="thread"), DONE], "state 'co': exec is a coroutine"),
        ([State("sync", ok, kind="async"), DONE], "state 'sync': kind='async' needs"),
        ([State("a", ok, error_state="nope"), DONE], "state 'a': error_state 'nope'"),
        ([State("a", ok, kind="fiber"), DONE], "state 'a': kind must be one of"),  # type: ignore[arg-type]
        ([State("a", ok, rate_limit=0), DONE], "state 'a': rate_limit must be > 0"),
        ([State("a", ok, rate_limit="fast"), DONE], "state 'a': rate_limit must be"),
        ([State("a", ok, timeout=-1), DONE], "state 'a': timeout must be > 0"),
        ([State("a", ok, kind="thread", timeout=1), DONE], "state 'a': timeout is supported"),
        ([State("a", ok, max_retries=-1), DONE], "state 'a': max_retries"),
    ],
)
def test_invalid_states_raise_value_error_naming_the_state(states: list[State], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Processor(None, states)


def test_nested_function_is_rejected_at_construction() -> None:
    def nested(ac: Any, oc: Any, jc: Any) -> Any:
        return jc, "done"

    with pytest.raises(ValueError, match="state 'n'.*module level"):
        Processor(None, [State("n", nested), DONE])
    # The same function is fine in the coordinator (thread kind: no pickling needed).
    Processor(None, [State("n", nested, kind="thread"), DONE])


def test_valid_forms_are_accepted() -> None:
    proc = Processor(
        None,
        [
            State("a", ok, rate_limit=5.5),
            State("b", ok, rate_limit=AsyncLimiter(10, 1)),
            State("c", aok, rate_limit=AIMDRateLimiter(5, 1, 10), timeout=2),
            State("d", AsyncCallable()),
            State("e", functools.partial(ok), kind="process"),
            State("f", ok, terminal=True),  # terminal with exec: exec is ignored (jorb)
            DONE,
        ],
    )
    assert proc.states[-1].trigger_state == FAILED and proc.states[-1].terminal
    assert proc.states[3].resolved_kind() == "async"


def test_failed_not_added_when_declared_or_unused() -> None:
    proc = Processor(None, [State("a", ok), State(FAILED, terminal=True), DONE])
    assert [s.trigger_state for s in proc.states] == ["a", FAILED, "done"]
    proc = Processor(None, [State("a", ok, error_state="done"), DONE])
    assert [s.trigger_state for s in proc.states] == ["a", "done"]


def test_ac_factory_must_be_picklable() -> None:
    with pytest.raises(ValueError, match="ac_factory"):
        Processor(None, [State("a", ok), DONE], ac_factory=lambda: 1)
