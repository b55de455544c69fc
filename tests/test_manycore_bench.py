"""The ``manycore`` bench scenario's own logic, on a tiny case (the figures themselves
are the bench's business, not the tests')."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from jorbmp.bench import manycore
from jorbmp.bench.suite import SCENARIOS

# Run in a fresh interpreter: the baseline forks a multiprocessing.Pool, and forking
# from this test process, which earlier tests left with threads (listener, Dask,
# checkpoint writers), once hung CI in the Pool's fork for minutes, past pytest's
# timeout (its signal never ran: the forking thread held the GIL).
TINY_CASE = textwrap.dedent(
    """
    import pytest
    from jorbmp.bench import manycore

    case = manycore.Case("tiny", 4, 0.01, 0.1, stages=3)
    jobs = case.jobs(case.ideal_s)
    assert jobs == 40
    ours = [manycore.measure_jorbmp(case, jobs)]
    pools = [manycore.measure_pool(case, jobs)]
    for m in ours + pools:
        assert 0 < m.first < m.wall
        assert 0 < m.steady_jobs < jobs and m.steady_wall > 0
        assert 0 <= m.steady_cpu <= m.cpu
        assert 0 <= m.shutdown < m.wall - m.first
    rows = manycore.rows_for(case, jobs, ours, pools)
    assert [r.scenario.split(": ")[1] for r in rows] == [
        "efficiency",
        "parent CPU/job, whole run",
        "parent CPU/job, start-up excluded",
        "exec() to first result",
        "jobs/s",
    ]
    efficiency = rows[0]
    # Ideal: 40 x 10 ms over 4 workers, plus 2 x 10 ms to fill the pipeline.
    assert efficiency.extra["ideal_s"] == pytest.approx(0.12)
    assert 0 < efficiency.jorbmp <= 1.05 and 0 < (efficiency.baseline_value or 0) <= 1.05
    assert all(r.jorbmp > 0 and (r.baseline_value or 0) > 0 for r in rows[1:])
    """
)


@pytest.mark.timeout(120)
def test_manycore_measures_both_sides_of_a_tiny_case() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TINY_CASE], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(10)
def test_manycore_is_a_scenario_with_a_quick_version() -> None:
    assert "manycore" in SCENARIOS
    assert set(manycore.QUICK_CASES) < {c.key for c in manycore.CASES}
    growth = manycore.dispatch_growth(
        [manycore.Measure(1, 1, 0.1, 0.1, 1, 1000)], [manycore.Measure(1, 1, 0.1, 0.11, 1, 1000)]
    )
    assert growth.jorbmp == pytest.approx(1.1) and growth.ok


@pytest.mark.timeout(10)
def test_rows_with_many_workers_are_long_enough_to_hide_start_up() -> None:
    """Forking 64 to 256 workers takes 1 to 2 s on this VM, on both sides: a row's
    ideal wall must dwarf it, and the whole scenario (3 rounds, both sides) must still
    fit its budget."""
    cases = {c.key: c for c in manycore.CASES}
    for key in ("c64", "c256", "pipeline"):
        assert cases[key].ideal_s >= 3.0, key
    assert cases["c256"].ideal_s >= 6.0
    three_rounds = 3 * 2 * sum(c.ideal_s for c in manycore.CASES)
    assert three_rounds <= 0.9 * manycore.BUDGET_SECONDS


@pytest.mark.timeout(10)
def test_a_row_of_short_jobs_swamps_the_coordinator() -> None:
    swamp = {c.key: c for c in manycore.CASES}["swamp"]
    jobs = swamp.jobs(swamp.ideal_s)
    assert swamp.concurrency == 64 and swamp.seconds < 0.001
    # The ideal rate is far beyond what one coordinator dispatches (~10 us per job).
    assert jobs / swamp.ideal(jobs) > 100_000
    assert "swamps the coordinator" in swamp.title(jobs)
