"""Making worker processes the kernel's first OOM victims, never the coordinator (Linux).

When memory runs out, the kernel's OOM killer kills the process with the highest
badness: its share of memory in thousandths plus its ``oom_score_adj`` (-1000 to
1000). The coordinator, which holds the run, is often the biggest process. A worker
raises its own ``oom_score_adj`` by `WORKER_OOM_SCORE_BONUS` over what it inherited
(the coordinator's) as it starts, so that the kernel kills a worker first: its job is
charged as "worker died" and retried, and the run goes on. What an exec starts
inherits the worker's value.

Raising one's own score needs no privilege; lowering it does, so nothing here ever
lowers one. Where there is no ``/proc/self/oom_score_adj`` (not Linux), or the write
is refused, nothing changes. Worker side: imports nothing of the engine.
"""

from __future__ import annotations

import contextlib

__all__ = ["OOM_SCORE_ADJ_MAX", "WORKER_OOM_SCORE_BONUS", "raise_oom_score"]

OOM_SCORE_ADJ_PATH = "/proc/self/oom_score_adj"
# Added to the inherited value. Badness counts memory in thousandths of the machine's,
# so +500 weighs as half of it: a worker goes first unless the coordinator holds half
# the machine more than it does. Relative, not a fixed value, so that what the
# coordinator was given against other programs (below 0, say) moves its workers too.
WORKER_OOM_SCORE_BONUS = 500
OOM_SCORE_ADJ_MAX = 1000  # the kernel's ceiling


def raise_oom_score(path: str = OOM_SCORE_ADJ_PATH) -> None:
    """Raise this process's ``oom_score_adj`` by `WORKER_OOM_SCORE_BONUS`, at most to
    `OOM_SCORE_ADJ_MAX`; never lower it; do nothing where it cannot be done."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            current = int(f.read())
        wanted = min(OOM_SCORE_ADJ_MAX, current + WORKER_OOM_SCORE_BONUS)
        if wanted > current:
            with open(path, "w") as f:
                f.write(str(wanted))
