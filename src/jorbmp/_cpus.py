"""The CPU budget of local process states: how many cores there are, and who runs on them.

`available_cpus` counts the cores this process may use: its CPU affinity, lowered by a
CPU quota of its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), at every level from
its own cgroup up to the root of the mount, as a container's limit may sit on a parent.

`CpuBudget` hands out that many exec slots across the process states (``Processor(...,
cpus=...)``). One slot is one worker executing: a worker runs one exec at a time,
however many batches it holds. The coordinator drives it from its event loop thread::

    add(name, fixed, maximum, minimum)      once per process state
    demand(name, waiting, mean_seconds)     whenever a queue changes (cheap), and per tick;
                                            before `acquire`, so shares see the queue
    cap(name, limit)                        when the state's controller moves its limit
    acquire(name) -> bool                   before an idle worker gets a batch
    release(name)                           when a worker's last batch is back, or it died
    hungry() -> [name, ...]                 after a release: the lanes to pump

**Shares.** `share` is how many slots a state may hold now; `acquire` admits a state
below its share while fewer than ``total`` slots are held, so at most ``total`` execs
of the states inside the budget run at once, with no exception. Shares are recomputed
(O(states log states), 10-30 us for 3-10 states) on the first `share`, `acquire` or
`hungry` after anything changed (an acquire or release of a busy state that cannot
change them does not count), so a freed core goes to whichever state has work at once,
not at the next tick:

- A state with nothing waiting keeps the slots it holds and gets no more; what it
  leaves goes to the others.
- The rest is shared by the states with work in proportion to their work in seconds,
  queue depth times mean exec time (a state not yet timed counts at the mean of those
  that are): with equal queues, a state of 10 ms execs gets 5 times the share of one of
  2 ms. No share exceeds the state's ceiling (its fixed concurrency, or the lower of its
  maximum and its controller's `cap`), nor what it can use (held plus waiting).
- Fixed states, when they count against the budget (``cpus`` given), are served first;
  adaptive states share what they leave. Without ``cpus`` (``fixed_inside=False``) a
  fixed state is outside the budget: its share is its concurrency, nothing else.
- Minimums (1 unless set) are met when those of all the states with work fit in what is
  left, one slot per `SLICE_SECONDS` of work waiting at most (a slot taken for less
  costs more in hand-offs than it brings); then the rest goes by work. When they do
  not fit (more states with work than cores), they are dropped and shares go by work
  alone: equal shares of one core each would cap the state with the most work at one,
  however deep its queue. Instead no state starves: one with work and nothing running
  for `STARVE_SECONDS` is served one slot ahead of everyone, the next slot that frees.
- Admission is work-conserving: a state at its share may take a free slot that no other
  state with work waiting needs to reach its share, so a core never idles while work
  waits (shares are rounded, and demand can be a tick old).

**Workers alive.** A pool that starts a worker only for a slot it acquired when none of
its own is idle, and stops its idle workers beyond ``share + 1``, keeps at most
``total`` plus the number of states alive (the bound issue 17 sets), and one idle
worker per state ready for the next slot it gets.

Time only ages starving states; the clock is injectable, so tests step it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from ._cgroups import cgroup_dirs, read_text

__all__ = ["STARVE_SECONDS", "CpuBudget", "available_cpus"]

# How long a state with work may go without a slot when there are fewer cores than
# states with work, before it is served next. Shorter switches cores between states
# more often (a switch can cost a worker start, tens of ms); longer leaves the states
# downstream of a starved one without work for longer.
STARVE_SECONDS = 0.1
# The period the kernel uses for a CPU quota written without one (cgroup v2 ``cpu.max``).
DEFAULT_PERIOD_US = 100_000
# The least mean exec time a state's work is weighed at: execs of no measurable time
# still hold a core while they run, and a weight of 0 would never get one.
MIN_MEAN_SECONDS = 1e-6
# The mean exec time assumed for states with work when none has been timed yet.
UNTIMED_MEAN_SECONDS = 1.0
# The least work, in exec seconds waiting, that a state's minimum guarantees a slot
# for while others have work too: each slot a state takes from another costs a core
# idle for a round trip or two (the other's worker runs dry, ~0.2-0.5 ms each), so a
# state fed a job at a time by the one before it (4 ms execs, 1-5 waiting) took a core
# for every job or two and left 6-7% of 2 cores idle. It waits for a slice's worth of
# work instead, or for `STARVE_SECONDS`; free cores it takes at once as before.
SLICE_SECONDS = 0.025


def available_cpus(proc: str | Path = "/proc", cgroup: str | Path = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its affinity (or the machine's count), lowered by
    the CPU quota of its cgroup and the cgroups above it; at least 1.

    ``proc`` and ``cgroup`` are where procfs and the cgroup mounts are looked up (the
    mounts come from ``proc/self/mountinfo``; ``cgroup`` serves only without one). A
    file that is missing, unreadable or not understood is ignored, never an error.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    for quota in _quotas(Path(proc), Path(cgroup)):
        cpus = min(cpus, quota)
    return max(1, cpus)


def _quotas(proc: Path, cgroup: Path) -> list[int]:
    """The quota, in whole cores, of each cgroup level of this process that has one."""
    found: list[int] = []
    for version, level in cgroup_dirs(proc, cgroup, "cpu"):
        quota = _v2_quota(level) if version == 2 else _v1_quota(level)
        if quota is not None:
            found.append(quota)
    return found


def _cores(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def _v2_quota(level: Path) -> int | None:
    """``cpu.max`` ("max 100000": none; "200000 100000": 2 cores), in whole cores."""
    text = read_text(level / "cpu.max")
    try:
        fields = (text or "").split()
        if not fields or fields[0] == "max" or len(fields) > 2:
            return None
        return _cores(int(fields[0]), int(fields[1]) if len(fields) == 2 else DEFAULT_PERIOD_US)
    except ValueError:
        return None


def _v1_quota(level: Path) -> int | None:
    """``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` (a quota of -1: none), in cores."""
    quota = read_text(level / "cpu.cfs_quota_us")
    period = read_text(level / "cpu.cfs_period_us")
    try:
        return None if quota is None or period is None else _cores(int(quota), int(period))
    except ValueError:
        return None


class _Entry:
    """One process state's bounds, demand, held slots and current share."""

    __slots__ = (
        "ceiling",
        "fixed",
        "inside",
        "limit",
        "maximum",
        "mean",
        "minimum",
        "name",
        "running",
        "share",
        "starved_since",
        "waiting",
    )

    def __init__(self, name: str, fixed: int | None, maximum: int, minimum: int, inside: bool):
        self.name = name
        self.fixed = fixed
        self.maximum = fixed if fixed is not None else maximum
        self.minimum = 1 if fixed is not None else minimum
        self.limit = self.maximum  # the controller's limit (`CpuBudget.cap`)
        self.ceiling = self.maximum  # the lower of maximum and limit
        self.inside = inside  # counts against the budget
        self.waiting = 0
        self.mean: float | None = None
        self.running = 0  # slots held (acquired, not released)
        self.share = self.maximum if not inside else 0
        self.starved_since: float | None = None  # work waiting, nothing running, since


def _apportion(pool: int, items: list[tuple[_Entry, float, int, int]]) -> int:
    """Add to each entry's share its part of ``pool`` slots, given as (entry, weight,
    lo, hi): proportional to weight, each between lo and hi more; lo is dropped for all
    when the lows do not fit. Returns the slots left (when every hi is reached)."""
    if len(items) == 1 or pool == 0:  # the usual cases, quickly: one state with work
        for e, _, _, hi in items:
            give = min(hi, pool)
            e.share, pool = e.share + give, pool - give
        return pool
    if sum(lo for _, _, lo, _ in items) > pool:
        items = [(e, w, 0, hi) for e, w, _, hi in items]
    if sum(hi for _, _, _, hi in items) <= pool:
        for e, _, _, hi in items:
            e.share += hi
        return pool - sum(hi for _, _, _, hi in items)
    # Find the proportional split with bounds: clamp the ideal parts; when the clamped
    # parts overshoot, the lows that clamped up are fixed at their lows for good (a
    # smaller factor keeps them there), when they undershoot, the highs that clamped
    # down are fixed at their highs; repeat with the others (each round fixes one).
    free, left = list(items), pool
    parts: list[float] = []
    while free:
        weight = sum(w for _, w, _, _ in free)
        parts = [min(max(left * w / weight, lo), hi) for _, w, lo, hi in free]
        if abs(sum(parts) - left) < 1e-9 * left:
            break
        fix_low = sum(parts) > left
        keep = []
        for item in free:
            e, w, lo, hi = item
            if (fix_low and left * w / weight < lo) or (not fix_low and left * w / weight > hi):
                e.share += lo if fix_low else hi
                left -= lo if fix_low else hi
            else:
                keep.append(item)
        if len(keep) == len(free):  # float error only: take the clamped parts as they are
            break
        free, parts = keep, []
    if not free:
        return left
    # Whole slots: the floor of each part, then one more each for the largest fractions
    # (ties: the larger weight, then the state added first); +1e-9: a part that float
    # arithmetic left a hair below a whole number.
    given = [min(max(int(x + 1e-9), lo), hi) for x, (_, _, lo, hi) in zip(parts, free, strict=True)]
    order = sorted(range(len(free)), key=lambda i: (given[i] - parts[i], -free[i][1], i))
    spare = left - sum(given)
    for i in order:
        if spare > 0 and given[i] < free[i][3]:
            given[i], spare = given[i] + 1, spare - 1
    for i in reversed(order):  # only float error can overshoot; take back the smallest
        if spare < 0 and given[i] > free[i][2]:
            given[i], spare = given[i] - 1, spare + 1
    for (e, _, _, _), g in zip(free, given, strict=True):
        e.share += g
    return max(0, spare)


class CpuBudget:
    """At most ``total`` process-state execs at once, shared by where work waits (see
    the module docstring); ``fixed_inside``: whether fixed states count against it."""

    __slots__ = (
        "_clock",
        "_dirty",
        "_entries",
        "_held",
        "_inside",
        "_wake",
        "fixed_inside",
        "total",
    )

    def __init__(
        self,
        total: int,
        *,
        fixed_inside: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"cpus must be an int of at least 1, got {total!r}")
        self.total = total
        self.fixed_inside = fixed_inside
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._inside: list[_Entry] = []  # the entries that count against the budget
        self._held = 0  # slots held by the states inside the budget
        self._dirty = False  # shares are stale
        self._wake = math.inf  # clock reading when a starving state becomes due

    @classmethod
    def for_cpus(cls, cpus: int | None, clock: Callable[[], float] = time.monotonic) -> CpuBudget:
        """The budget of ``Processor(..., cpus=cpus)``: ``cpus`` slots shared by all
        process states, or, without it, the available cores shared by the adaptive ones."""
        if cpus is None:
            return cls(available_cpus(), fixed_inside=False, clock=clock)
        return cls(cpus, clock=clock)

    def __repr__(self) -> str:
        self._refresh()
        shares = {e.name: f"{e.running}/{e.share}" for e in self._entries.values()}
        return f"CpuBudget(total={self.total}, held={self._held}, running/share={shares})"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def held(self) -> int:
        """Slots held now by the states inside the budget."""
        return self._held

    def add(self, name: str, fixed: int | None, maximum: int = 1, minimum: int = 1) -> None:
        """Register a process state: ``fixed`` concurrency, or (None) adaptive within
        [``minimum``, ``maximum``]."""
        if name in self._entries:
            raise ValueError(f"state {name!r} is already in the CPU budget")
        bounds = [fixed] if fixed is not None else [minimum, maximum]
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bounds):
            raise ValueError(f"state {name!r}: concurrency bounds must be ints >= 1")
        if fixed is None and maximum < minimum:
            raise ValueError(f"state {name!r}: maximum {maximum} is below minimum {minimum}")
        inside = fixed is None or self.fixed_inside
        self._entries[name] = e = _Entry(name, fixed, maximum, minimum, inside)
        if inside:
            self._inside.append(e)
        self._dirty = True

    def demand(self, name: str, waiting: int, mean_seconds: float | None) -> None:
        """Jobs of ``name`` waiting for a slot now, and its mean exec time (None: none
        timed yet). Cheap: shares are recomputed when next asked for."""
        e = self._entries[name]
        if e.waiting != waiting or e.mean != mean_seconds:
            e.waiting, e.mean = max(0, waiting), mean_seconds
            self._dirty = self._dirty or e.inside

    def cap(self, name: str, limit: int) -> None:
        """Lower (or raise back) the ceiling of ``name`` to its controller's ``limit``."""
        if limit < 1:
            raise ValueError(f"state {name!r}: a concurrency limit must be >= 1, got {limit}")
        e = self._entries[name]
        e.limit = limit
        e.ceiling = min(e.maximum, limit)
        if not e.inside:
            e.share = e.ceiling
        self._dirty = True

    def share(self, name: str) -> int:
        """How many slots ``name`` may hold now."""
        self._refresh()
        return self._entries[name].share

    def acquire(self, name: str) -> bool:
        """Take a slot for one exec of ``name``, if the budget allows it now."""
        e = self._entries[name]
        if e.running >= e.ceiling:
            return False
        if e.inside:
            self._refresh()
            if self._held >= self.total:
                return False
            if e.running >= e.share and self.total - self._held <= self._owed(e):
                return False  # the free slots are owed to states below their share
            self._held += 1
            self._moved(e, e.running + 1)
        e.running += 1
        return True

    def admits(self, name: str) -> int:
        """How many more `acquire`s of ``name`` would succeed now if nothing else moved:
        0 exactly when the next one would fail (the pool's `free` counts by it, so a
        slot it offers is one `acquire` gives)."""
        e = self._entries[name]
        room = e.ceiling - e.running
        if room <= 0 or not e.inside:
            return max(0, room)
        self._refresh()
        free = self.total - self._held
        if free <= 0:
            return 0
        below = max(0, min(e.share - e.running, free))  # up to its share: no questions
        beyond = max(0, free - below - self._owed(e))  # past it: what no one else is owed
        return min(room, below + beyond)

    def yields(self, name: str) -> bool:
        """Whether ``name`` holds more slots than its share while another state with
        work and a share runs nothing. Its workers then take no second (pipelined)
        batch, which needs no slot: otherwise a state of short execs keeps its workers
        fed, and its slots, for as long as its queue lasts (a pipeline then ran stage
        by stage: no job of 1,000 done at 75% of the run). Only for a state that runs
        nothing: yielding to every state below its share stopped pipelining most of the
        time, with 3 states on 2 cores, and cost a third of the throughput."""
        e = self._entries[name]
        if not e.inside:
            return False
        self._refresh()
        return e.running > e.share and any(
            o.waiting and not o.running and o.share for o in self._inside if o is not e
        )

    def release(self, name: str) -> None:
        """Give back a slot `acquire` gave ``name``."""
        e = self._entries[name]
        if e.running <= 0:
            raise RuntimeError(f"state {name!r} released a CPU slot it did not hold")
        if e.inside:
            self._held -= 1
            self._moved(e, e.running - 1)
        e.running -= 1

    def hungry(self) -> list[str]:
        """States inside the budget with work waiting and fewer slots than their share,
        furthest below it first: after a release, the lanes to pump."""
        self._refresh()
        below = [e for e in self._inside if e.waiting and e.running < e.share]
        below.sort(key=lambda e: e.running - e.share)
        return [e.name for e in below]

    def _moved(self, e: _Entry, running: int) -> None:
        """``e`` (inside) is about to hold ``running`` slots: mark the shares stale
        unless that cannot change them. It cannot while ``e`` has work and runs something
        both before and after, and neither what it can use (held plus waiting) nor its
        minimum binds its share: then only ``e``'s bound moved, and it did not bind.
        Most acquires and releases of a busy state are such, and skip a recompute."""
        if self._dirty:
            return
        if e.waiting and e.running and running:
            can_use = min(e.ceiling, min(e.running, running) + e.waiting)
            if e.share < can_use and e.minimum <= can_use:
                return
        self._dirty = True

    def _owed(self, me: _Entry) -> int:
        """Slots the other states with work waiting lack to reach their shares."""
        return sum(
            e.share - e.running
            for e in self._inside
            if e is not me and e.waiting and e.running < e.share
        )

    def _refresh(self) -> None:
        """Recompute the shares if anything changed or a starving state became due."""
        now = self._clock()
        if not self._dirty and now < self._wake:
            return
        self._dirty, self._wake = False, math.inf
        pool, working, timed, n_timed = self.total, [], 0.0, 0
        for e in self._inside:
            if e.waiting:
                e.share = 0
                working.append(e)
                if e.running:
                    e.starved_since = None
                elif e.starved_since is None:  # waits with nothing running: ageing
                    e.starved_since = now
                if e.mean is not None:
                    timed, n_timed = timed + e.mean, n_timed + 1
            else:  # keeps what it holds (under its ceiling), gets no more
                e.share = min(e.running, e.ceiling)
                pool -= e.share
                e.starved_since = None
        if not working:
            return
        pool = max(0, pool)
        starved = [e for e in working if e.starved_since is not None]
        starved.sort(key=_since)  # the longest starved first
        for e in starved:
            due = _since(e) + STARVE_SECONDS
            if now < due:
                self._wake = min(self._wake, due)
            elif pool:
                e.share, pool = 1, pool - 1
        untimed = timed / n_timed if n_timed else UNTIMED_MEAN_SECONDS
        fixed: list[tuple[_Entry, float, int, int]] = []
        adaptive: list[tuple[_Entry, float, int, int]] = []
        for e in working:
            want = min(e.ceiling, e.running + e.waiting)
            mean = untimed if e.mean is None else max(MIN_MEAN_SECONDS, e.mean)
            work = e.waiting * mean
            lo = max(0, min(e.minimum, want, int(work / SLICE_SECONDS)) - e.share)
            item = (e, work, lo, want - e.share)
            (adaptive if e.fixed is None else fixed).append(item)
        if fixed:  # fixed states first: adaptive ones share what they leave
            pool = _apportion(pool, fixed)
        if adaptive:
            _apportion(pool, adaptive)


def _since(e: _Entry) -> float:
    assert e.starved_since is not None
    return e.starved_since
