"""Retry delays (`State.retry_delay`, `Backoff`) and not-before times that survive a stop
and a resume (``retry_after`` too)."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import helpers_reliability as h
import pytest
from helpers_reliability import RJob

import jorbmp
from jorbmp import Backoff, Processor, RateLimitError, Run, State, StatusListener, Stopped

pytestmark = pytest.mark.timeout(60)
FORMATS = ["JsonSerializer", "JournalSerializer", "SqliteSerializer"]


def attempts(log: Path) -> dict[int, list[float]]:
    """Each job's execution times, from the log `fail_with_time` writes."""
    seen: dict[int, list[float]] = {}
    for line in log.read_text().splitlines():
        n, t = line.split()
        seen.setdefault(int(n), []).append(float(t))
    return seen


def run_of(n: int, log: Path) -> Run[Any, RJob]:
    run: Run[Any, RJob] = Run("r", job_type=RJob)
    for i in range(n):
        run.add_job(RJob(n=i, log=str(log)))
    return run


def test_the_default_is_exponential_backoff_with_jitter(tmp_path: Path) -> None:
    log = tmp_path / "log"
    run = run_of(1, log)
    Processor(None, [State("new", h.fail_with_time, max_retries=2)]).exec(run)
    times = attempts(log)[0]
    assert len(times) == 3
    first, second = times[1] - times[0], times[2] - times[1]
    assert 0.45 <= first <= 1.5, times  # 0.5-1 s, plus scheduling
    assert 0.95 <= second <= 2.5, times  # 1-2 s
    assert run.jobs["0"].state == "failed"
    assert run.jobs["0"].not_before is None


def test_backoff_is_bounded_and_checked() -> None:
    backoff = Backoff()
    for attempt in (1, 2, 3):
        assert 2 ** (attempt - 1) / 2 <= backoff(attempt) <= 2 ** (attempt - 1)
    assert 30 <= backoff(50) <= 60
    assert 30 <= backoff(10**6) <= 60  # retried forever: no overflow
    assert Backoff(first=0.1, jitter=0)(3) == pytest.approx(0.4)
    for bad in ({"factor": 0.5}, {"jitter": 2}, {"first": -1}, {"max": float("nan")}):
        with pytest.raises(ValueError, match="Backoff"):
            Backoff(**bad)


@pytest.mark.parametrize("delay", [0.3, lambda attempt: 0.15 * attempt])
def test_a_number_or_a_function_of_the_attempt(tmp_path: Path, delay: Any) -> None:
    log = tmp_path / "log"
    run = run_of(1, log)
    Processor(
        None, [State("new", h.fail_with_time, kind="thread", max_retries=2, retry_delay=delay)]
    ).exec(run)
    times = attempts(log)[0]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    expected = [0.3, 0.3] if isinstance(delay, float) else [0.15, 0.3]
    for gap, want in zip(gaps, expected, strict=True):
        assert want - 0.02 <= gap <= want + 1.0, gaps


def test_a_job_waiting_out_its_delay_holds_no_worker(tmp_path: Path) -> None:
    # One worker: the others run while job 0 waits between its attempts.
    log = tmp_path / "log"
    run = run_of(6, log)
    Processor(
        None,
        [State("new", h.fail_with_time, concurrency=1, max_retries=1, retry_delay=1.0)],
    ).exec(run)
    seen = attempts(log)
    first, second = seen[0]
    assert second - first >= 0.95
    assert all(first < seen[i][0] < second for i in range(1, 6)), seen


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_retry_delay_survives_a_stop_and_a_resume(tmp_path: Path, fmt: str) -> None:
    log = tmp_path / "log"
    path = tmp_path / "ckpt"
    run = run_of(1, log)
    serializer = getattr(jorbmp, fmt)(path, job_type=RJob)
    processor = Processor(
        None, [State("new", h.fail_with_time, retry_delay=3600)], serializer=serializer
    )
    threading.Timer(0.5, processor.stop).start()
    with pytest.raises(Stopped):
        processor.exec(run)
    loaded = getattr(jorbmp, fmt)(path, job_type=RJob).deserialize()
    not_before = loaded.jobs["0"].not_before
    assert not_before is not None and not_before > time.time() + 3500
    # Resumed: the job is not tried again before its time.
    processor = Processor(
        None,
        [State("new", h.fail_with_time, retry_delay=3600)],
        serializer=getattr(jorbmp, fmt)(path, job_type=RJob),
    )
    threading.Timer(0.7, processor.stop).start()
    with pytest.raises(Stopped):
        processor.exec(loaded)
    assert len(attempts(log)[0]) == 1


async def limited(ac: Any, oc: Any, jc: RJob) -> Any:
    h.note(jc.log, f"{jc.n} {time.time()}\n")
    raise RateLimitError("429 Too Many Requests", retry_after=3600)


def test_retry_after_survives_a_stop_and_a_resume(tmp_path: Path) -> None:
    log = tmp_path / "log"
    path = tmp_path / "ckpt.json"
    run = run_of(1, log)
    processor = Processor(
        None, [State("new", limited)], serializer=jorbmp.JsonSerializer(path, job_type=RJob)
    )
    threading.Timer(0.5, processor.stop).start()
    with pytest.raises(Stopped):
        processor.exec(run)
    loaded = jorbmp.JsonSerializer(path, job_type=RJob).deserialize()
    assert loaded.jobs["0"].not_before is not None
    assert loaded.jobs["0"].retries == 0  # a rate limit is not a failed attempt
    processor = Processor(
        None, [State("new", limited)], serializer=jorbmp.JsonSerializer(path, job_type=RJob)
    )
    threading.Timer(0.7, processor.stop).start()
    with pytest.raises(Stopped):
        processor.exec(loaded)
    assert len(attempts(log)[0]) == 1  # 9baee05 retried it at once after the resume


@pytest.mark.parametrize(
    ("delay", "message"),
    [
        (-1, r"retry_delay gave -1 for attempt 1; expected a finite number of seconds >= 0"),
        (float("nan"), r"retry_delay gave nan"),
        ("1s", r"retry_delay must be seconds \(a number\) or a function"),
        (lambda attempt: None, r"retry_delay gave None for attempt 1"),
        (lambda attempt: 1 / 0, r"retry_delay\(1\) raised ZeroDivisionError"),
    ],
)
def test_a_bad_retry_delay_is_refused_naming_the_state(delay: Any, message: str) -> None:
    with pytest.raises(ValueError, match=rf"state 'new': {message}"):
        Processor(None, [State("new", h.ok, retry_delay=delay)])


def test_a_retry_delay_function_that_fails_later_ends_the_run_clearly(tmp_path: Path) -> None:
    def delay(attempt: int) -> float:
        if attempt > 1:
            raise RuntimeError("no more")
        return 0.0

    run = run_of(1, tmp_path / "log")
    with pytest.raises(ValueError, match=r"state 'new': retry_delay\(2\) raised RuntimeError"):
        Processor(None, [State("new", h.fail_with_time, kind="thread", retry_delay=delay)]).exec(
            run
        )


def test_delayed_jobs_show_as_waiting(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    class Watch(StatusListener):
        def status_update(self, counts: list[Any]) -> None:
            c = counts[0]
            seen.append((c.executing, c.waiting))

    run = run_of(1, tmp_path / "log")
    Processor(
        None,
        [State("new", h.fail_with_time, kind="thread", max_retries=1, retry_delay=0.5)],
        status_listener=Watch(),
    ).exec(run)
    assert (0, 1) in seen


def test_a_redrive_cancels_a_pending_retry_delay(tmp_path: Path) -> None:
    log = tmp_path / "log"
    run = run_of(1, log)
    processor = Processor(None, [State("new", h.fail_with_time, retry_delay=3600)])
    threading.Timer(0.4, processor.stop).start()
    with pytest.raises(Stopped):
        processor.exec(run)
    assert run.jobs["0"].not_before is not None
    assert run.redrive("new", "new") == ["0"]
    assert run.jobs["0"].not_before is None
    processor = Processor(None, [State("new", h.fail_with_time, max_retries=0, retry_delay=0)])
    processor.exec(run)
    assert len(attempts(log)[0]) == 2  # tried again at once
