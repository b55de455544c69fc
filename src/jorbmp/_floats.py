"""Non-finite floats (NaN, inf, -inf): what JSON cannot hold.

msgspec's JSON encoder writes a non-finite float as ``null``, which a typed load then
refuses (a ``float`` field) or reads back as None (``float | None``), and which an
untyped load cannot tell from a None: a JSON (or SQLite) checkpoint holding one can
never be read back as it was. msgpack (the journal, and every context crossing a
process boundary) keeps them. So formats that write JSON refuse them: the processor
refuses an exec's outcome that holds one (a failed attempt of that job), and the
writers refuse to write one (`CheckpointError`), so that nothing unreadable is written.

Finding them is cheap: in msgpack, msgspec writes every float as a float 64 (``0xcb``
and 8 bytes, big-endian), whose exponent is all ones exactly for the non-finite ones:
a first byte ``0x7f`` or ``0xff`` and a second one ``>= 0xf0``. One search of the
encoded bytes (in C) says when there certainly is none; a hit (which may also be such
bytes inside a string, bytes or an extension) is then checked by walking the decoded
data.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from .errors import CheckpointError

__all__ = [
    "describe",
    "find_nonfinite",
    "maybe_nonfinite",
    "nonfinite_in",
    "nonfinite_in_head",
    "nonfinite_in_jobs",
    "nonfinite_in_run",
    "refusal",
    "refuse",
    "stores_nonfinite",
]

# A msgpack float 64 (0xcb) with its exponent all ones: inf, -inf or a NaN.
_NONFINITE = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]")

#: ``maybe_nonfinite(data)`` is None when the msgpack ``data`` holds no non-finite
#: float (a match may be a false alarm: check with `nonfinite_in`).
maybe_nonfinite: Callable[[Any], Any] = _NONFINITE.search

encode: Callable[[Any], bytes] = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode  # untyped: the data as encoded
_context = operator.attrgetter("context")


def stores_nonfinite(serializer: object) -> bool:
    """Whether ``serializer``'s checkpoints keep NaN and infinities (formats that cannot
    say so with a false ``stores_nonfinite_floats``)."""
    return bool(getattr(serializer, "stores_nonfinite_floats", True))


def find_nonfinite(value: Any, root: str = "$") -> tuple[str, float] | None:
    """The path (``$.values[2]``) and value of the first non-finite float in ``value``
    (plain data: what an untyped msgpack decode gives), depth first; None if none.

    Dict keys are not looked at: JSON writes a float key as a string ("nan"), which
    reads back."""
    # (path of the container, key or index, value); paths are built only for a hit.
    stack: list[tuple[Any, Any, Any]] = [(None, root, value)]
    while stack:
        parent, key, item = stack.pop()
        kind = type(item)
        if kind is float:
            if not math.isfinite(item):
                return _path(parent, key), item
        elif kind is list or kind is tuple:
            here = (parent, key)
            stack.extend((here, i, v) for i, v in reversed(list(enumerate(item))))
        elif kind is dict:
            here = (parent, key)
            stack.extend((here, k, v) for k, v in reversed(list(item.items())))
    return None


def _path(parent: Any, key: Any) -> str:
    parts: list[str] = []
    while parent is not None:
        if type(key) is int:
            parts.append(f"[{key}]")
        elif type(key) is str and key.isidentifier():
            parts.append(f".{key}")
        else:
            parts.append(f"[{key!r}]")
        parent, key = parent
    parts.append(str(key))
    return "".join(reversed(parts))


def nonfinite_in(data: Any, root: str = "$") -> tuple[str, float] | None:
    """`find_nonfinite` of msgpack ``data`` (bytes, or a ``msgspec.Raw``), cheap when
    it holds none."""
    if maybe_nonfinite(data) is None:
        return None
    return find_nonfinite(_decode(data), root)


def describe(found: tuple[str, float]) -> str:
    """``"nan at $.ratio"``."""
    path, value = found
    return f"{value!r} at {path}"


def nonfinite_in_run(run: Any) -> tuple[str, tuple[str, float]] | None:
    """The first thing in ``run`` (a `Run`) holding a non-finite float, as (what,
    `find_nonfinite`'s answer): the overall context, the report, or a job; None if
    none (see `nonfinite_in_head` and `nonfinite_in_jobs`)."""
    return nonfinite_in_head(run) or nonfinite_in_jobs(run.jobs.values())


def nonfinite_in_head(run: Any) -> tuple[str, tuple[str, float]] | None:
    """`nonfinite_in_run` of the run's own fields: its overall context and report."""
    found = nonfinite_in(encode(run.overall))
    if found is not None:
        return "the overall context", found
    if run.report is not None:
        found = nonfinite_in(encode(run.report))
        if found is not None:
            return "the run's report", found
    return None


def nonfinite_in_jobs(jobs: Iterable[Any]) -> tuple[str, tuple[str, float]] | None:
    """`nonfinite_in_run` of the contexts of ``jobs`` (`Job` objects; paths from the
    job: ``$.context.ratio``). One msgpack encode of the contexts and one search when
    none has one (~0.1 µs a job)."""
    jobs = list(jobs)
    if maybe_nonfinite(encode(list(map(_context, jobs)))) is None:
        return None
    for job in jobs:
        found = nonfinite_in(encode(job.context), "$.context")
        if found is not None:
            return f"job {job.id!r}", found
    return None


def refusal(path: Any, serializer: object, what: str, found: tuple[str, float]) -> str:
    """The text of the `CheckpointError` of a write refused because ``what`` holds the
    non-finite float ``found``."""
    return (
        f"{path}: {what} holds a non-finite float ({describe(found)}), which a "
        f"{type(serializer).__name__} checkpoint cannot store (JSON has no NaN or "
        "infinity: it would be written as null, which does not read back): nothing written"
    )


def refuse(path: Any, serializer: object, found: tuple[str, tuple[str, float]] | None) -> None:
    """Raise the `CheckpointError` of `refusal` if ``found`` (an answer of
    `nonfinite_in_run` and the like) is not None."""
    if found is not None:
        raise CheckpointError(refusal(path, serializer, *found))
