"""A coordinator the chaos test starts, kills with SIGKILL and restarts.

Usage: python chaos_coordinator.py CHECKPOINT FORMAT JOBS
"""

from __future__ import annotations

import sys
import time
from typing import Any

import msgspec

import jorbmp

KICK_EVERY = 3  # job n kicks one child when n % KICK_EVERY == 0


class JC(msgspec.Struct):
    n: int
    a_done: int = 0  # times state "a" applied its work (must end at 1 for parents)
    b_done: int = 0
    kid: bool = False


def step_a(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.002)
    jc.a_done += 1
    kicks = [jorbmp.KickRequest(JC(n=jc.n, kid=True), "b")] if jc.n % KICK_EVERY == 0 else None
    return jc, "b", kicks


def step_b(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.002)
    jc.b_done += 1
    return jc, "done"


def serializer(path: str, fmt: str) -> jorbmp.Serializer:
    cls = getattr(jorbmp, {"json": "JsonSerializer", "journal": "JournalSerializer",
                           "sqlite": "SqliteSerializer"}[fmt])  # fmt: skip
    kwargs = {"interval": 0.05}
    return cls(path, overall_type=None, job_type=JC, **kwargs)  # type: ignore[no-any-return]


def main() -> None:
    path, fmt, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ser = serializer(path, fmt)
    try:
        run = ser.deserialize()
    except FileNotFoundError:
        run = jorbmp.Run("chaos", None, JC)
        for n in range(jobs):
            run.add_job(JC(n=n), state="a")
    states = [
        jorbmp.State("a", step_a, concurrency=2),
        jorbmp.State("b", step_b, concurrency=2),
        jorbmp.State("done", terminal=True),
    ]
    print("started", flush=True)
    jorbmp.Processor(None, states, ser).exec(run)
    print("complete", flush=True)


if __name__ == "__main__":
    main()
