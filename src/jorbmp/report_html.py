"""The run report as one self-contained HTML page: charts of the timeline, drawn in SVG.

`render` turns a `RunReport` (a frozen snapshot, as kept in the checkpoint) into a page
that needs nothing else: no script, no network, no fonts but the system's (its Content
Security Policy forbids loading anything). It shows the header (run, outcome, wall time,
jobs per state), a stacked area of busy workers per state with the concurrency limit,
throughput, waiting jobs, errors, jobs reaching terminal states, CPU and memory over
time, the per-state table of the text report with its bottleneck hint, and the error
groups (`jorbmp.errorgroups`).

Every chart series is a ``<path class="series" data-state="...">`` inside a
``<svg class="chart" id="...">``: one per working state (terminal states in the
"finished" chart), so a test can count them in the DOM. All user text (state and run
names, errors, job ids) is escaped; figures that are not finite show as a dash.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence

from .errorgroups import ErrorGroup
from .report import RunReport
from .timeline import StateTimeline, Timeline

__all__ = ["PALETTE", "render"]

# Twelve colours told apart at a glance (from Kelly's colours of maximum contrast),
# in the order states get them; a 13th state starts over, drawn dashed.
PALETTE = (
    "#0067a5",  # blue
    "#f38400",  # orange
    "#008856",  # green
    "#be0032",  # red
    "#875692",  # purple
    "#a1caf1",  # light blue
    "#f3c300",  # yellow
    "#882d17",  # brown
    "#8db600",  # yellow-green
    "#e68fac",  # pink
    "#848482",  # grey
    "#c2b280",  # buff
)
# Chart geometry, in SVG user units (the SVG scales to the width of its column).
WIDTH, HEIGHT = 560, 190
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 10, 22
# Steps between time labels, in seconds: the first that gives at most 6 labels.
_TIME_STEPS: tuple[float, ...] = (
    *(m / 1000 for m in (1, 2, 5, 10, 20, 50, 100, 200, 500)),
    *(1.0, 2.0, 5.0, 10.0, 15.0, 30.0),
    *(60.0 * m for m in (1, 2, 5, 10, 15, 30)),
    *(3600.0 * h for h in (1, 2, 3, 6, 12, 24, 48, 96, 168, 336, 720)),
)
# Error groups shown, and characters of an error text before it is cut.
SHOW_GROUPS = 10
SHOW_TEXT = 600

# Characters that have no place in a page: C0/C1 controls but tab and newline, and
# lone surrogates (which cannot even be encoded as UTF-8).
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _esc(text: object) -> str:
    """``text`` as HTML text or an attribute value (quotes escaped too)."""
    return html.escape(_UNSHOWABLE.sub("\ufffd", str(text)), quote=True)


def _num(value: float, fmt: Callable[[float], str]) -> str:
    """``fmt(value)``, or a dash for NaN and infinities."""
    return fmt(value) if math.isfinite(value) else "\u2013"


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _duration(seconds: float) -> str:
    """A time axis label or wall time: ``45s``, ``12m``, ``3h20m``."""
    if not math.isfinite(seconds):
        return "\u2013"
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s")
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        m, s = divmod(round(seconds), 60)
        return f"{m}m" if not s else f"{m}m{s:02d}s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h}h" if not m else f"{h}h{m:02d}m"


def _amount(value: float) -> str:
    """An axis figure: ``0``, ``2.5``, ``40``, ``1.2k``, ``3M``."""
    if value >= 1e9:
        return f"{value / 1e9:.3g}G"
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    """An axis figure in bytes: ``0``, ``500kB``, ``48MB``, ``1.5GB`` (decimal units, so
    that the axis' round figures stay round)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}B"


def _nice(top: float) -> float:
    """The axis maximum: ``top`` rounded up to 1, 2, 2.5 or 5 times a power of ten."""
    if not math.isfinite(top) or top <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(top))
    for step in (1, 2, 2.5, 5, 10):
        if top <= step * power * (1 + 1e-9):
            return step * power
    return 10 * power


def _colour(index: int) -> tuple[str, str]:
    """The colour of the ``index``-th state and its dash pattern ("" solid)."""
    return PALETTE[index % len(PALETTE)], "" if index < len(PALETTE) else "5 3"


class _Chart:
    """One SVG chart: step series over the timeline's intervals, stacked or not."""

    def __init__(
        self, timeline: Timeline, ident: str, title: str, unit: str, fmt: Callable[[float], str]
    ) -> None:
        self.ident, self.title, self.unit, self.fmt = ident, title, unit, fmt
        self.edges = [0.0, *(_finite(t) for t in timeline.t)]
        self.end = max(self.edges[-1], 1e-9)
        self.series: list[tuple[int, str, list[float]]] = []  # (colour index, state, values)
        self.extra: list[tuple[str, list[float]]] = []  # dashed reference lines: (name, values)

    def add(self, index: int, state: str, values: Sequence[float]) -> None:
        self.series.append((index, state, [max(0.0, _finite(v)) for v in values]))

    def x(self, t: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * t / self.end

    def svg(self, stacked: bool) -> str:
        n = len(self.edges) - 1
        bottoms = [0.0] * n
        layers: list[tuple[int, str, list[float], list[float]]] = []
        for index, state, values in self.series:
            tops = [b + v for b, v in zip(bottoms, values, strict=True)] if stacked else values
            layers.append((index, state, list(bottoms) if stacked else [0.0] * n, tops))
            if stacked:
                bottoms = tops
        peak = max([max(top, default=0.0) for _, _, _, top in layers] + [0.0])
        for _, values in self.extra:
            peak = max(peak, max(values, default=0.0))
        scale = _nice(peak)
        plot_h = HEIGHT - TOP - BOTTOM

        def y(v: float) -> float:
            return TOP + plot_h * (1 - min(v, scale) / scale)

        xs = [f"{self.x(t):.1f}" for t in self.edges]
        parts = [
            f'<svg class="chart" id="{_esc(self.ident)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'role="img" aria-label="{_esc(self.title)}">',
            f"<title>{_esc(self.title)}</title>",
        ]
        for frac in (0.0, 0.5, 1.0):  # grid lines and y labels
            gy = y(scale * frac)
            parts.append(
                f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
                f'<text class="axis" x="{LEFT - 4}" y="{gy + 3:.1f}" text-anchor="end">'
                f"{_esc(self.fmt(scale * frac))}</text>"
            )
        step = next((s for s in _TIME_STEPS if self.end / s <= 6), self.end / 4)
        for k in range(int(self.end / step + 1e-9) + 1):  # time labels
            tx = self.x(k * step)
            anchor = "start" if k == 0 else "end" if tx > WIDTH - RIGHT - 12 else "middle"
            parts.append(
                f'<text class="axis" x="{tx:.1f}" y="{HEIGHT - 6}" '
                f'text-anchor="{anchor}">{_esc(_duration(k * step))}</text>'
            )
        for index, state, bottom, top in layers:
            colour, dash = _colour(index)
            line = "".join(f"H{xs[i + 1]}V{y(top[i + 1]):.1f}" for i in range(n - 1))
            edge = f"M{xs[0]},{y(top[0]) if n else y(0):.1f}{line}H{xs[n]}"
            peak_value = max((t - b for t, b in zip(top, bottom, strict=True)), default=0.0)
            label = f"{state}: up to {self.fmt(peak_value)} {self.unit}".rstrip()
            attrs = f'class="series" data-state="{_esc(state)}"'
            # Areas are filled, not outlined, so that a layer of zeros stays invisible;
            # only a state past the palette's twelve gets a dashed outline to tell it.
            stroke = "none" if stacked and not dash else colour
            attrs += f' stroke="{stroke}"' + (f' stroke-dasharray="{dash}"' if dash else "")
            if stacked:
                back = "".join(f"V{y(bottom[i]):.1f}H{xs[i]}" for i in range(n - 1, -1, -1))
                attrs += f' fill="{colour}" fill-opacity="0.8" d="{edge}{back}Z"'
            else:
                attrs += f' fill="none" d="{edge}"'
            parts.append(f"<path {attrs}><title>{_esc(label)}</title></path>")
        for name, values in self.extra:
            line = "".join(f"H{xs[i + 1]}V{y(values[i + 1]):.1f}" for i in range(n - 1))
            parts.append(
                f'<path class="limit" d="M{xs[0]},{y(values[0]):.1f}{line}H{xs[n]}">'
                f"<title>{_esc(name)}</title></path>"
            )
        parts.append(
            f'<line class="frame" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
            f'<line class="frame" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" '
            f'y2="{HEIGHT - BOTTOM}"/></svg>'
        )
        return "".join(parts)


def _per_second(counts: Sequence[int], durations: Sequence[float]) -> list[float]:
    return [c / d if d > 0 else 0.0 for c, d in zip(counts, durations, strict=True)]


def _charts(timeline: Timeline, colour_of: dict[str, int]) -> str:
    """The charts of ``timeline``: each a figure with its title."""
    working = [s for s in timeline.states if not s.terminal]
    terminal = [s for s in timeline.states if s.terminal]
    durations = timeline.durations()

    def chart(
        ident: str,
        title: str,
        unit: str,
        states: list[StateTimeline],
        values: Callable[[StateTimeline], Sequence[float]],
        stacked: bool = False,
        note: str = "",
        fmt: Callable[[float], str] = _amount,
        limit: bool = False,
    ) -> str:
        c = _Chart(timeline, ident, title, unit, fmt)
        for s in states:
            c.add(colour_of.get(s.state, 0), s.state, values(s))
        if limit and states:  # the concurrency the busy workers are held to, all together
            n = len(timeline.t)
            total = [sum(_finite(s.concurrency[i]) for s in states) for i in range(n)]
            c.extra.append(("concurrency limit, all states", total))
        caption = f"<figcaption>{_esc(title)}"
        if note:
            caption += f' <span class="note">{_esc(note)}</span>'
        return f'<figure class="panel">{caption}</figcaption>{c.svg(stacked)}</figure>'

    figures = [
        chart(
            "busy",
            "Busy workers per state",
            "busy",
            working,
            lambda s: s.executing,
            stacked=True,
            note="stacked; dashed: the concurrency limit",
            limit=True,
        ),
        chart(
            "throughput",
            "Throughput per state",
            "execs/s",
            working,
            lambda s: _per_second(s.finished, durations),
            note="execs finished per second",
        ),
        chart("waiting", "Waiting jobs per state", "waiting", working, lambda s: s.waiting()),
        chart(
            "errors",
            "Errors per second",
            "errors/s",
            working,
            lambda s: _per_second(s.errors, durations),
            stacked=True,
            note="stacked",
        ),
        chart("cpu", "CPU per state", "% CPU", working, lambda s: s.cpu_percent),
        chart(
            "memory",
            "Memory (RSS) per state",
            "",
            working,
            lambda s: [float(v) for v in s.rss_bytes],
            note="peak",
            fmt=_bytes,
        ),
    ]
    if terminal:
        figures.append(
            chart("finished", "Jobs in terminal states", "jobs", terminal, lambda s: s.jobs)
        )
    return "".join(figures)


def _state_cell(state: str, index: int) -> str:
    colour, dash = _colour(index)
    fill = f"repeating-linear-gradient(90deg,{colour} 0 3px,#fff 3px 5px)" if dash else colour
    return f'<span class="swatch" style="background:{fill}"></span>{_esc(state)}'


def _table(report: RunReport, colour_of: dict[str, int]) -> str:
    """The text report's table (`RunReport.table`), its bottleneck row highlighted, with
    each state's kind beside its name."""
    head, rows = report.table()
    out = []
    for s, row in zip(report.states, rows, strict=True):
        mark = ' class="bottleneck"' if s.state == report.bottleneck else ""
        tag = ' <span class="tag">bottleneck</span>' if mark else ""
        cells = [_state_cell(s.state, colour_of.get(s.state, 0)) + tag]
        cells += [_esc(s.kind or "terminal"), *(_esc(c) for c in row[1:])]
        out.append(f"<tr{mark}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    names = [head[0], "kind", *head[1:]]
    return (
        '<table class="states"><thead><tr>'
        + "".join(f"<th>{_esc(h)}</th>" for h in names)
        + "</tr></thead><tbody>"
        + "".join(out)
        + "</tbody></table>"
    )


def _errors(groups: Sequence[ErrorGroup]) -> str:
    if not groups:
        return '<p class="empty">No errors were recorded.</p>'
    rows = []
    for g in groups[:SHOW_GROUPS]:
        states = ", ".join(f"{_esc(s)} ({n})" for s, n in g.states.items())
        moved = ""
        if g.moved:
            where = ", ".join(f"{_esc(s)} ({n})" for s, n in g.moved.items())
            moved = f'<div class="note">{g.jobs - g.current} since left that state: {where}</div>'
        texts = "".join(f"<li><code>{_esc(_cut(t))}</code></li>" for t in g.texts)
        examples = ", ".join(_esc(i) for i in g.examples)
        rows.append(
            f'<tr><td class="n">{g.jobs}</td><td><code>{_esc(_cut(g.fingerprint))}</code>'
            f"<details><summary>examples: jobs {examples}</summary><ul>{texts}</ul></details>"
            f"</td><td>{states}{moved}</td></tr>"
        )
    more = ""
    if len(groups) > SHOW_GROUPS:
        more = f'<p class="note">and {len(groups) - SHOW_GROUPS} more kinds</p>'
    return (
        '<table class="errors"><thead><tr><th>jobs</th><th>error (kind)</th>'
        "<th>recorded in</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + more
    )


def _cut(text: str) -> str:
    return text if len(text) <= SHOW_TEXT else text[: SHOW_TEXT - 1] + "\u2026"


_STYLE = """
:root { color-scheme: light; --ink: #1d2329; --soft: #5b6570; --line: #d9dee3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; color: var(--ink); background: #f6f7f9; }
main { max-width: 1280px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 16px; margin: 28px 0 8px; }
.meta { color: var(--soft); margin: 0 0 10px; }
.outcome { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff;
  background: #008856; font-weight: 600; }
.outcome.stopped { background: #c77c00; } .outcome.failed { background: #be0032; }
.chips { display: flex; flex-wrap: wrap; gap: 6px 14px; margin: 6px 0 0; padding: 0;
  list-style: none; }
.chips li { overflow-wrap: anywhere; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
  margin-right: 5px; vertical-align: -1px; }
.hint { margin: 14px 0 0; padding: 10px 14px; background: #fff6d6;
  border-left: 4px solid #f3c300; border-radius: 3px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 14px; }
.panel { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 10px 4px; }
figcaption { font-weight: 600; margin-bottom: 2px; }
.note { color: var(--soft); font-weight: 400; font-size: 12px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: #e6e9ec; stroke-width: 1; }
svg .frame { stroke: #9aa3ab; stroke-width: 1; }
svg .axis { font-size: 10px; fill: var(--soft); }
svg .series { stroke-width: 1.6; stroke-linejoin: round; }
svg .limit { fill: none; stroke: #1d2329; stroke-width: 1.2; stroke-dasharray: 4 3; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line);
  width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line);
  vertical-align: top; overflow-wrap: anywhere; }
th { background: #eef1f4; font-weight: 600; }
table.states td:not(:first-child) { font-variant-numeric: tabular-nums; }
tr.bottleneck td { background: #fff6d6; font-weight: 600; }
.tag { background: #f3c300; color: #1d2329; border-radius: 8px; padding: 0 6px;
  font-size: 11px; margin-left: 6px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; width: 4em; }
code { font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  overflow-wrap: anywhere; white-space: pre-wrap; }
details summary { color: var(--soft); cursor: pointer; font-size: 12px; }
.empty { color: var(--soft); }
"""

# Nothing may be loaded: no script, no image, font or style from anywhere; only the
# page's own <style>. A browser reports any attempt as a console error.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _no_charts(report: RunReport) -> str:
    """Why ``report`` has no charts to show ("" when it has)."""
    timeline = report.timeline
    if timeline is None:
        if any(s.execs for s in report.states if not s.terminal):
            return "this report has no timeline (a version of jorbmp that recorded none made it)"
        return "nothing was executed"
    if not timeline.t:
        return "the run ended before its timeline had a point"
    n = len(timeline.t)
    for s in timeline.states:  # a hand-edited or damaged checkpoint
        columns = (s.finished, s.errors, s.jobs, s.executing, s.concurrency, s.cpu_percent)
        if any(len(col) != n for col in (*columns, s.rss_bytes)):
            return f"the timeline of state {s.state!r} does not fit its time axis"
    return ""


def render(report: RunReport, errors: Sequence[ErrorGroup] | None = None) -> str:
    """The HTML page of ``report``; ``errors``: the error groups to show (default: those
    the report holds, of the jobs when it was made)."""
    groups = report.errors if errors is None else errors
    states = report.states
    colour_of = {s.state: i for i, s in enumerate(states)}
    if report.timeline is not None:  # a state only the timeline knows still gets a colour
        for s in report.timeline.states:
            colour_of.setdefault(s.state, len(colour_of))
    chips = "".join(
        f"<li>{_state_cell(s.state, colour_of[s.state])}: <b>{s.jobs:,}</b></li>" for s in states
    )
    outcome = _esc(report.outcome)
    total = sum(s.jobs for s in states)
    head = (
        f"<h1>Run {_esc(report.run)}</h1>"
        f'<p class="meta"><span class="outcome {outcome}">{outcome}</span> '
        f"in {_esc(_duration(report.wall_seconds))} &middot; {total:,} "
        f"job{'' if total == 1 else 's'} &middot; jobs per state at the end:</p>"
        f'<ul class="chips">{chips}</ul>'
        f'<p class="hint"><b>Bottleneck:</b> {_esc(report.hint)}</p>'
    )
    if report.batch_scale > 1:
        head += (
            f'<p class="note">The coordinator fell behind: batches held up to '
            f"{report.batch_scale}x their usual work.</p>"
        )
    timeline = report.timeline
    why = _no_charts(report)
    if timeline is None or why:
        body = f'<p class="empty">No charts: {_esc(why)}.</p>'
    else:
        every = f"one point per {_duration(timeline.period)}"
        body = (
            f'<p class="note">{len(timeline.t)} point{"" if len(timeline.t) == 1 else "s"}, '
            f"{_esc(every)} (hover a series for its state)</p>"
            f'<div class="grid2">{_charts(timeline, colour_of)}</div>'
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>jorbmp report: {_esc(report.run)}</title>"
        f"<style>{_STYLE}</style></head><body><main>"
        f"{head}<h2>Over time</h2>{body}"
        f"<h2>States</h2>{_table(report, colour_of)}"
        f"<h2>Errors by kind</h2>{_errors(groups)}"
        "</main></body></html>\n"
    )
