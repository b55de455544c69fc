"""`AIMDRateLimiter` against a real HTTP server (issue 15, item 6): the bench's server,
in a subprocess on 127.0.0.1, accepts 50 requests in any sliding second and answers
the rest 429 with ``Retry-After: 1``; an async state at concurrency 64 calls it for
20 s. The bench holds the targets (90%, one 429 per 10 s) over a minute; this holds
the steady state of a shorter run to generous bounds. At 9baee05: 81% of the
allowance and 4.8 429s per 10 s (a 429 every two seconds), with rates sawing
between half the allowance and past it."""

from __future__ import annotations

from pathlib import Path

import pytest

from jorbmp.bench.aimd import measure


@pytest.mark.timeout(90)
def test_aimd_holds_just_below_a_real_servers_allowance(tmp_path: Path) -> None:
    got = measure(50, 20.0, 10.0, tmp_path)
    print(f"\n{got}")
    assert got["goodput"] >= 0.8
    assert got["errors_per_10s"] <= 2.5
    high = got["rate_min_mean_max"][2]
    assert high <= 1.1 * 50  # never far past the allowance once it is known
