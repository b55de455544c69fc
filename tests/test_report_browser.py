"""The HTML report of a real run, loaded in a real browser (headless Chromium).

Chromium must be installed (Debian's ``chromium`` package; .ci/run installs it): if it
is not, this test fails and says how to install it, rather than skipping.
"""

from __future__ import annotations

import asyncio
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers_browser import INSTALL, find_chromium, luminance_variance, png_pixels, render

from jorbmp import Processor, Run, State

pytestmark = pytest.mark.timeout(120)

WIDTH, HEIGHT = 1280, 1600
# Charts of working states, and the one of terminal states.
WORKING_CHARTS = ("busy", "throughput", "waiting", "errors", "cpu", "memory")


class JC(msgspec.Struct):
    n: int = 0


def fetch(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.01)
    return jc, "store"


async def store(ac: Any, oc: Any, jc: JC) -> Any:
    await asyncio.sleep(0.02)
    if jc.n % 10 == 3:
        return jc, "failed", None, f"store of item-{jc.n}.json refused"
    return jc, "done"


class _Series(HTMLParser):
    """Collects, per chart (``<svg class="chart" id=...>``), the ``data-state`` of each
    of its series (``<path class="series">``)."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, list[str]] = {}
        self.chart: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self.chart = a.get("id") or ""
            self.charts[self.chart] = []
        elif tag == "path" and self.chart is not None and a.get("class") == "series":
            self.charts[self.chart].append(a.get("data-state") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.chart = None


def test_the_html_report_of_a_real_run_renders_in_chromium(tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.fail(f"Chromium is not installed: {INSTALL}")
    # The console check can fail: a page that logs is caught.
    canary = tmp_path / "canary.html"
    canary.write_text("<!DOCTYPE html><script>console.error('canary')</script>")
    assert any("canary" in line for line in render(canary, 200, 200).console)

    run: Run[None, JC] = Run("browser <check>", job_type=JC)
    for i in range(60):
        run.add_job(JC(i))
    states = [
        State("new", fetch, concurrency=2, kind="thread"),
        State("store", store, concurrency=4),
        State("done", terminal=True),
    ]
    proc = Processor(None, states)
    proc.exec(run)
    report = proc.last_report
    assert report is not None and report.timeline is not None
    page = tmp_path / "report.html"
    page.write_text(report.to_html(), encoding="utf-8")

    shown = render(page, WIDTH, HEIGHT)
    assert shown.console == [], shown.console  # no errors, nor anything else logged
    parser = _Series()
    parser.feed(shown.dom)
    working, terminal = ["new", "store"], ["done", "failed"]
    for chart in WORKING_CHARTS:
        assert parser.charts.get(chart) == working, (chart, parser.charts)
    assert parser.charts["finished"] == terminal
    assert "browser &lt;check&gt;" in shown.dom and "store of &lt;path&gt; refused" in shown.dom

    width, height, channels, pixels = png_pixels(shown.png)
    assert (width, height) == (WIDTH, HEIGHT)
    assert luminance_variance(width, height, channels, pixels) > 100  # not a blank page
