"""``python -m jorbmp.bench --quick`` (issue 19, item 7): a table that says it judges
nothing, without an empty ``ok`` column, and checkpoint ratios as jorbmp / nil, as the
targets and the README read them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(120)
def test_quick_table_judges_nothing_and_ratios_are_jorbmp_over_nil(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "jorbmp.bench", "--quick", "--only", "checkpoint",
         "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("quick mode" in line and "nothing is judged" in line for line in lines), lines
    header = next(line for line in lines if line.startswith("scenario"))
    assert header.split()[-1] == "target" and " ok" not in header, header
    rows = json.loads((tmp_path / "rows.json").read_text())
    checkpoint = [r for r in rows if r["baseline"] == "nil"]
    assert {r["scenario"].split()[1] for r in checkpoint} >= {"json", "journal"}
    for r in checkpoint:
        assert r["ratio"] == pytest.approx(r["jorbmp"] / r["baseline_value"]), r
        assert r["ok"] is None
        shown = next(line for line in lines if line.startswith(r["scenario"]))
        assert f"{r['ratio']:.3g}" in shown.split(), shown
