"""Choosing jobs from the command line: the jobs ``status CHECKPOINT --state S
[--error-contains T]`` lists, the ids ``redrive --job ID`` / ``--jobs-from FILE`` moves,
and the states a run has seen (``redrive`` refuses to move jobs to any other, a typo,
unless ``--force``).

It reads a `Run` loaded without the user's types, and returns data or lines of text;
`jorbmp.cli` escapes and prints them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from .errorgroups import jobs_text
from .run import FAILED, NEW, Job, Run

__all__ = [
    "last_error",
    "listing_data",
    "listing_lines",
    "matching_jobs",
    "read_ids",
    "seen_states",
]

# A last error longer than this is cut in the text listing (the JSON has all of it).
SHOWN_ERROR_CHARS = 200


def matching_jobs(run: Run[Any, Any], state: str, contains: str | None) -> list[Job[Any]]:
    """The jobs in ``state`` (with an error containing ``contains``, if given), in the
    run's order: the jobs ``redrive --from state --error-contains contains`` moves."""
    return [
        job
        for job in run.jobs.values()
        if job.state == state
        and (
            contains is None
            or any(contains in text for texts in job.recorded_errors().values() for text in texts)
        )
    ]


def last_error(job: Job[Any]) -> str | None:
    """The job's latest error: the last recorded in its present state, else the last
    of the state it recorded errors in last (None: it has none)."""
    errors = job.recorded_errors()
    texts = errors.get(job.state) or next((t for t in reversed(list(errors.values())) if t), None)
    return texts[-1] if texts else None


def listing_data(jobs: list[Job[Any]], state: str, contains: str | None) -> dict[str, Any]:
    """``status --state --json``: what was asked, and per job its id, retries, last error."""
    return {
        "state": state,
        "error_contains": contains,
        "count": len(jobs),
        "jobs": [
            {"id": job.id, "retries": job.retries, "last_error": last_error(job)} for job in jobs
        ],
    }


def listing_lines(
    jobs: list[Job[Any]], state: str, contains: str | None, present: Iterable[str]
) -> list[str]:
    """``status --state``: a head line, then a table of id, retries and last error
    (unescaped). ``present``: the states jobs are in, named when none matched."""
    what = f"in state {state!r}" + (
        "" if contains is None else f" with an error containing {contains!r}"
    )
    if not jobs:
        states = ", ".join(repr(s) for s in sorted(present)) or "none"
        return [f"no job {what} (the run's states: {states})"]
    rows = [("id", "retries", "last error")] + [
        (job.id, str(job.retries), _cut(last_error(job) or "")) for job in jobs
    ]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{jobs_text(len(jobs))} {what}:"]
    lines += [f"  {r[0].ljust(width[0])}  {r[1].ljust(width[1])}  {r[2]}".rstrip() for r in rows]
    return lines


def _cut(text: str) -> str:
    text = " ".join(text.split())  # one line per job
    return text if len(text) <= SHOWN_ERROR_CHARS else text[: SHOWN_ERROR_CHARS - 3] + "..."


def read_ids(given: list[str], files: list[str]) -> list[str]:
    """The job ids of ``--job`` options and ``--jobs-from`` files (one id a line, blank
    lines and ``#`` comments skipped; ``-``: standard input), in order, once each.
    ``OSError`` for a file that cannot be read, as it comes (the caller names it);
    ``ValueError`` for one that is not text."""
    ids = list(given)
    for name in files:
        if name == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                raise ValueError(f"{name}: not a text file of job ids (not UTF-8)") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                ids.append(line)
    return list(dict.fromkeys(ids))


def seen_states(run: Run[Any, Any]) -> set[str]:
    """The states the run knows: those its jobs are in or recorded errors in, those of
    its latest execution's report (the processor's states), and the two every run
    may have, `NEW` and `FAILED`."""
    seen = {NEW, FAILED}
    for job in run.jobs.values():
        seen.add(job.state)
        seen.update(job.recorded_errors())
    report = run.report or {}
    states = report.get("states") if isinstance(report, dict) else None
    if isinstance(states, list):
        seen.update(
            s["state"] for s in states if isinstance(s, dict) and isinstance(s.get("state"), str)
        )
    return seen
