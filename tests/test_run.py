"""The model: jobs, their lazily created error dicts, and what survives a checkpoint."""

from __future__ import annotations

import msgspec
import pytest

from jorbmp import Job, JsonSerializer, Run

pytestmark = pytest.mark.timeout(30)


class Item(msgspec.Struct):
    n: int


def test_state_errors_is_a_real_dict_created_on_demand(tmp_path):
    run = Run("r", job_type=Item)
    run.add_job(Item(1))
    run.add_job(Item(2))
    job = run.jobs["0"]
    assert job.recorded_errors() == {}
    assert job._state_errors is None  # no dict held until one is needed
    job.state_errors.setdefault("new", []).append("boom")  # a user writing into it sticks
    assert run.jobs["0"].state_errors == {"new": ["boom"]}
    assert dict(job.recorded_errors()) == {"new": ["boom"]}
    with pytest.raises(TypeError):
        run.jobs["1"].recorded_errors()["x"] = []  # type: ignore[index]

    ser = JsonSerializer(tmp_path / "run.json", job_type=Item)
    ser.serialize(run)
    loaded = ser.deserialize()
    assert loaded.jobs["0"].state_errors == {"new": ["boom"]}
    assert loaded.jobs["1"]._state_errors is None
    assert loaded == run


def test_job_encodes_state_errors_under_its_public_name():
    job = Job(id="7", context=Item(1))
    job.state_errors["s"] = ["e"]
    encoded = msgspec.json.encode(job)
    assert b'"state_errors":{"s":["e"]}' in encoded
    assert b"_state_errors" not in encoded
    assert msgspec.json.decode(encoded, type=Job[Item]).state_errors == {"s": ["e"]}
