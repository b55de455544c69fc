"""A state's rate limit is in the status (`StatusCount.rate_limit`), on its tqdm bar
and plain line, and in the run report (issue 15, item 6: show the limiter's rate)."""

from __future__ import annotations

import io
from typing import Any

import msgspec
import pytest
from aiolimiter import AsyncLimiter
from helpers_status import Recorder

from jorbmp import (
    AIMDRateLimiter,
    Processor,
    RateLimitError,
    Run,
    State,
    StatusCount,
    StatusListener,
    TqdmStatusListener,
)
from jorbmp.progress import _limit

pytestmark = pytest.mark.timeout(30)


class J(msgspec.Struct):
    n: int


async def ok(ac: Any, oc: Any, jc: J) -> tuple[J, str]:
    return jc, "done"


class Limited:
    """The app context: the first ``limited`` calls answer 429."""

    def __init__(self, limited: int) -> None:
        self.limited = limited


async def flaky(ac: Limited, oc: Any, jc: J) -> tuple[J, str]:
    if ac.limited > 0:
        ac.limited -= 1
        raise RateLimitError("429")
    return jc, "done"


def run_of(n: int) -> Run[Any, J]:
    run: Run[Any, J] = Run("r", None, J)
    for i in range(n):
        run.add_job(J(n=i))
    return run


@pytest.mark.parametrize(
    ("rate_limit", "shown"), [(50, 50.0), (AsyncLimiter(10, 0.5), 20.0), (None, 0.0)]
)
def test_status_and_report_show_the_rate_limit(rate_limit: object, shown: float) -> None:
    recorder = Recorder()
    states = [State("new", ok, rate_limit=rate_limit), State("done", terminal=True)]
    proc = Processor(None, states, status_listener=recorder)
    proc.exec(run_of(10))
    assert recorder.updates
    for counts in recorder.updates:
        assert counts[0].rate_limit == shown
        assert counts[1].rate_limit == 0.0  # a terminal state has no limit
    report = proc.last_report
    assert report is not None
    assert report.states[0].rate_limit == shown
    header = str(report).splitlines()[1]
    assert header.rstrip().endswith("limit") == bool(shown)
    if shown:
        assert f"{shown:,.0f}/s" in str(report).splitlines()[2]


def test_status_follows_an_aimd_limiter() -> None:
    """Two 429s cut the rate (once: within one interval) and the status shows it; the
    last update and the report show the rate the limiter holds at the end."""
    limiter = AIMDRateLimiter(40, 1, 100)
    recorder = Recorder()
    states = [State("new", flaky, rate_limit=limiter), State("done", terminal=True)]
    proc = Processor(Limited(2), states, status_listener=recorder)
    proc.exec(run_of(20))
    assert recorder.updates[0][0].rate_limit == 40
    assert min(counts[0].rate_limit for counts in recorder.updates) == 20
    assert recorder.updates[-1][0].rate_limit == limiter.rate  # (it may climb again)
    report = proc.last_report
    assert report is not None and report.states[0].rate_limit == limiter.rate


def test_the_plain_progress_line_shows_the_limit() -> None:
    out = io.StringIO()  # not a terminal: plain lines
    states = [State("new", ok, rate_limit=200), State("done", terminal=True)]
    Processor(None, states, status_listener=TqdmStatusListener(file=out)).exec(run_of(5))
    assert "limit=200/s" in out.getvalue().splitlines()[-1]


def test_the_tqdm_bar_shows_the_limit() -> None:
    out = io.StringIO()
    listener = TqdmStatusListener(file=out, plain=False, ncols=300)
    states = [State("new", ok, rate_limit=2.5), State("done", terminal=True)]
    Processor(None, states, status_listener=listener).exec(run_of(3))
    assert "limit=2.5/s" in out.getvalue()


class Keep(StatusListener):
    last: list[StatusCount] | None = None

    def status_update(self, counts: list[StatusCount]) -> None:
        self.last = counts


def test_a_bar_folding_several_states_shows_no_sum_of_their_limits() -> None:
    """Bars fold middle states when the terminal is short. At b06c975 the folded bar
    showed the sum of their limits: two states sharing one AIMDRateLimiter(20, 20, 20)
    showed limit=40/s, and a limited state folded with an unlimited one showed its
    limit as the group's."""
    lim = AIMDRateLimiter(20, 20, 20)
    run = Run("b", None, J)
    for i in range(4):
        run.add_job(J(n=i), state="a" if i % 2 else "b")
    keep = Keep()
    states = [
        State("a", ok, rate_limit=lim),
        State("b", ok, rate_limit=lim),
        State("c", ok),
        State("done", terminal=True),
    ]
    Processor(None, states, status_listener=keep).exec(run)
    assert keep.last is not None
    a, b, c = keep.last[:3]
    assert (a.rate_limit, b.rate_limit, c.rate_limit) == (20.0, 20.0, 0.0)
    assert _limit([a]) == " limit=20/s"
    assert _limit([a, b]) == ""
    assert _limit([a, c]) == ""
