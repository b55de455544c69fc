"""The ``aimd`` scenario: an `AIMDRateLimiter` against a real HTTP server that accepts at
most N requests in any sliding second and answers the rest 429 with ``Retry-After``.

The server runs in a subprocess on 127.0.0.1 (``python -m jorbmp.bench.aimd serve``),
so it takes no time from the coordinator's loop, and is closed at the end. It logs
every answer (time, status); the scenario reads the log: goodput is the 200s per
second at steady state as a share of N, and the 429s are counted per 10 s there.
The state is async at concurrency 64 over keep-alive connections (the review's
``a1_aimd.py`` opened one per request, which costs two cores more than the rest of
the run at 500/s); the limiter starts at N/5 within [1, 4N]; its rate is sampled
from the status updates (`StatusCount.rate_limit`).

Target (issue 15, item 6): at least 90% goodput at N=50 and N=500, at most one
rate-limit error per 10 s at steady state.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from .. import (
    AIMDRateLimiter,
    Processor,
    RateLimitError,
    Run,
    State,
    StatusCount,
    StatusListener,
    Stopped,
)
from .suite import Row

__all__ = ["scenario"]

TARGET_GOODPUT = 0.90
TARGET_ERRORS_PER_10S = 1.0
# The allowances measured, and the seconds of each run; steady state starts after
# STEADY_FROM seconds (the first climb and the first cut take about five).
ALLOWANCES = (50, 500)
SECONDS = 32.0
QUICK_SECONDS = 8.0
STEADY_FROM = 12.0
QUICK_STEADY_FROM = 4.0
CONCURRENCY = 64
RETRY_AFTER = "1"


class Call(msgspec.Struct):
    n: int


class Server(msgspec.Struct):
    port: int


class Connections:
    """The app context: idle keep-alive connections to the server, reused by the execs
    (a fresh TCP connection per request would cost the two cores more than the run)."""

    def __init__(self) -> None:
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []


async def call(ac: Connections, oc: Server, jc: Call) -> tuple[Call, str]:
    """One GET; a 429 raises `RateLimitError` with its Retry-After."""
    if ac.idle:
        reader, writer = ac.idle.pop()
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", oc.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        await writer.drain()
        status = (await reader.readline()).split()[1]
        retry_after, length = None, 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "retry-after":
                retry_after = float(value)
            elif name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
    except BaseException:
        writer.close()
        raise
    ac.idle.append((reader, writer))
    if status == b"429":
        raise RateLimitError("HTTP 429", retry_after=retry_after)
    return jc, "done"


def serve(allowance: float, log: str, retry_after: str) -> None:
    """The server: at most ``allowance`` accepted in any sliding second. Prints its port."""
    accepted: collections.deque[float] = collections.deque()
    out = open(log, "w", buffering=1 << 16)  # noqa: SIM115 - open while serving

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                now = time.monotonic()
                while accepted and now - accepted[0] >= 1.0:
                    accepted.popleft()
                if len(accepted) < allowance:
                    accepted.append(now)
                    head, body = "200 OK\r\n", b"ok"
                else:
                    head, body = f"429 Too Many Requests\r\nRetry-After: {retry_after}\r\n", b"no"
                out.write(f"{now:.6f} {head[:3]}\n")
                writer.write(f"HTTP/1.1 {head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the server stops
        finally:
            writer.close()

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await stop.wait()  # SIGTERM: close, and flush the log

    try:
        asyncio.run(main())
    finally:
        out.close()


class _RateSamples(StatusListener):
    """The state's rate limit at every status update: (monotonic time, rate)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    def status_update(self, counts: list[StatusCount]) -> None:
        self.samples.append((time.monotonic(), counts[0].rate_limit))


def measure(allowance: int, seconds: float, steady_from: float, workdir: Path) -> dict[str, Any]:
    """One run against a fresh server; the figures of its steady state."""
    log = workdir / f"server-{allowance}.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "jorbmp.bench.aimd", "serve", str(allowance), str(log), RETRY_AFTER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        limiter = AIMDRateLimiter(allowance / 5, 1, 4 * allowance)
        run = Run("aimd", Server(port=port), Call)
        for i in range(int(4 * allowance * seconds * 1.2)):
            run.add_job(Call(n=i))
        states = [
            State("new", call, concurrency=CONCURRENCY, rate_limit=limiter, max_retries=None),
            State("done", terminal=True),
        ]
        rates = _RateSamples()
        connections = Connections()
        proc = Processor(connections, states, status_listener=rates)
        timer = threading.Timer(seconds, proc.stop)
        timer.start()
        started = time.monotonic()
        try:
            proc.exec(run)
        except Stopped:
            pass  # the timer's stop: the jobs are there to outlast it
        finally:
            timer.cancel()
            # Their loop is closed: nothing can close them politely any more, and the
            # server's end closes them anyway when it stops.
            connections.idle.clear()
    finally:
        server.terminate()
        server.wait()
    answers = [line.split() for line in log.read_text().splitlines()]
    first = float(answers[0][0])
    end = seconds - 1.0  # the last second ends in a stop
    steady = [code for t, code in answers if steady_from <= float(t) - first < end]
    span = end - steady_from
    ok = steady.count("200")
    limited = steady.count("429")
    shown = [rate for t, rate in rates.samples if t - started >= steady_from and rate]
    return {
        "goodput": ok / span / allowance,
        "errors_per_10s": limited / span * 10,
        "requests_per_s": (ok + limited) / span,
        "rate_min_mean_max": [
            round(min(shown, default=0.0), 1),
            round(sum(shown) / len(shown), 1) if shown else 0.0,
            round(max(shown, default=0.0), 1),
        ],
    }


def scenario(quick: bool, rounds: int) -> list[Row]:
    """One row per allowance (one run each, of `SECONDS`)."""
    seconds = QUICK_SECONDS if quick else SECONDS
    steady_from = QUICK_STEADY_FROM if quick else STEADY_FROM
    rows = []
    with tempfile.TemporaryDirectory(prefix="jorbmp-aimd-") as tmp:
        for allowance in ALLOWANCES[:1] if quick else ALLOWANCES:
            got = measure(allowance, seconds, steady_from, Path(tmp))
            rows.append(
                Row(
                    f"AIMDRateLimiter vs a server allowing {allowance} in any 1 s (429 + "
                    f"Retry-After), {seconds:.0f} s, steady from {steady_from:.0f} s",
                    got["goodput"],
                    "of the allowance",
                    "429s per 10 s",
                    got["errors_per_10s"],
                    None,
                    f">= {TARGET_GOODPUT:.0%}, <= {TARGET_ERRORS_PER_10S:g} 429 per 10 s",
                    got["goodput"] >= TARGET_GOODPUT
                    and got["errors_per_10s"] <= TARGET_ERRORS_PER_10S,
                    got,
                )
            )
    return rows


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(float(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else RETRY_AFTER)
elif __name__ == "__main__":
    sys.exit(f"usage: {os.path.basename(sys.executable)} -m jorbmp.bench.aimd serve N LOG [RA]")
