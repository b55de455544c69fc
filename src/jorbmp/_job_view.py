"""``python -m jorbmp status CHECKPOINT --job ID``: one job as a person debugging it
wants it: state, context (as JSON), parent, retries, errors per state and the
traceback of its last attempt (`Job.traceback`).

Like the rest of the command line it reads the checkpoint without the user's types:
the context is plain data, shown as JSON. Text from the checkpoint goes to the
terminal escaped as `jorbmp.cli` escapes everything (a checkpoint from elsewhere
cannot send escape sequences).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from .checkpoint.base import Serializer
from .run import Job


def job_data(job: Job[Any]) -> dict[str, Any]:
    """The job as plain data, every field named (None where it has none)."""
    return {
        "id": job.id,
        "state": job.state,
        "context": msgspec.to_builtins(job.context),
        "parent": job.parent,
        "retries": job.retries,
        "kicks": job.kicks,
        "last_update": msgspec.to_builtins(job.last_update),
        "not_before": job.not_before,
        "state_errors": dict(job.recorded_errors()),
        "traceback": job.traceback,
    }


def job_lines(job: Job[Any], run_name: str, where: str) -> list[str]:
    """The text view of ``job`` (unescaped: the caller escapes each line)."""
    from .cli import _finite  # (JSON has no NaN)

    data = job_data(job)
    lines = [
        f"job {job.id!r} of run {run_name!r} in {where}",
        f"  state: {job.state}",
        f"  parent: {'none' if job.parent is None else repr(job.parent)}",
        f"  retries: {job.retries}",
        f"  last update: {data['last_update']}",
    ]
    if job.kicks:
        lines.append(f"  kicked: {job.kicks} jobs")
    if job.not_before is not None:
        lines.append(f"  not before: {job.not_before:.3f} (seconds since the epoch)")
    context = json.dumps(_finite(data["context"]), ensure_ascii=False, allow_nan=False)
    lines.append(f"  context: {context}")
    errors = job.recorded_errors()
    if not errors:
        lines.append("errors: none")
    for state, texts in errors.items():
        lines.append(f"errors in {state!r} ({len(texts)}):")
        lines.extend(f"  {_cut(text)}" for text in texts)
    if job.traceback is None:
        lines.append("last traceback: none (its last attempt, if any, did not raise)")
    else:
        lines.append("last traceback (of its last attempt):")
        lines.extend(f"  {line}" for line in job.traceback.rstrip("\n").split("\n"))
    return lines


# The most of one error text printed (as the traceback is bounded): `--json` has it whole.
ERROR_CHARS = 4000


def _cut(text: str) -> str:
    """``text``, or its first `ERROR_CHARS` and how much more there is."""
    if len(text) <= ERROR_CHARS:
        return text
    return f"{text[:ERROR_CHARS]}... ({len(text) - ERROR_CHARS:,} more characters: see --json)"


def show_job(serializer: Serializer, job_id: str, as_json: bool) -> int:
    """Print job ``job_id`` of the checkpoint; an unknown id is refused (exit code 2)."""
    from .cli import OK, _clean, _finite, _Refused

    run = serializer.deserialize()
    job = run.jobs.get(job_id)
    if job is None:
        n = len(run.jobs)
        raise _Refused(
            f"{serializer.path}: no job {job_id!r} in run {run.name!r} "
            f"({n} job{'' if n == 1 else 's'})"
        )
    if as_json:
        # ASCII only, and no NaN: valid JSON on any terminal or pipe.
        data = _finite(job_data(job))
        print(json.dumps(data, indent=1, ensure_ascii=True, allow_nan=False))
    else:
        print("\n".join(_clean(line) for line in job_lines(job, run.name, str(serializer.path))))
    return OK
