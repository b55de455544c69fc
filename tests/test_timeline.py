"""The run timeline: bounded however long the run, its shape and totals kept through
downsampling, recorded by real runs and stored in every checkpoint format."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import msgspec
import pytest

import jorbmp
from jorbmp import Processor, Run, RunReport, State, StatusCount, Stopped
from jorbmp.timeline import MAX_POINTS, Timeline, TimelineRecorder

pytestmark = pytest.mark.timeout(60)

HOURS = 3600.0


def counts(
    processed: tuple[int, int], executing: tuple[int, int], waiting: tuple[int, int],
    errors: tuple[int, int] = (0, 0), cpu: float = 0.0, rss: int = 0, done: int = 0,
) -> list[StatusCount]:  # fmt: skip
    """A status of two working states, "a" and "b", and a terminal one."""
    return [
        StatusCount("a", processed=processed[0], executing=executing[0], waiting=waiting[0],
                    errors=errors[0], cpu_percent=cpu, rss_bytes=rss, concurrency=4),
        StatusCount("b", processed=processed[1], executing=executing[1], waiting=waiting[1],
                    errors=errors[1], concurrency=2),
        StatusCount("done", completed=done, terminal=True),
    ]  # fmt: skip


def ten_hours() -> tuple[Timeline, int, int]:
    """A synthetic 10-hour run fed at 1 Hz (as the coordinator's samples come): state a
    works (4 busy, 10/s) for the first 3 hours, then b (2 busy, 5/s) for 7 hours; one
    error a minute in a. Returns the timeline and the final processed counts."""
    rec = TimelineRecorder(["a", "b", "done"])
    a = b = errors = 0
    rec.observe(0.0, counts((0, 0), (4, 0), (100, 0)))
    for second in range(1, int(10 * HOURS) + 1):
        first_phase = second <= 3 * HOURS
        if first_phase:
            a += 10
            errors += second % 60 == 0
        else:
            b += 5
        busy = (4, 0) if first_phase else (0, 2)
        rec.observe(float(second), counts((a, b), busy, (100, 0), (errors, 0), done=a + b))
    timeline = rec.timeline(10 * HOURS, counts((a, b), (0, 0), (0, 0), (errors, 0)))
    assert timeline is not None
    return timeline, a, b


def test_a_ten_hour_run_keeps_at_most_600_points_and_its_shape() -> None:
    timeline, a, b = ten_hours()
    assert len(timeline.t) <= MAX_POINTS
    assert len(timeline.t) >= MAX_POINTS // 2  # downsampled, not thrown away
    assert timeline.t[-1] == 10 * HOURS and timeline.period == 64.0
    sa, sb, done = timeline.states
    assert all(len(col) == len(timeline.t) for col in (sa.finished, sb.executing, done.jobs))
    # Totals survive exactly: every exec and error is in some point.
    assert sum(sa.finished) == a == 3 * HOURS * 10 and sum(sb.finished) == b
    assert sum(sa.errors) == 3 * HOURS / 60
    # So do busy worker-seconds (time-weighted means), to the stored rounding.
    durations = timeline.durations()
    busy_a = sum(e * d for e, d in zip(sa.executing, durations, strict=True))
    assert busy_a == pytest.approx(4 * 3 * HOURS, rel=1e-3)
    # The shape: a busy before 3 h and idle after, b the other way round, with the
    # switch inside the one point that straddles it.
    for t, ea, eb, rate in zip(timeline.t, sa.executing, sb.executing, sa.finished, strict=True):
        if t <= 3 * HOURS:
            assert ea == 4.0 and eb == 0.0
        elif t - timeline.period >= 3 * HOURS:
            assert ea == 0.0 and eb == 2.0 and rate == 0
    straddling = [i for i, t in enumerate(timeline.t) if 0 < t - 3 * HOURS < timeline.period]
    assert len(straddling) == 1 and 0 < sa.executing[straddling[0]] < 4
    # Jobs per second of a, where it worked: 10/s, as fed.
    assert sa.finished[0] / durations[0] == pytest.approx(10)
    assert sa.concurrency[0] == 4 and done.concurrency[0] == 0
    # Its stored size: the note's figures.
    size = len(msgspec.json.encode(timeline))
    assert size < 60_000, size


def test_the_recorder_is_bounded_at_every_step() -> None:
    rec = TimelineRecorder(["a", "b", "done"], max_points=10)
    n = 0
    for second in range(1000):
        n += 1
        rec.observe(float(second), counts((n, 0), (1, 0), (0, 0)))
        assert len(rec._t) <= 10
    timeline = rec.timeline(1000.0, counts((n, 0), (0, 0), (0, 0)))
    assert timeline is not None and len(timeline.t) <= 10
    assert sum(timeline.states[0].finished) == n - 1  # all but the baseline's


def test_a_run_of_a_tenth_of_a_second_is_one_point() -> None:
    rec = TimelineRecorder(["a", "b", "done"])
    rec.observe(100.0, counts((0, 0), (0, 0), (3, 0)))
    rec.observe(100.05, counts((1, 0), (2, 0), (0, 0)))
    timeline = rec.timeline(100.1, counts((3, 0), (0, 0), (0, 0), done=3))
    assert timeline is not None and timeline.t == [0.1] and timeline.period == 1.0
    assert timeline.states[0].finished == [3]
    assert timeline.states[0].executing == [1.0]  # 2 busy for half of it


def test_a_sliver_at_the_end_joins_the_point_before() -> None:
    """The last tick of a run is no spike: 2 jobs finishing in its last 0.2 s count
    in a 1.2 s point (1.7/s), not as a 0.2 s one (10/s)."""
    rec = TimelineRecorder(["a", "b", "done"])
    rec.observe(0.0, counts((0, 0), (2, 0), (0, 0)))
    rec.observe(1.0, counts((2, 0), (2, 0), (0, 0)))
    rec.observe(2.0, counts((4, 0), (2, 0), (0, 0)))
    timeline = rec.timeline(2.2, counts((6, 0), (0, 0), (0, 0)))
    assert timeline is not None and timeline.t == [1.0, 2.2]
    assert timeline.states[0].finished == [2, 4]
    assert timeline.states[0].executing == [2.0, pytest.approx(2 * 1.0 / 1.2, abs=0.01)]
    rec = TimelineRecorder(["a", "b", "done"])  # a longer rest is a point of its own
    rec.observe(0.0, counts((0, 0), (2, 0), (0, 0)))
    rec.observe(1.0, counts((2, 0), (2, 0), (0, 0)))
    timeline = rec.timeline(1.6, counts((3, 0), (0, 0), (0, 0)))
    assert timeline is not None and timeline.t == [1.0, 1.6]
    assert timeline.states[0].finished == [2, 1]


def test_nothing_observed_is_no_timeline_and_nonfinite_figures_are_zero() -> None:
    rec = TimelineRecorder(["a", "b", "done"])
    assert rec.timeline(1.0, counts((0, 0), (0, 0), (0, 0))) is None
    rec.observe(0.0, counts((0, 0), (0, 0), (0, 0)))
    for cpu in (math.nan, math.inf, -math.inf):
        rec.observe(rec._last + 1, counts((0, 0), (0, 0), (0, 0), cpu=cpu))
    timeline = rec.timeline(rec._last + 1, counts((0, 0), (0, 0), (0, 0)))
    assert timeline is not None
    assert timeline.states[0].cpu_percent == [0.0, 0.0, 0.0, 0.0]
    # A JSON checkpoint can hold it (no NaN, no infinity).
    assert "NaN" not in msgspec.json.encode(timeline).decode()


class JC(msgspec.Struct):
    n: int = 0


def slow(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.02)
    return jc, "done"


def flaky(ac: Any, oc: Any, jc: JC) -> Any:
    if jc.n % 5 == 0:
        return jc, "done", None, f"flaky {jc.n}"
    return jc, "done"


def forever(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.01)
    return jc, "new"


@pytest.mark.parametrize("fmt", ["JsonSerializer", "JournalSerializer", "SqliteSerializer"])
def test_a_real_run_stores_its_timeline_in_the_checkpoint(tmp_path: Any, fmt: str) -> None:
    path = tmp_path / "run.ck"
    cls = getattr(jorbmp, fmt)
    states = [State("new", slow, concurrency=2, kind="thread"), State("done", terminal=True)]
    run: Run[None, JC] = Run("timeline", job_type=JC)
    for i in range(100):  # ~1 s: two points or more
        run.add_job(JC(i))
    proc = Processor(None, states, cls(path, job_type=JC))
    proc.exec(run)
    report = proc.last_report
    assert report is not None and report.timeline is not None
    timeline = report.timeline
    assert [s.state for s in timeline.states] == ["new", "done", "failed"]
    assert len(timeline.t) >= 1 and timeline.t[-1] == pytest.approx(report.wall_seconds, abs=0.002)
    new, done, _ = timeline.states
    assert sum(new.finished) == 100 and max(new.executing) > 0.5
    # Done only grows: its interval means never fall (the last interval's mean depends on
    # how much of the run it covers: 41 of 100 once on a loaded host).
    assert done.terminal and done.jobs[-1] > 0
    assert all(a <= b for a, b in zip(done.jobs, done.jobs[1:], strict=False))
    loaded = cls(path, job_type=JC).deserialize()
    assert loaded.report is not None
    assert msgspec.convert(loaded.report, RunReport) == report
    overview = cls(path, job_type=JC).overview()
    assert overview.report is not None
    assert msgspec.convert(overview.report, RunReport).timeline == timeline


def test_the_journal_appends_the_report_only_when_it_changes(tmp_path: Any) -> None:
    """A resumed run's journal does not repeat the previous report (with its timeline,
    ~100 KB) in every record it appends, only the new one, once."""
    path = tmp_path / "run.journal"
    states = [State("new", slow, kind="thread"), State("done", terminal=True)]
    run: Run[None, JC] = Run("journal", job_type=JC)
    run.add_job(JC(0))
    Processor(None, states, jorbmp.JournalSerializer(path, job_type=JC)).exec(run)
    run = jorbmp.JournalSerializer(path, job_type=JC).deserialize()
    assert run.report is not None
    run.report = {**run.report, "padding": "x" * 200_000}  # as big as a long run's
    for i in range(40):  # ~1 s at 20 ms each: several records, 0.2 s apart
        run.add_job(JC(i))
    serializer = jorbmp.JournalSerializer(path, job_type=JC, compact_min_bytes=10**7)
    proc = Processor(None, states, serializer)
    proc.exec(run)
    assert serializer.journal_bytes < 100_000, serializer.journal_bytes
    # A compaction writes the report as well: none was needed.
    assert serializer.compactions == 0
    loaded = jorbmp.JournalSerializer(path, job_type=JC).deserialize()
    assert loaded.report is not None and "padding" not in loaded.report
    assert msgspec.convert(loaded.report, RunReport) == proc.last_report


def test_a_stopped_run_has_a_timeline_and_its_error_groups() -> None:
    proc = Processor(None, [State("new", forever, kind="thread"), State("done", terminal=True)])
    run: Run[None, JC] = Run("stopped", job_type=JC)
    run.add_job(JC(0))
    threading.Timer(0.1, proc.stop).start()
    with pytest.raises(Stopped):
        proc.exec(run)
    report = proc.last_report
    assert report is not None and report.timeline is not None
    assert 1 <= len(report.timeline.t) <= 2
    assert report.timeline.states[0].finished[-1] >= 0

    proc = Processor(None, [State("new", flaky, kind="thread"), State("done", terminal=True)])
    run = Run("errors", job_type=JC)
    for i in range(20):
        run.add_job(JC(i))
    proc.exec(run)
    report = proc.last_report
    assert report is not None
    assert [(g.fingerprint, g.jobs) for g in report.errors] == [("flaky <n>", 4)]


def test_a_run_that_executes_nothing_has_no_timeline() -> None:
    proc = Processor(None, [State("new", slow), State("done", terminal=True)])
    proc.exec(Run("empty", job_type=JC))
    assert proc.last_report is not None and proc.last_report.timeline is None
