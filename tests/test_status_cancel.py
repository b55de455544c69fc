"""Cancelling `exec_async` cuts the listener wait short, on every Python, and only then.

A cancelled `exec_async` abandons the run and must end promptly, even with a listener
stuck in a call: Python 3.10's tasks cannot tell they are being cancelled
(``Task.cancelling`` is 3.11+), so the wait must not depend on asking. Nor may a task
that once swallowed a cancellation of its own (3.11 keeps counting it) cut short the
wait of every later, uncancelled `exec_async`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from helpers_status import JC, StuckAfterFirst, make_run

from jorbmp import Processor, State, StatusCount, StatusListener

# The most `exec` waits at its end for a listener (jorbmp._mailbox.CLOSE_TIMEOUT).
CLOSE_BOUND = 5.0


async def astep(ac: Any, oc: Any, jc: JC) -> Any:
    await asyncio.sleep(0.3)
    return jc, "done"


def states() -> list[State]:
    return [State("new", astep, kind="async", concurrency=4), State("done", terminal=True)]


class SlowClose(StatusListener):
    """Closes in half a second (a last redraw over a slow link)."""

    def __init__(self) -> None:
        self.closed = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        pass

    def close(self) -> None:
        time.sleep(0.5)
        self.closed += 1


class Task310(asyncio.Task):  # type: ignore[type-arg]
    """A task as Python 3.10 has them: it cannot tell it is being cancelled."""

    cancelling = None  # type: ignore[assignment]


def run_with_310_tasks(coro: Coroutine[Any, Any, float]) -> float:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(lambda loop, coro, **kw: Task310(coro, loop=loop, **kw))
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def cancel_mid_run(listener: StuckAfterFirst) -> float:
    task = asyncio.ensure_future(
        Processor(None, states(), None, listener).exec_async(make_run(100))
    )
    await asyncio.sleep(0.6)  # mid-run (100 jobs of 0.3 s at 4: 7.5 s); listener stuck
    assert not task.done()
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - t0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tasks", ["3.10", "native"])
def test_cancelling_exec_async_mid_run_ends_the_wait_at_once(tasks: str) -> None:
    listener = StuckAfterFirst()
    try:
        if tasks == "3.10":
            took = run_with_310_tasks(cancel_mid_run(listener))
        else:
            took = asyncio.run(cancel_mid_run(listener))
    finally:
        listener.release.set()
    # 64d858c asked Task.cancelling(): on 3.10 the wait ran its full 5 s.
    assert took < 2.0, took


@pytest.mark.timeout(60)
def test_a_cancellation_swallowed_long_ago_does_not_cut_later_waits() -> None:
    async def main() -> tuple[float, int]:
        me = asyncio.current_task()
        assert me is not None
        asyncio.get_running_loop().call_later(0.05, me.cancel)
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, no uncancel():
            await asyncio.sleep(1)  # 3.11 counts it still
        listener = SlowClose()
        run = make_run(8)
        t0 = time.monotonic()
        await Processor(None, states(), None, listener).exec_async(run)
        assert run.counts() == {"done": 8}
        return time.monotonic() - t0, listener.closed

    took, closed = asyncio.run(main())
    # 64d858c: Task.cancelling() was still 1, so exec_async gave the listener 0.1 s and
    # returned before its close.
    assert closed == 1, took
    assert took < 1.0 + CLOSE_BOUND, took
