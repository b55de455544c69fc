"""Rate limits deliver what they promise (issue 15, items 5 and 11).

Real processors, states and limiters; every exec stamps its start time
(``time.monotonic``, system-wide on Linux, so worker processes stamp on the same clock)
into a file, and the delivered rate is ``(n - 1) / (last start - first start)``.

At 9baee05 ``rate_limit=10000`` delivered 1,695-5,445/s (a grid of timers that
restarted whenever asyncio's ~1 ms sleeps ran more than one interval late) and an
`AIMDRateLimiter` held at a fixed rate delivered 93% of 500/s and 9% of 10,000/s (a
bucket capped at one token loses the time every wake-up is late). The target is 97%;
these tests assert 90% (80% end to end at 10,000/s, see `SHARE_10K`), as the machines
that run them are small and noisy, and print what they measured (``pytest -s``). No
one-second window of the gate's grants may ever hold more than ``limit + burst``.
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiolimiter import AsyncLimiter

from jorbmp import AIMDRateLimiter, Processor, Run, State
from jorbmp.bench.ratelimits import Cell, delivered, max_in_window, measure
from jorbmp.ratelimit import make_gate

DONE = State("done", terminal=True)
SHARE = 0.90  # of the limit, at least
# End to end at 10,000/s the state itself is near its ceiling on a loaded two-core
# machine (a thread state at concurrency 1 makes 8,000-14,000 round trips a second
# there, unlimited): the gate alone is held to `SHARE` by the direct tests below. At
# 9baee05 these cases delivered 9-68%.
SHARE_10K = 0.80


class J(msgspec.Struct):
    n: int


class OC(msgspec.Struct):
    log: str
    stall_every: int = 0  # block the event loop for `stall_seconds` every this many jobs
    stall_seconds: float = 0.0


def _stamp(oc: OC) -> None:
    fd = os.open(oc.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{time.monotonic():.7f}\n".encode())
    finally:
        os.close(fd)


def stamp(ac: Any, oc: OC, jc: J) -> tuple[J, str]:
    _stamp(oc)
    return jc, "done"


async def astamp(ac: Any, oc: OC, jc: J) -> tuple[J, str]:
    _stamp(oc)
    if oc.stall_every and jc.n % oc.stall_every == 0:
        time.sleep(oc.stall_seconds)  # a blocked loop: every timer fires late
    return jc, "done"


EXECS = {"async": astamp, "thread": stamp, "process": stamp}


def starts(
    tmp_path: Path,
    kind: str,
    rate_limit: object,
    n: int,
    *,
    concurrency: int,
    stall_every: int = 0,
    stall_seconds: float = 0.0,
) -> list[float]:
    """Run ``n`` jobs through one rate-limited state; the sorted start times."""
    log = tmp_path / f"starts-{kind}-{time.monotonic_ns()}.log"
    run = Run("r", OC(log=str(log), stall_every=stall_every, stall_seconds=stall_seconds), J)
    for i in range(n):
        run.add_job(J(n=i))
    state = State("new", EXECS[kind], kind=kind, concurrency=concurrency, rate_limit=rate_limit)
    Processor(None, [state, DONE]).exec(run)
    assert run.counts().get("done") == n
    times = sorted(float(line) for line in log.read_text().split())
    assert len(times) == n
    return times


# The gate keeps every second of its grants within limit + burst, with 10 ms to spare
# for the lag between a grant and the start of its exec (strict: the direct tests of
# the gate below). A start measured in the exec lags its grant by a dispatch, a pipe
# or a thread switch, by 20 ms and more on a loaded two-core machine (64 threads share
# one GIL with the loop): this many seconds' worth of starts more are tolerated there.
START_JITTER = 0.02


def check(
    times: list[float],
    limit: float,
    burst: float,
    label: str,
    jitter: float = START_JITTER,
    share: float = SHARE,
) -> None:
    """At least `SHARE` of ``limit`` delivered, and at most ``limit + burst`` starts in
    any second, plus ``jitter`` seconds' worth."""
    got = delivered(times)
    worst = max_in_window(times)
    allowed = limit + burst + int(jitter * limit)
    print(
        f"\n{label}: delivered {got:,.0f}/s = {got / limit:.1%} of {limit:g}/s; "
        f"max {worst} starts in any 1 s (allowed {allowed:g})"
    )
    assert worst <= allowed, f"{label}: {worst} starts in one second"
    assert got >= share * limit, f"{label}: delivered {got:.0f}/s of {limit:g}/s"


# --- a number: executions per second, burst 1 -------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["async", "thread"])
@pytest.mark.parametrize(("rate", "concurrency"), [(100, 1), (1000, 1), (1000, 64), (10_000, 64)])
def test_numeric_rate_is_delivered(tmp_path: Path, kind: str, rate: int, concurrency: int) -> None:
    n = int(rate * 1.5) + 1  # 1.5 s of starts
    times = starts(tmp_path, kind, rate, n, concurrency=concurrency)
    share = SHARE_10K if rate >= 10_000 else SHARE
    check(times, rate, 1, f"{kind} rate_limit={rate} concurrency={concurrency}", share=share)


@pytest.mark.timeout(60)
def test_numeric_rate_is_delivered_to_process_states(tmp_path: Path) -> None:
    times = starts(tmp_path, "process", 1000, 1501, concurrency=8)
    check(times, 1000, 1, "process rate_limit=1000 concurrency=8")


@pytest.mark.timeout(60)
def test_late_timers_catch_up_without_exceeding_the_window(tmp_path: Path) -> None:
    """The exec blocks the loop for 30 ms every 500 jobs, so the gate's timers fire
    far too late: the tokens owed are handed out at once, yet no second holds more
    than limit + 1 starts (and the stall's time is made up, not lost)."""
    rate = 5000
    times = starts(
        tmp_path, "async", rate, 3 * rate + 1, concurrency=64, stall_every=500, stall_seconds=0.03
    )
    check(times, rate, 1, f"async rate_limit={rate}, loop stalls of 30 ms")


@pytest.mark.timeout(60)
def test_low_rates_are_delivered_in_every_kind_and_concurrency(tmp_path: Path) -> None:
    """2/s for async, thread and process states at concurrency 1 and 64, all in one run
    (a state per cell), counted from each cell's first start."""
    cells = [Cell(kind, c, 2) for kind in ("async", "thread", "process") for c in (1, 64)]
    for cell, times in measure(cells, 2.0, tmp_path).items():
        assert len(times) == 5
        check(times, 2, 1, f"{cell.kind} rate_limit=2 concurrency={cell.concurrency}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_state_at_concurrency_1_is_handed_every_token_at_once(tmp_path: Path, kind: str) -> None:
    """At concurrency 1 a state's slot frees 5,000 times a second: each time the gate
    hands out a job at once, without a task and a loop iteration of its own per job.
    At 9baee05: 27% (thread) and 32% (process) of 5,000/s; 99% now, but one round trip
    per job is what a loaded machine slows down first (73% seen at a load of 4 on two
    cores), so this holds it to 60%."""
    (times,) = measure([Cell(kind, 1, 5000)], 1.5, tmp_path).values()
    check(times, 5000, 1, f"{kind} rate_limit=5000 concurrency=1", share=0.6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("concurrency", [1, 64])
def test_10000_per_second_is_delivered_to_process_states(tmp_path: Path, concurrency: int) -> None:
    """Tokens a wake-up owes go out together, several jobs to one message when they run
    in under a millisecond. At 9baee05: 64% (concurrency 1) and 49% (64) of 10,000/s."""
    (times,) = measure([Cell("process", concurrency, 10_000)], 1.5, tmp_path).values()
    check(
        times,
        10_000,
        1,
        f"process rate_limit=10000 concurrency={concurrency}",
        share=SHARE_10K,
    )


# --- AIMDRateLimiter held at a fixed rate ----------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("rate", "burst"), [(1000, 1), (10_000, 1), (10_000, 10)])
def test_aimd_at_a_fixed_rate_is_delivered(tmp_path: Path, rate: int, burst: int) -> None:
    limiter = AIMDRateLimiter(rate, rate, rate, burst=burst)
    times = starts(tmp_path, "async", limiter, int(rate * 1.5) + 1, concurrency=64)
    # A burst of 10 covers a late timer's millisecond by itself at 9baee05 (~80% of
    # 10,000/s there): held to `SHARE`, as the old code misses it.
    share = SHARE_10K if rate >= 10_000 and burst == 1 else SHARE
    check(
        times, rate, burst, f"AIMDRateLimiter({rate}, {rate}, {rate}, burst={burst})", share=share
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("limiter", ["number", "aimd"])
def test_gate_grants_catch_up_and_never_exceed_a_second(limiter: str) -> None:
    """The gate itself, stamped as it grants: 10,000/s for 1.5 s, while another task
    blocks the loop for 30 ms every 100 ms. Every token a late wake-up is owed is
    handed out, and no second ever holds more than 10,001 grants."""
    rate = 10_000
    gate = make_gate("s", rate if limiter == "number" else AIMDRateLimiter(rate, rate, rate))
    assert gate is not None

    async def stall() -> None:
        while True:
            await asyncio.sleep(0.1)
            time.sleep(0.03)  # blocks the loop: the gate's timer fires 30 ms late

    async def take(n: int) -> list[float]:
        staller = asyncio.create_task(stall())
        times = []
        for _ in range(n):
            await gate.acquire()
            times.append(time.monotonic())
        staller.cancel()
        return times

    times = asyncio.run(take(15_001))
    check(times, rate, 1, f"gate {limiter} {rate}/s, stamped at the grant", jitter=0)


@pytest.mark.timeout(30)
def test_aimd_acquire_hands_out_every_token_a_late_wakeup_is_owed() -> None:
    """Directly: 2,000 acquires at 4,000/s take ~0.5 s, although each of asyncio's
    sleeps lasts about a millisecond (four tokens' worth)."""
    limiter = AIMDRateLimiter(4000, 4000, 4000)

    async def take(n: int) -> float:
        start = time.monotonic()
        for _ in range(n):
            await limiter.acquire()
        return time.monotonic() - start

    elapsed = asyncio.run(take(2001))
    print(f"\n2,000 tokens at 4,000/s took {elapsed:.3f} s (ideal 0.5 s)")
    assert 0.45 <= elapsed < 0.5 / SHARE


# --- aiolimiter.AsyncLimiter -------------------------------------------------------


@pytest.mark.timeout(30)
def test_async_limiter_reused_across_execs_does_not_warn(tmp_path: Path) -> None:
    """Each exec runs its own event loop; the gate rebinds the limiter to it, instead
    of aiolimiter warning that it is "re-used across loops" (undefined behaviour)."""
    limiter = AsyncLimiter(20, 1)  # bursts of 20, then 20 per second
    proc = Processor(None, [State("new", astamp, concurrency=4, rate_limit=limiter), DONE])
    for attempt in range(3):
        log = tmp_path / f"reuse-{attempt}.log"
        run = Run(f"r{attempt}", OC(log=str(log)), J)
        for i in range(30):
            run.add_job(J(n=i))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            proc.exec(run)
        assert run.counts().get("done") == 30
        times = sorted(float(line) for line in log.read_text().split())
        # Still limited: 30 starts past a full bucket of 20 need about half a second
        # (the first exec; later ones start with what the bucket leaked meanwhile).
        if attempt == 0:
            assert times[-1] - times[0] >= 0.4
