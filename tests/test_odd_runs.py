"""Runs loaded without types execute, and error texts that no format can store as they
are (lone surrogates, from file names that are not UTF-8) are recorded escaped instead
of crashing the run. Real processes, real files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helpers_checkpoint import make_run, serializer

import jorbmp
from jorbmp import Processor, State

KINDS = ["JsonSerializer", "JournalSerializer", "SqliteSerializer"]


def bump(ac: Any, oc: Any, jc: Any) -> Any:
    """An exec for untyped contexts (plain dicts)."""
    jc["total"] = jc["n"] + 1
    return jc, "done"


def unparsable(ac: Any, oc: Any, jc: Any) -> Any:
    name = os.fsdecode(b"caf\xe9-%d.txt" % jc.n)  # a file name that is not UTF-8
    if jc.n % 2:
        raise ValueError(f"cannot parse {name}")
    return jc, "done", None, f"skipped {name}"  # a soft error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_a_run_loaded_without_types_executes(tmp_path: Path, kind: str, mode: str) -> None:
    path = tmp_path / "run.ckpt"
    serializer(kind, path).serialize(make_run(6))
    untyped = getattr(jorbmp, kind)(path)  # no types: contexts are plain data
    run = untyped.deserialize()
    Processor(None, [State("new", bump, kind=mode), State("done", terminal=True)], untyped).exec(
        run
    )
    loaded = getattr(jorbmp, kind)(path).deserialize()
    assert loaded.counts() == {"done": 6}
    assert sorted(job.context["total"] for job in loaded.jobs.values()) == list(range(1, 7))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["process", "thread", "async"])
def test_error_texts_with_lone_surrogates_are_recorded_escaped(
    tmp_path: Path, kind: str, mode: str
) -> None:
    path = tmp_path / "run.ckpt"
    if mode == "async":

        async def exec_(ac: Any, oc: Any, jc: Any) -> Any:
            return unparsable(ac, oc, jc)

    else:
        exec_ = unparsable
    states = [
        State("new", exec_, kind=mode, max_retries=0),
        State("done", terminal=True),
    ]
    Processor(None, states, serializer(kind, path)).exec(make_run(4))
    loaded = serializer(kind, path).deserialize()
    assert loaded.counts() == {"done": 2, "failed": 2}
    errors = {job.id: job.state_errors["new"] for job in loaded.jobs.values()}
    assert errors["1"] == ["ValueError: cannot parse caf\\udce9-1.txt"]
    assert errors["0"] == ["skipped caf\\udce9-0.txt"]
