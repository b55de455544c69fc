"""What ``Processor(..., memory_limit=...)`` means in bytes.

`available_memory` is the memory this process may use: the machine's physical memory,
lowered by the memory limit of its cgroup and of every cgroup above it (v2
``memory.max``, v1 ``memory.limit_in_bytes``; found as `jorbmp._cgroups` finds them for
the CPU budget). `resolve_memory_limit` turns the user's value into bytes: an int (or
a float above 1) is bytes, a float in (0, 1] that fraction of `available_memory`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import psutil

from ._cgroups import cgroup_dirs, read_text

__all__ = ["available_memory", "check_room", "resolve_memory_limit"]

log = logging.getLogger("jorbmp")


def available_memory(proc: str | Path = "/proc", cgroup: str | Path = "/sys/fs/cgroup") -> int:
    """Physical memory, lowered by any cgroup memory limit of this process (bytes)."""
    total = int(psutil.virtual_memory().total)
    for version, level in cgroup_dirs(Path(proc), Path(cgroup), "memory"):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        text = (read_text(level / name) or "").strip()
        # v2 writes "max" for no limit, v1 a huge number (PAGE_COUNTER_MAX pages):
        # anything above physical memory limits nothing.
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def resolve_memory_limit(value: object, available: int | None = None) -> int | None:
    """``memory_limit`` in bytes (None: no limit); ``ValueError`` for anything else
    than bytes or a fraction in (0, 1]. Bytes above what is available are lowered to
    it, with a WARNING: the kernel would kill workers before the limit was reached."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            "Processor: memory_limit must be None, bytes (an int) or a fraction in (0, 1] "
            f"of the memory available (a float), got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"Processor: memory_limit must be positive bytes or a fraction in (0, 1], got {value!r}"
        )
    if available is None:
        available = available_memory()
    if isinstance(value, float) and value <= 1.0:
        return max(1, int(value * available))
    limit = int(value)
    if limit > available:
        log.warning(
            "memory_limit %d bytes is above the %d bytes available to this process "
            "(physical memory, or its cgroup's limit): using %d",
            limit,
            available,
            available,
        )
        return available
    return limit


def check_room(limit: int, used: int) -> None:
    """Refuse a limit the coordinator alone already exceeds (``used``: its RSS): every
    job would be charged with it."""
    if used >= limit:
        raise ValueError(
            f"Processor: memory_limit of {limit} bytes is not above the {used} bytes this "
            "process already uses (RSS): no job could run within it"
        )
