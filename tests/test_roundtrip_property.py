"""Property: every context a run can hold comes back from every checkpoint format as it
was, and through ``python -m jorbmp redrive`` (which loads without the user's types);
JSON and SQLite, which cannot hold NaN or infinities, refuse them and keep their file.

Contexts are generated over what msgspec encodes (issue 14, item 1): ints over the
int64/uint64 range, floats (-0.0, subnormal, huge, NaN, infinities), any unicode text
(not lone surrogates: msgspec cannot encode them, and `Run.add_job` refuses what it
cannot encode), bytes, bools, None, lists, tuples, sets, dicts keyed by str and int,
datetimes (naive and aware), dates, times, timedeltas, UUIDs, Decimals, enums,
literals, nested and array-like Structs, optional fields, a ``str | float`` union, and
an ``Any`` field of JSON-like data.
"""

from __future__ import annotations

import contextlib
import enum
import io
import math
import os
import struct
import subprocess
import sys
import tempfile
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, assume, event, given, reject, settings
from hypothesis import strategies as st

from jorbmp import (
    CheckpointError,
    JournalSerializer,
    JsonSerializer,
    Run,
    SqliteSerializer,
)
from jorbmp.cli import main as cli
from jorbmp.run import Job

FORMATS = {"json": JsonSerializer, "journal": JournalSerializer, "sqlite": SqliteSerializer}
REFUSE_NONFINITE = {"json", "sqlite"}


class Color(enum.Enum):
    RED = "red"
    GREEN = "green \u2713"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2**40


class Inner(msgspec.Struct):
    x: float = 0.0
    tags: list[str] = []
    day: date | None = None


class Point(msgspec.Struct, array_like=True):
    x: int
    y: float


class Ctx(msgspec.Struct):
    i: int = 0
    f: float = 0.0
    s: str = ""
    b: bytes = b""
    flag: bool = False
    nothing: None = None
    ints: list[int] = []
    pair: tuple[int, str] = (0, "")
    floats: tuple[float, ...] = ()
    by_name: dict[str, float] = {}
    by_int: dict[int, str] = {}
    numbers: frozenset[int] = frozenset()
    when: datetime | None = None
    day: date = date(2000, 1, 1)
    clock: time = time()
    span: timedelta = timedelta()
    uid: uuid.UUID | None = None
    dec: Decimal = Decimal(0)
    color: Color = Color.RED
    level: Level = Level.LOW
    lit: Literal["a", "b", 3] = "a"
    inner: Inner = msgspec.field(default_factory=Inner)
    maybe: Inner | None = None
    points: list[Point] = []
    opt_f: float | None = None
    text_or_number: str | float = ""
    data: Any = None


# -- strategies ---------------------------------------------------------------------

INTS = st.integers(-(2**63), 2**64 - 1)
SPECIAL_FLOATS = [-0.0, 0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                  -1.7976931348623157e308, 1e16, 0.1, 1 / 3]  # fmt: skip
NONFINITE = [
    math.nan,
    math.inf,
    -math.inf,
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\xff")[0],
]
FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(SPECIAL_FLOATS)
FLOATS = FINITE_FLOATS | st.sampled_from(NONFINITE)
TEXT = st.text() | st.sampled_from(
    ["", "null", "NaN", "\x00", "\u2028\u2029", "\"'\\", "\U0001f600"]
)
# Offsets of whole minutes only. RFC 3339 has no seconds in an offset, and msgspec's
# JSON encoder rounds them away: 12:00+00:00:30 comes back from JSON and SQLite as
# 12:00Z, 30 s off (msgpack keeps the instant). Python makes such offsets for old
# dates (Europe/Amsterdam before 1937: +00:19:32). Not fixed here (issue 14, item 1).
OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
DATETIMES = (
    st.datetimes() | st.datetimes(timezones=OFFSETS) | st.datetimes(timezones=st.just(timezone.utc))
)
TIMES = st.times() | st.times(timezones=OFFSETS)


def json_like(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | INTS | floats | TEXT,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
        max_leaves=8,
    )


def contexts(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Ctx]:
    inner = st.builds(Inner, x=floats, tags=st.lists(TEXT, max_size=2), day=st.none() | st.dates())
    return st.builds(
        Ctx,
        i=INTS,
        f=floats,
        s=TEXT,
        b=st.binary(max_size=16) | st.just(b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00"),
        flag=st.booleans(),
        ints=st.lists(INTS, max_size=3),
        pair=st.tuples(INTS, TEXT),
        floats=st.lists(floats, max_size=3).map(tuple),
        by_name=st.dictionaries(TEXT, floats, max_size=3),
        by_int=st.dictionaries(INTS, TEXT, max_size=3),
        numbers=st.frozensets(INTS, max_size=3),
        when=st.none() | DATETIMES,
        day=st.dates(),
        clock=TIMES,
        span=st.timedeltas(),
        uid=st.none() | st.uuids(),
        dec=st.decimals(allow_nan=True, allow_infinity=True),
        color=st.sampled_from(Color),
        level=st.sampled_from(Level),
        lit=st.sampled_from(["a", "b", 3]),
        inner=inner,
        maybe=st.none() | inner,
        points=st.lists(st.builds(Point, x=INTS, y=floats), max_size=2),
        opt_f=st.none() | floats,
        text_or_number=TEXT | floats,
        data=json_like(floats),
    )


@st.composite
def runs(draw: st.DrawFn) -> tuple[bool, Run[Ctx, Ctx]]:
    """A run: its name, overall context, up to 3 jobs (with odd states, errors, ...)
    and a report; half of them with NaN or infinities somewhere (more or less deep),
    half with none. Only what a run can hold (`Run` and `Run.add_job` accept it)."""
    nonfinite = draw(st.booleans())
    floats = FLOATS if nonfinite else FINITE_FLOATS
    # Not what a run can hold (msgspec cannot write it, or not read it back, such as an
    # aware datetime whose UTC time is before year 1 or after 9999): `Run` refuses it
    # (TypeError), and `Run.add_job` (ValueError).
    name, overall = draw(TEXT), draw(contexts(floats))
    try:
        run: Run[Ctx, Ctx] = Run(name, overall, Ctx)
    except TypeError:
        reject()
    for _ in range(draw(st.integers(0, 3))):
        context = draw(contexts(floats))
        try:
            job_id = run.add_job(context)
        except ValueError:
            reject()
        meta = draw(JOB_META)
        job = run.jobs[job_id]
        job.state = meta["state"]
        job.state_errors = meta["errors"]
        job.retries, job.kicks = meta["retries"], meta["kicks"]
        job.parent = meta["parent"]
        if "not_before" in Job.__struct_fields__:  # (9baee05 has none: this runs there too)
            job.not_before = meta["not_before"]
        job.last_update = meta["last_update"]
    run.report = draw(st.none() | st.dictionaries(TEXT, json_like(floats), max_size=3))
    return nonfinite, run


JOB_META = st.fixed_dictionaries({
    "state": TEXT.filter(bool),
    "errors": st.dictionaries(TEXT, st.lists(TEXT, min_size=1, max_size=2), max_size=2),
    "retries": st.integers(0, 2**31),
    "kicks": st.integers(0, 2**31),
    "parent": st.none() | TEXT,
    "not_before": st.none() | st.floats(0, 4e9),
    "last_update": st.datetimes(timezones=st.just(timezone.utc)),
})  # fmt: skip


# -- comparing ------------------------------------------------------------------------


def canon(value: Any) -> Any:
    """``value`` in a form whose == means "the same": floats by their bits, Decimals by
    their text (NaN, sNaN, -0, exponent), types kept apart (1, 1.0 and True differ)."""
    if isinstance(value, msgspec.Struct):
        return (type(value).__name__, *(canon(getattr(value, f)) for f in value.__struct_fields__))
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, Decimal):
        return ("Decimal", str(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", {canon(k): canon(v) for k, v in value.items()})
    if isinstance(value, frozenset):
        return ("frozenset", frozenset(canon(v) for v in value))
    if isinstance(value, (datetime, time)):
        # Aware ones: the same instant and offset (msgpack stores an aware datetime as
        # a timestamp: it comes back in UTC, the same instant; see `same_when`).
        return (type(value).__name__, value, value.utcoffset())
    return (type(value).__name__, value)


def holds_nonfinite(value: Any) -> bool:
    """Whether any float in ``value`` (at any depth) is NaN or infinite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, msgspec.Struct):
        return any(holds_nonfinite(getattr(value, f)) for f in value.__struct_fields__)
    if isinstance(value, (list, tuple, frozenset)):
        return any(holds_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(holds_nonfinite(v) for v in value.values())
    return False


def utc_when(ctx: Ctx) -> Ctx:
    """``ctx`` with aware datetimes in UTC, as a msgpack round trip gives them back."""
    when = ctx.when
    if when is None or when.tzinfo is None:
        return ctx
    return msgspec.structs.replace(ctx, when=when.astimezone(timezone.utc))


def job_view(job: Job[Any], fmt: str) -> tuple[Any, ...]:
    context = utc_when(job.context) if fmt == "journal" else job.context
    return (
        job.id,
        job.state,
        canon(dict(job.recorded_errors())),
        job.parent,
        job.retries,
        job.kicks,
        canon(getattr(job, "not_before", None)),
        job.last_update,
        canon(context),
    )


def run_view(run: Run[Any, Any], fmt: str) -> tuple[Any, ...]:
    overall = utc_when(run.overall) if fmt == "journal" else run.overall
    jobs = [job_view(job, fmt) for job in run.jobs.values()]
    return (run.name, run.next_id, canon(overall), canon(run.report), jobs)


# -- the property ---------------------------------------------------------------------


def storable(run: Run[Any, Any]) -> bool:
    try:
        msgspec.msgpack.decode(msgspec.msgpack.encode(run.overall), type=Ctx)
    except (msgspec.ValidationError, ValueError):  # e.g. an aware datetime in year 1
        return False
    return True


def redrive(path: Path, from_state: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        # (A state the run never saw: --force.)
        code = cli(["redrive", str(path), f"--from={from_state}", "--to=moved \u2713", "--force"])
    assert code == 0, out.getvalue()
    return out.getvalue()


def holds_nonfinite_anywhere(run: Run[Ctx, Ctx]) -> bool:
    values = (run.overall, run.report, *(j.context for j in run.jobs.values()))
    return any(holds_nonfinite(v) for v in values)


def check_formats(run: Run[Ctx, Ctx], where: Path, nonfinite: bool) -> None:
    for fmt, cls in FORMATS.items():
        path = where / f"run.{fmt}"
        if nonfinite and fmt in REFUSE_NONFINITE:
            # Refused at the write, and the file there is left as it was.
            good: Run[Ctx, Ctx] = Run("good", Ctx(), Ctx)
            good.add_job(Ctx(s="kept"))
            cls(path, Ctx, Ctx).serialize(good)
            before = path.read_bytes()
            with pytest.raises(CheckpointError, match="holds a non-finite float"):
                cls(path, Ctx, Ctx).serialize(run)
            assert path.read_bytes() == before
            assert run_view(cls(path, Ctx, Ctx).deserialize(), fmt) == run_view(good, fmt)
            continue
        cls(path, Ctx, Ctx).serialize(run)
        back = cls(path, Ctx, Ctx).deserialize()
        assert run_view(back, fmt) == run_view(run, fmt), fmt
        # redrive: an untyped load, a move, a write; the typed load sees the same run
        # but for the moved jobs' state and retry fields.
        first = next(iter(run.jobs.values()), None)
        if first is None:
            continue
        from_state = first.state
        assert "moved" in redrive(path, from_state)
        again = cls(path, Ctx, Ctx).deserialize()
        for job in back.jobs.values():
            if job.state == from_state:
                job.state, job.retries = "moved \u2713", 0
                if "not_before" in Job.__struct_fields__:
                    job.not_before = None
                job.last_update = again.jobs[job.id].last_update
        assert run_view(again, fmt) == run_view(back, fmt), fmt


@pytest.mark.timeout(120)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(case=runs())
def test_every_context_round_trips_through_every_format(case: tuple[bool, Run[Ctx, Ctx]]) -> None:
    drawn_nonfinite, run = case
    assume(storable(run))
    nonfinite = holds_nonfinite_anywhere(run)
    event("with NaN or infinities" if nonfinite else "finite")
    if drawn_nonfinite:
        event("a non-finite float drawn" if nonfinite else "no non-finite float drawn")
    with tempfile.TemporaryDirectory() as where:
        check_formats(run, Path(where), nonfinite)


# -- the command line itself, once per format ----------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_redrive_on_the_command_line_keeps_every_context(tmp_path: Path, fmt: str) -> None:
    cls = FORMATS[fmt]
    rich = Ctx(
        i=2**64 - 1, f=-0.0, s="h\u00e9llo \x00 \u2028 \U0001f600", b=b"\x00\xcb\x7f\xf8",
        ints=[-(2**63), 0], pair=(1, "x"), floats=(5e-324, 1.7976931348623157e308),
        by_name={"a": 0.1}, by_int={-1: "minus"}, numbers=frozenset({3, 1}),
        when=datetime(2020, 2, 29, 23, 59, 59, 999999), day=date(1, 1, 1),
        clock=time(23, 59, 59, 1, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        span=timedelta(days=-1, microseconds=1), uid=uuid.UUID(int=2**128 - 1),
        dec=Decimal("-0E-1000"), color=Color.GREEN, level=Level.HIGH, lit=3,
        inner=Inner(1e300, ["t"], date(9999, 12, 31)), maybe=None,
        points=[Point(-1, 2.5)], opt_f=None, text_or_number=1.0,
        data={"k": [1, 1.0, True, None, "s", {"n": -(2**63)}]},
    )  # fmt: skip
    run: Run[Ctx, Ctx] = Run("cli \u2713", rich, Ctx)
    for _ in range(3):
        run.add_job(rich)
    run.jobs["1"].state = "parked"
    run.jobs["1"].state_errors = {"new": ["boom \u2713"]}
    path = tmp_path / f"run.{fmt}"
    cls(path, Ctx, Ctx).serialize(run)
    out = subprocess.run(
        [sys.executable, "-m", "jorbmp", "redrive", str(path), "--from", "parked", "--to", "new"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "moved 1 job from" in out.stdout
    back = cls(path, Ctx, Ctx).deserialize()
    assert [j.state for j in back.jobs.values()] == ["new", "new", "new"]
    expected = utc_when(rich) if fmt == "journal" else rich
    assert canon(back.overall) == canon(expected)
    assert all(canon(j.context) == canon(expected) for j in back.jobs.values())
    assert back.jobs["1"].state_errors == {"new": ["boom \u2713"]}
