"""The benchmark suite's own logic (CI runs the suite itself with --quick)."""

from __future__ import annotations

import pytest

from jorbmp.bench.suite import in_turn

pytestmark = pytest.mark.timeout(10)


def test_contenders_take_turns_going_first() -> None:
    contenders = ["nil", "journal", "pool"]
    orders = [in_turn(i, contenders) for i in range(6)]
    assert [order[0] for order in orders] == contenders * 2
    assert all(sorted(order) == sorted(contenders) for order in orders)
    # Each keeps its place relative to the others: only the start moves.
    assert orders[1] == ["journal", "pool", "nil"]
