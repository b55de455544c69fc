"""The HTML report (`RunReport.to_html`) and ``python -m jorbmp report``: what the page
holds, that hostile names and errors cannot break out of it, and the edges (12 states,
no timeline, NaN, a run of nothing, bad paths)."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import JsonSerializer, Processor, Run, RunReport, State
from jorbmp.report import StateReport
from jorbmp.report_html import PALETTE
from jorbmp.timeline import StateTimeline, Timeline

pytestmark = pytest.mark.timeout(60)

HOSTILE = [
    "</script><script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "it's & <b>bold</b>",
    "ctrl\x1b[31m\x00end",
]
# Tags the page may contain: anything else came from user text.
TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "p", "span", "ul",
    "li", "b", "div", "figure", "figcaption", "svg", "line", "text", "path", "table", "thead",
    "tbody", "tr", "th", "td", "code", "details", "summary",
}  # fmt: skip


class JC(msgspec.Struct):
    n: int = 0


def step(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.002)
    return jc, "next"


class _Page(HTMLParser):
    """Tags, attributes and text of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []
        self.series: dict[str, list[str]] = {}
        self._chart = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs += attrs
        a = dict(attrs)
        if tag == "svg":
            self._chart = a.get("id") or ""
            self.series[self._chart] = []
        if tag == "path" and a.get("class") == "series":
            self.series[self._chart].append(a.get("data-state") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def chain(names: list[str], jobs: int, name: str = "chain") -> RunReport:
    """A real run through thread states ``names`` in turn, then "end"; every third job
    records an error naming itself in the first state."""

    states = [
        State(s, _Step(names[i + 1] if i + 1 < len(names) else "end"), kind="thread")
        for i, s in enumerate(names)
    ]
    states.append(State("end", terminal=True))
    run: Run[None, JC] = Run(name, job_type=JC)
    for i in range(jobs):
        run.add_job(JC(i), state=names[0])
    proc = Processor(None, states)
    proc.exec(run)
    assert proc.last_report is not None
    return proc.last_report


class _Step:
    """A thread state's exec that moves a job to ``to`` (thread execs need no pickling)."""

    def __init__(self, to: str) -> None:
        self.to = to

    def __call__(self, ac: Any, oc: Any, jc: JC) -> Any:
        time.sleep(0.002)
        if jc.n % 3 == 0 and not jc.n & 0x100:
            jc.n |= 0x100
            return jc, self.to, None, f'"{HOSTILE[1]}" failed for job {jc.n & 0xFF}'
        return jc, self.to


def test_hostile_state_names_and_errors_are_escaped() -> None:
    report = chain(HOSTILE[:3], 9, name=HOSTILE[0])
    page = report.to_html()
    assert "<script" not in page.lower() and "<img" not in page.lower()
    seen = parse(page)
    assert seen.tags <= TAGS, seen.tags - TAGS
    assert not [k for k, _ in seen.attrs if k.startswith("on")]
    text = "".join(seen.text)
    for name in HOSTILE[:3]:  # shown as written, as text
        assert name in text
    assert seen.series["busy"] == HOSTILE[:3]  # and as attribute values, exactly
    assert any(HOSTILE[1] in t for t in seen.text)  # the error's text itself
    assert "\x1b" not in chain([HOSTILE[3]], 1).to_html()  # control characters replaced


def test_twelve_states_get_twelve_colours_and_one_series_each() -> None:
    names = [f"step-{i:02d}" for i in range(12)]
    report = chain(names, 6)
    seen = parse(report.to_html())
    for chart in ("busy", "throughput", "waiting", "errors", "cpu", "memory"):
        assert seen.series[chart] == names
    assert seen.series["finished"] == ["end", "failed"]
    colours = {v for k, v in seen.attrs if k in ("stroke", "fill")}
    assert set(PALETTE) <= colours and len(set(PALETTE)) == 12
    one = parse(chain(["only"], 3).to_html())
    assert one.series["busy"] == ["only"] and one.series["finished"] == ["end", "failed"]


def _report(**changes: Any) -> RunReport:
    """A hand-made report: one working state, one terminal, a 3-point timeline."""
    t = Timeline(
        period=1.0,
        t=[1.0, 2.0, 3.0],
        states=[
            StateTimeline("work", False, [5, 5, 0], [0, 1, 0], [9.0, 4.0, 0.0], [2.0, 2.0, 0.0],
                          [2.0, 2.0, 2.0], [80.0, 90.0, 0.0], [10**7, 10**7, 0]),
            StateTimeline("end", True, [0, 0, 0], [0, 0, 0], [0.0, 5.0, 10.0], [0.0] * 3,
                          [0.0] * 3, [0.0] * 3, [0] * 3),
        ],
    )  # fmt: skip
    states = [
        StateReport("work", "process", False, 0, 10, 1, 0.01, 0.02, 2, 0.5, 80.0, 0.0),
        StateReport("end", "", True, 10, 0, 0, 0.0, 0.0, 1, 0.0, 0.0, 0.0),
    ]
    base = RunReport("hand", "complete", 3.0, states, "work", "state 'work' was busy", 1, t)
    return msgspec.structs.replace(base, **changes)


def test_nonfinite_figures_show_as_dashes_and_draw_as_zero() -> None:
    nan, inf = math.nan, math.inf
    bad = StateReport("work", "process", False, 0, 10, 1, nan, inf, 2, nan, -inf, inf, nan)
    report = _report(wall_seconds=inf)
    t = report.timeline
    assert t is not None
    cols = msgspec.structs.replace(
        t.states[0], executing=[nan, inf, 1.0], cpu_percent=[inf, nan, -inf]
    )
    timeline = msgspec.structs.replace(t, t=[1.0, nan, 3.0], states=[cols, t.states[1]])
    broken = msgspec.structs.replace(report, states=[bad, report.states[1]], timeline=timeline)
    text = "".join(parse(broken.to_html()).text)
    assert "nan" not in text.lower() and "inf" not in text.lower()
    assert "\u2013" in text
    assert "nan" not in str(broken).lower() and "inf" not in str(broken).lower()  # the text too
    page = broken.to_html()
    assert "NaN" not in page and "Infinity" not in page


def test_a_report_without_a_timeline_and_one_of_nothing_still_render() -> None:
    old = msgspec.to_builtins(_report())
    del old["timeline"], old["errors"]  # as a checkpoint of the version before
    page = msgspec.convert(old, RunReport).to_html()
    assert "No charts" in page and "work" in page and "<svg" not in page
    damaged = _report()
    assert damaged.timeline is not None
    short = msgspec.structs.replace(damaged.timeline.states[0], executing=[1.0])
    timeline = msgspec.structs.replace(damaged.timeline, states=[short])
    page = msgspec.structs.replace(damaged, timeline=timeline).to_html()
    assert "the timeline of state &#x27;work&#x27; does not fit" in page and "<svg" not in page
    empty = Processor(None, [State("new", step), State("next", terminal=True)])
    empty.exec(Run("nothing", job_type=JC))
    assert empty.last_report is not None
    page = empty.last_report.to_html()
    assert "No charts: nothing was executed" in page and "No errors" in page


def jorbmp_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jorbmp", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "run.jorbmp.json"
    states = [State("new", step, kind="thread"), State("next", terminal=True)]
    proc = Processor(None, states, JsonSerializer(path, job_type=JC))
    run: Run[None, JC] = Run("cli", job_type=JC)
    for i in range(20):
        run.add_job(JC(i))
    proc.exec(run)
    return path


def test_the_report_command_prints_text_and_writes_html(checkpoint: Path) -> None:
    out = jorbmp_cli("report", str(checkpoint))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("run 'cli' complete in ") and "new" in out.stdout
    page = checkpoint.parent / "report.html"
    out = jorbmp_cli("report", str(checkpoint), "--html", str(page))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"wrote {page}")
    seen = parse(page.read_text())
    assert seen.series["busy"] == ["new"] and "Run cli" in "".join(seen.text)
    # A checkpoint from the version before: its report has no timeline; and one whose
    # timeline this version cannot read: both still render, without charts.
    data = json.loads(checkpoint.read_text())
    for report in (
        {k: v for k, v in data["report"].items() if k not in ("timeline", "errors")},
        {**data["report"], "timeline": {"period": "soon"}},
    ):
        checkpoint.write_text(json.dumps({**data, "report": report}))
        out = jorbmp_cli("report", str(checkpoint), "--html", str(page))
        assert out.returncode == 0, out.stderr
        assert "No charts" in page.read_text()
        assert jorbmp_cli("report", str(checkpoint)).stdout.startswith("run 'cli' complete")


def test_the_report_command_refuses_bad_paths_in_one_line(checkpoint: Path) -> None:
    tmp = checkpoint.parent
    cases = [
        (["report", str(tmp / "missing.json")], "no checkpoint at"),
        (["report", str(tmp)], "is a directory"),
        (["report", str(checkpoint), "--html", str(tmp / "no" / "dir.html")],
         "cannot write the report"),
        (["report", str(checkpoint), "--html", str(tmp)], "is a directory"),
        (["report", str(checkpoint), "--html", str(checkpoint)], "is the checkpoint itself"),
    ]  # fmt: skip
    before = checkpoint.read_bytes()
    for args, message in cases:
        out = jorbmp_cli(*args)
        assert out.returncode == 2, (args, out)
        assert out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)
        assert out.stdout == ""
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp.iterdir()) == sorted(
        [checkpoint.name, checkpoint.name + ".lock"]
    )
    # A run no execution of which has ended has no report yet.
    fresh = tmp / "fresh.json"
    run: Run[None, JC] = Run("fresh", job_type=JC)
    run.add_job(JC())
    JsonSerializer(fresh, job_type=JC).serialize(run)
    out = jorbmp_cli("report", str(fresh))
    assert out.returncode == 2 and "no report yet" in out.stderr


def test_the_report_never_replaces_a_symlink_pipe_or_device(checkpoint: Path) -> None:
    """The page is renamed over its target: a symlink would become a file (its target
    untouched), a pipe or a device (as root, /dev/stdout) a regular file. Refused, in
    one line; ``--html -`` writes the page to standard output instead."""
    tmp = checkpoint.parent
    real = tmp / "real.html"
    real.write_text("kept")
    link = tmp / "link.html"
    link.symlink_to(real)
    fifo = tmp / "fifo.html"
    os.mkfifo(fifo)
    for target in (link, fifo):
        out = jorbmp_cli("report", str(checkpoint), "--html", str(target))
        assert out.returncode == 2 and "not a regular file" in out.stderr, out
        assert out.stderr.count("\n") == 1
    assert link.is_symlink() and real.read_text() == "kept"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    out = jorbmp_cli("report", str(checkpoint), "--html", "-")
    assert out.returncode == 0, out.stderr
    assert out.stdout.lstrip().startswith("<!DOCTYPE html>") and not (tmp / "-").exists()
