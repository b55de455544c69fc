"""Where this process's cgroups are: the directories whose limit files apply to it.

`cgroup_dirs` lists, for one controller (``cpu``, ``memory``), every cgroup level of
this process from its own cgroup up to the top of the mount, for the v2 hierarchy and
the controller's v1 mount: a container's limit may sit on a parent, and a container
without a cgroup namespace sees the host's path. The CPU budget (`jorbmp._cpus`) reads
``cpu.max`` there, the memory limit (`jorbmp._memory_limit`) ``memory.max``.

Files that are missing, unreadable or not understood are ignored, never an error.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["cgroup_dirs", "read_text"]

_OCTAL = re.compile(r"\\([0-7]{3})")


def read_text(path: Path) -> str | None:
    """The file's text, or None when it cannot be read."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def cgroup_dirs(proc: Path, cgroup: Path, controller: str) -> list[tuple[int, Path]]:
    """(version, directory) of each cgroup level of this process for ``controller``,
    its own cgroup first, then each parent up to the mount.

    ``proc`` and ``cgroup`` are where procfs and the cgroup mounts are looked up (the
    mounts come from ``proc/self/mountinfo``; ``cgroup`` serves only without one)."""
    memberships = read_text(proc / "self" / "cgroup")
    if memberships is None:
        return []
    paths: dict[int, str] = {}  # cgroup version -> this process's cgroup path
    for line in memberships.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths[2] = parts[2]
        elif controller in parts[1].split(","):
            paths[1] = parts[2]
    found: list[tuple[int, Path]] = []
    for version, mount, root in _mounts(proc, cgroup, controller):
        path = paths.get(version)
        if path is None:
            continue
        # The mount shows the cgroup ``root`` at ``mount``. A path outside it (a
        # container without a cgroup namespace sees the host's path) places this
        # process at the mount's top, where a container's own limit is.
        rel = path[len(root) :] if path == root or path.startswith(root.rstrip("/") + "/") else ""
        parts_ = [p for p in rel.split("/") if p]
        if ".." in parts_:
            continue
        level = mount.joinpath(*parts_)
        while True:
            found.append((version, level))
            if level == mount or level.parent == level:
                break
            level = level.parent
    return found


def _mounts(proc: Path, cgroup: Path, controller: str) -> list[tuple[int, Path, str]]:
    """(version, mount point, cgroup root shown there) of the cgroup v2 mounts and the
    v1 mounts of ``controller``; the usual places when mountinfo is unreadable."""
    text = read_text(proc / "self" / "mountinfo")
    if text is None:
        usual = ["cpu,cpuacct", "cpu"] if controller == "cpu" else [controller]
        return [(2, cgroup, "/"), *((1, cgroup / name, "/") for name in usual)]
    mounts: list[tuple[int, Path, str]] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        if tail[0] == "cgroup2":
            version = 2
        elif tail[0] == "cgroup" and len(tail) >= 3 and controller in tail[2].split(","):
            version = 1
        else:
            continue
        mounts.append((version, Path(_unescape(fields[4])), _unescape(fields[3])))
    return mounts


def _unescape(field: str) -> str:
    """A mountinfo field as the path it names (spaces and the like are octal escapes)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)
