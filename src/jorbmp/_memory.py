"""The memory governor of ``Processor(..., memory_limit=...)``: local worker processes
start execs only while the expected memory of the coordinator and all its workers
together stays under the limit, and one is taken back (killed) when the total crosses
it anyway.

::

    Coordinator.housekeeping (every tick) ──> MemoryGovernor.sample()
        RSS of the coordinator, own memory and peak RSS of every local worker (/proc)
        ├─ re-measures one worker's shared pages now and then (`_remeasure`)
        ├─ learns each state's bytes per running exec: a worker's peak RSS above its
        │  RSS when it first took work (`PoolMemory.per_exec`)
        └─ over the limit: takes one worker back (`_take_back`)
    Slots.free / Slots.take ─────> PoolMemory.admits(), acquire(worker)
        before an idle worker starts an exec: does its state's learned size fit?
    Slots.returned / gone ───────> PoolMemory.release(worker)
    ProcessPool.demand ──────────> PoolMemory.admits(new_worker=True)
        no worker is started for jobs that could not run anyway

**What is measured.** The coordinator's RSS, and each worker's own memory: its RSS less
the pages it shares with the others (``shared``, RSS minus USS). Under fork a fresh
worker shares nearly all of its RSS with the coordinator (at 1M jobs loaded: 394 MB of
RSS, 4 MB its own), so summing RSS would count the coordinator's heap once per worker.
USS costs a walk of the page tables (``/proc/PID/smaps_rollup``: ~9 ms for a 450 MB
worker, against ~20 us for RSS from ``/proc/PID/status``), so it is taken once when a
worker is ready, then again for one worker at a time, round-robin, at most as often as
keeps those walks under `REMEASURE_SHARE` of the coordinator's time: what a worker
copies on write since (a page it shared becomes its own, its RSS unchanged) is caught
at its next turn. A worker not yet measured counts at most `new_worker_bytes`.

**Orphaned pages.** A page the coordinator rewrites after a fork (its collector, or a
reference count) is copied for it, and the workers forked before keep the old one:
shared among them if two or more, so in no one's USS (measured: the coordinator
walked 5M strings, 400 MB, and two workers' USS stayed at 1 MB each). The coordinator
takes a turn in the round-robin too: a worker's shared bytes beyond all the
coordinator shares are pages only workers hold, and the most any worker has of those
is counted once (`orphaned`). It is a lower bound (old pages that only some workers
share are missed), taken only from workers measured no later than the coordinator: one
measured since (forked since, say) would be set against a figure of the coordinator's
that does not show the pages they share yet.

**Expected total.** What the last sample measured, with each busy worker counted at
its own memory when idle plus the larger of what its exec uses now and its state's
learned size (an exec just started has not grown yet), and each exec started since at
its state's size. An exec that ends gives its share back at once: its memory is freed
when the exec returns (the next sample corrects it if not). Nothing here reads /proc
per job: a worker is measured once when it first takes work, then at each tick.

**Unknown states.** Until one of its execs has finished and been sampled, a state runs
one exec at a time; then as many as its size fits, but at most `RAMP` times as many
as have finished (a state of small execs opens up within a few of them): execs that
vary are seen at their larger sizes before many run at once (a state whose first exec
used 30 MB and the next 300 MB crossed a 1 GB limit by 12% when it opened at once; with
the ramp it peaked at 0.65-0.91 of the limit). A state's size is the largest peak seen,
so it only grows: states whose execs vary a lot run as many as the largest fits.

**Progress.** While no governed exec runs anywhere, one may always start, whatever it
is expected to need: it runs alone, and if it crosses the limit alone it is charged.

**Taking back.** Over the limit, the governor kills one worker: among the execs that
grew past their state's learned size (the cause; all running ones if none did), the
youngest whose use alone (own memory above its worker's idle own memory) brings the total back under
the limit, or, when none is that big, the one using the most. The youngest loses the
least work; needing only one kill loses no more. An exec killed while others ran is
put back uncharged (`jorbmp._pool_deaths.kill_blaming_nobody`), and its state's size
is raised to what it had used, so it is not started beside the same company again. An
exec killed while it ran alone is charged ``"exceeded memory limit (N bytes, limit
M)"``, a failed attempt like any other, so it cannot loop forever.

**No starving.** A state of big execs could wait for as long as states of small ones
keep the room filled (each that ends frees too little for it, and its own lane takes it
back at once). One held back with nothing running for `STARVE_SECONDS` is served
first: no other state starts an exec until it has started one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from ._pool_deaths import kill_blaming_nobody, kill_for
from ._pool_worker import Worker
from ._protocol import EXECUTING, SLOT_PHASE, SLOT_STARTED

if TYPE_CHECKING:
    from ._pool import ProcessPool

__all__ = [
    "MIN_EXEC_BYTES",
    "NEW_WORKER_BYTES",
    "RAMP",
    "REMEASURE_SHARE",
    "STARVE_SECONDS",
    "MemoryGovernor",
    "PoolMemory",
]

log = logging.getLogger("jorbmp")

# The least an exec is counted at: a state of execs that use nothing measurable still
# opens up by its room, not without bound (and no division by 0).
MIN_EXEC_BYTES = 1 << 20
# What a worker not yet measured is expected to add (a fresh worker's own memory is
# 4-20 MB, under fork or spawn); once one of the state's workers has been measured, the
# largest own memory measured is used instead.
NEW_WORKER_BYTES = 32 << 20
# The most of the coordinator's time re-measuring workers' shared pages may take: after
# a walk that took t seconds, the next waits t / REMEASURE_SHARE (a 9 ms walk: every
# 0.18 s, 16 workers each every ~3 s). More catches copy-on-write growth sooner, at the
# cost of the coordinator's loop.
REMEASURE_SHARE = 0.05
# Execs of a state that may run at once, per exec of it finished (see "Unknown states"):
# 2 opens up like TCP's slow start, a state of 4 slots in 2 finished execs; 1 would
# take one finished exec per slot.
RAMP = 2
# How long a state held back by memory, with nothing running, waits before the others
# start nothing until it has started (see "No starving"). Shorter drains the others'
# room more often for it (their execs wait while it accumulates); longer lets it wait.
STARVE_SECONDS = 1.0


def _rss_and_peak(pid: int) -> tuple[int, int] | None:
    """RSS and peak RSS (``VmHWM``) of ``pid`` in bytes; None when it is gone. Where
    /proc has no peak (not Linux), the peak is the RSS now, from psutil."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        try:
            rss = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None
        return rss, rss
    # ("VmHWM:\t  12345 kB\n"; found, not split line by line: a third of the cost)
    at, hwm = text.find(b"\nVmRSS:"), text.find(b"\nVmHWM:")
    if at < 0:
        return None  # a zombie: its memory is gone
    rss = int(text[at + 7 : text.index(b"k", at)]) * 1024
    peak = int(text[hwm + 7 : text.index(b"k", hwm)]) * 1024 if hwm >= 0 else rss
    return rss, max(rss, peak)


def _rss_and_own(pid: int) -> tuple[int, int] | None:
    """RSS and own memory (USS: its private pages, clean or dirty, which include those
    it copied on write) of ``pid`` in bytes, from one walk of its page tables; None
    when it is gone. Where there is no ``smaps_rollup``, psutil's (slower) figures, and
    where it has no USS either, the RSS for both."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            return None
        return int(info.rss), int(getattr(info, "uss", info.rss))
    rss = own = -1
    for line in text.splitlines():
        name, _, value = line.partition(b":")
        if name == b"Rss":
            rss = int(value.split()[0]) * 1024
        elif name in (b"Private_Clean", b"Private_Dirty"):
            own += int(value.split()[0]) * 1024
    if rss < 0:
        return None  # a zombie: its memory is gone
    return rss, own + 1


class PoolMemory:
    """One process state's part of the memory limit: `admits` and `acquire` before an
    idle worker starts an exec, `release` when its work is back or it is gone."""

    __slots__ = (
        "bases",
        "charges",
        "finished",
        "firsts",
        "fresh",
        "governor",
        "held",
        "known",
        "name",
        "per_exec",
        "pool",
        "refused_since",
        "shared",
        "shared_at",
        "wake",
    )

    def __init__(self, governor: MemoryGovernor, name: str, wake: Callable[[], None]) -> None:
        self.governor = governor
        self.name = name
        self.wake = wake  # pumps the state's lane
        self.pool: ProcessPool | None = None
        # Bytes per running exec: the largest peak seen above a worker's first RSS.
        self.per_exec = 0
        self.known = False  # an exec has finished and been sampled since
        self.held = False  # `admits` said no while the lane wanted a slot
        self.finished = 0  # execs of this state that ended (returned, or their worker died)
        self.refused_since: float | None = None  # held back since (monotonic), jobs waiting
        # Per worker: RSS when it first took work, the bytes of its RSS it shares with
        # other processes (when last measured), its own memory when last seen idle,
        # and, while it runs work, the bytes counted for that above its idle memory.
        self.firsts: dict[Worker, int] = {}
        self.shared: dict[Worker, int] = {}
        self.shared_at: dict[Worker, float] = {}  # when (monotonic)
        self.bases: dict[Worker, int] = {}
        self.charges: dict[Worker, int] = {}
        self.fresh = 0  # the most own memory a worker had when first measured

    def __repr__(self) -> str:
        size = self.per_exec if self.known else "unknown"
        return f"<PoolMemory {self.name!r} per_exec={size} running={len(self.charges)}>"

    def attach(self, pool: ProcessPool) -> None:
        """The state's pool, whose workers are sampled and taken back."""
        self.pool = pool

    def size(self) -> int:
        """Bytes an exec of this state is expected to add."""
        return max(MIN_EXEC_BYTES, self.per_exec)

    def admits(self, new_worker: bool = False) -> int:
        """How many more execs of this state may start now (on idle workers, or with
        ``new_worker`` on workers yet to be started)."""
        gov = self.governor
        if not gov.running:
            n = 1  # nothing runs: one may always start (see the module docstring)
        elif gov.starving is not None and gov.starving is not self:
            n = 0  # the room that frees up is the starving state's
        elif not self.known:
            n = 0 if self.charges or gov.expected() >= gov.limit else 1
        else:
            cost = self.size() + (self.new_worker_bytes() if new_worker else 0)
            n = max(0, (gov.limit - gov.expected()) // cost)
            n = min(n, RAMP * self.finished - len(self.charges))
        if not n:
            self.held = True
            if self.refused_since is None:
                self.refused_since = time.monotonic()
        return n

    def new_worker_bytes(self) -> int:
        """What a worker yet to be started is expected to add: its own memory."""
        return self.fresh or NEW_WORKER_BYTES

    def measure_first(self, worker: Worker) -> int:
        """Measure ``worker`` (ready, before any job) once: its RSS, shared pages and
        own memory; returns its own memory."""
        seen = _rss_and_own(worker.pid)
        if seen is None:
            return self.new_worker_bytes()  # gone: the next sample lets it go
        rss, own = seen
        self.firsts[worker] = rss
        self.shared[worker] = rss - own
        self.shared_at[worker] = time.monotonic()
        self.bases[worker] = own
        self.fresh = max(self.fresh, own)
        return own

    def _learn_from(self, worker: Worker) -> None:
        """Learn from ``worker``'s peak now that its first work is back, while the state
        is unknown: a worker recycled after each batch (``max_jobs_per_worker=1``) is
        gone before any sample sees it finished, and the state stayed at one exec at a
        time for the whole run. (One read of /proc, only until the state is known.)"""
        first = self.firsts.get(worker)
        seen = _rss_and_peak(worker.pid) if first is not None else None
        if first is not None and seen is not None:
            self.per_exec = max(self.per_exec, seen[1] - first)
            self.known = True

    def own(self, worker: Worker, rss: int) -> int:
        """``worker``'s own memory, from its RSS now: the shared part last measured is
        taken off (a worker not yet measured counts at most what a new one adds)."""
        shared = self.shared.get(worker)
        if shared is None:
            return min(rss, self.new_worker_bytes())
        return max(0, rss - shared)

    def acquire(self, worker: Worker) -> None:
        """``worker`` (idle) starts an exec, which `admits` allowed."""
        gov = self.governor
        if worker not in self.bases:
            # Ready since the last sample (which did not count it): measured once, now
            # that it is idle, before any job.
            gov.fixed += self.measure_first(worker)
        self.refused_since = None
        if gov.starving is self:
            gov.starving = None
        charge = self.size() if self.known else 0
        self.charges[worker] = charge
        gov.charged += charge
        gov.running += 1

    def release(self, worker: Worker) -> None:
        """``worker``'s work is back (or it is gone): its exec's share goes back."""
        charge = self.charges.pop(worker, None)
        if charge is None:
            return
        if not self.known:
            self._learn_from(worker)
        gov = self.governor
        gov.charged -= charge
        gov.running -= 1
        self.finished += 1
        gov.wake_held()


class MemoryGovernor:
    """The run's memory limit over the coordinator and every local worker (see the
    module docstring); `sample` is called each housekeeping tick."""

    __slots__ = (
        "_me",
        "_me_at",
        "_me_shared",
        "_next_remeasure",
        "_turn",
        "charged",
        "fixed",
        "limit",
        "measured",
        "orphaned",
        "pools",
        "running",
        "starving",
        "warned",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pools: list[PoolMemory] = []
        # The expected total is ``fixed + charged``: ``fixed`` the coordinator's RSS and
        # each worker's idle RSS, ``charged`` what running execs are counted at above it.
        self.fixed = 0
        self.charged = 0
        self.running = 0  # execs running on governed workers
        self.measured = 0  # the total the last sample measured
        self.warned = False
        self.starving: PoolMemory | None = None  # served first (see "No starving")
        self._me = psutil.Process(os.getpid())
        self.fixed = int(self._me.memory_info().rss)
        # Round-robin re-measuring of workers' shared pages: a turn counter, and not
        # before this (monotonic) time.
        self._turn = 0
        self._next_remeasure = 0.0
        # The coordinator's shared bytes when it last had its turn (None: not yet), and
        # when; what the workers hold that it no longer has, at the last sample.
        self._me_shared: int | None = None
        self._me_at = 0.0
        self.orphaned = 0

    def __repr__(self) -> str:
        return (
            f"<MemoryGovernor limit={self.limit} expected={self.expected()} "
            f"measured={self.measured} running={self.running}>"
        )

    def pool(self, name: str, wake: Callable[[], None]) -> PoolMemory:
        """State ``name``'s part; ``wake`` pumps its lane when memory frees up."""
        part = PoolMemory(self, name, wake)
        self.pools.append(part)
        return part

    def expected(self) -> int:
        return self.fixed + self.charged

    def wake_held(self) -> None:
        """Pump the lanes that memory held back: there may be room now."""
        for part in self.pools:
            if part.held:
                part.held = False
                part.wake()

    def sample(self) -> None:
        """Measure every process, learn, recount the expected total, and take a worker
        back if the measured total is over the limit."""
        measured = fixed = int(self._me.memory_info().rss)
        busy: list[_Busy] = []
        self._remeasure()
        for part in self.pools:
            pool = part.pool
            if pool is None:
                continue
            learned = part.size() if part.known else 0  # (before this sample teaches it)
            for worker in [w for w in part.firsts if w not in pool.workers]:
                for d in (part.firsts, part.shared, part.shared_at, part.bases):
                    d.pop(worker, None)
            for worker in pool.workers:
                seen = _rss_and_peak(worker.pid)
                if seen is None:
                    continue
                rss, peak = seen
                first = part.firsts.get(worker)
                if first is not None and (worker.completed or worker in part.charges):
                    # Peak RSS since it started, above its RSS before any job: the
                    # largest exec it ran (or runs) so far.
                    part.per_exec = max(part.per_exec, peak - first)
                    if worker.completed:
                        part.known = True
                if worker.kill_mark is not None:
                    continue  # being killed: its memory is about to go
                if worker not in part.charges:
                    if worker in part.bases:
                        own = part.bases[worker] = part.own(worker, rss)
                    elif worker.ready and not worker.completed:
                        own = part.measure_first(worker)  # before any job
                    else:
                        own = part.own(worker, rss)  # starting
                    measured += own
                    fixed += own
                    continue
                own = part.own(worker, rss)
                measured += own
                base = part.bases.get(worker, own)
                used = max(0, own - base)
                fixed += base
                part.charges[worker] = max(used, part.size() if part.known else 0)
                busy.append((part, worker, used, used - learned))
        # (Workers being killed, or gone and not yet reaped, keep their charges until
        # `release`, which takes back exactly what is counted here.)
        orphaned = self._orphaned()
        if abs(orphaned - self.orphaned) > MIN_EXEC_BYTES:  # (changed: at a turn)
            log.debug(
                "memory: the workers hold %d bytes that the coordinator no longer shares "
                "(it rewrote them since they forked): counted once",
                orphaned,
            )
        self.orphaned = orphaned
        measured += orphaned
        fixed += orphaned
        charged = sum(sum(part.charges.values()) for part in self.pools)
        self.fixed, self.charged, self.measured = fixed, charged, measured
        if measured > self.limit:
            self._take_back(measured, busy)
        self._find_starving()
        self.wake_held()

    def _remeasure(self) -> None:
        """Measure the shared pages of the next worker in turn again, if it is time: a
        page it copied on write since (or that the others let go of) is its own now,
        although its RSS did not change."""
        now = time.monotonic()
        if now < self._next_remeasure:
            return
        measured = [(part, w) for part in self.pools for w in part.shared if w.kill_mark is None]
        if not measured:
            return
        turn = self._turn % (len(measured) + 1)
        self._turn += 1
        if turn == len(measured):  # the coordinator's turn (see `orphaned`)
            seen = _rss_and_own(os.getpid())
            if seen is not None:
                self._me_shared, self._me_at = seen[0] - seen[1], now
        else:
            part, worker = measured[turn]
            seen = _rss_and_own(worker.pid)
            if seen is not None:
                part.shared[worker] = seen[0] - seen[1]
                part.shared_at[worker] = now
        took = time.monotonic() - now
        self._next_remeasure = now + took / REMEASURE_SHARE

    def _orphaned(self) -> int:
        """Bytes the workers share among themselves but no longer with the coordinator,
        counted once (at least; see "Orphaned pages"): the most any worker shares, less
        all the coordinator shares, from workers measured no later than it was."""
        me = self._me_shared
        if me is None:
            return 0
        most = max(
            (
                shared
                for part in self.pools
                for w, shared in part.shared.items()
                if part.shared_at[w] <= self._me_at and w.kill_mark is None
            ),
            default=0,
        )
        return max(0, most - me)

    def _find_starving(self) -> None:
        """The state held back longest, with jobs waiting and nothing running, once
        that is `STARVE_SECONDS`: until it starts an exec, no other state starts one."""
        due = time.monotonic() - STARVE_SECONDS
        starved: list[tuple[float, PoolMemory]] = []
        for part in self.pools:
            since = part.refused_since
            if since is None:
                continue
            if part.pool is None or not part.pool.sink.queued():
                part.refused_since = None  # nothing waits for room any more
            elif since <= due and not part.charges:
                starved.append((since, part))
        self.starving = min(starved, key=lambda s: s[0])[1] if starved else None

    def _take_back(self, measured: int, busy: list[_Busy]) -> None:
        """Kill one busy worker to bring ``measured`` back under the limit: one whose
        exec grew past what its state had shown if there is one (it is the cause: an
        exec that uses what its state's others do is not), and among those the youngest
        that alone brings the total back under (the least work lost, in one kill), or
        failing that the one that uses the most."""
        over = measured - self.limit
        if sum(b[2] for b in busy) < over or not busy:
            if not self.warned:
                self.warned = True
                log.warning(
                    "memory: %d bytes in use, over the limit of %d, but what running execs "
                    "use would not bring it back under (the coordinator, its thread and "
                    "async execs, or idle workers hold it): no worker is taken back",
                    measured,
                    self.limit,
                )
            return
        grown = [b for b in busy if b[3] > 0] or busy
        big = [b for b in grown if b[2] >= over]
        if big:
            part, worker, used, _ = max(big, key=lambda b: _started(b[1]))  # the youngest
        else:
            part, worker, used, _ = max(grown, key=lambda b: b[2])
        part.per_exec = max(part.per_exec, used)
        part.known = True
        alone = self.running == 1 and worker.slot[SLOT_PHASE] == EXECUTING
        log.warning(
            "state %r: %d bytes in use, over the memory limit of %d: taking back worker "
            "pid %d, whose exec uses %d bytes (%s)",
            part.name,
            measured,
            self.limit,
            worker.pid,
            used,
            "alone: charged" if alone else "retried uncharged",
        )
        if alone:
            kill_for(worker, f"exceeded memory limit ({measured} bytes, limit {self.limit})")
        else:
            kill_blaming_nobody(worker)
            worker.kill_reason = "taken back for the memory limit"  # (logs only: no charge)
        assert part.pool is not None
        part.pool.slots.withdraw(worker)


# A busy worker at a sample: its state's part, the worker, the bytes its exec uses (RSS
# above its idle RSS), and how far that is past its state's size before the sample.
_Busy = tuple[PoolMemory, Worker, int, int]


def _started(worker: Worker) -> float:
    """When ``worker``'s running exec (or the chunk of its batch) started."""
    return worker.slot[SLOT_STARTED] or worker.since
