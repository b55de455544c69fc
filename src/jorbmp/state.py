"""`State`, a named step jobs go through, and `KickRequest`, a new job an exec asks for."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from .adaptive import AdaptiveConcurrency
from .backoff import Backoff
from .run import FAILED

# The default retry delay (a frozen dataclass: one instance serves every state).
DEFAULT_RETRY_DELAY = Backoff()

__all__ = ["KickRequest", "State"]

JC = TypeVar("JC")

Kind = Literal["auto", "process", "async", "thread"]
KINDS = ("auto", "process", "async", "thread")


class KickRequest(msgspec.Struct, Generic[JC]):
    """Ask for a new job with ``context`` in ``state``; its id will be ``f"{parent}->{n}"``."""

    context: JC
    state: str


@dataclass(eq=False)
class State:
    """A named step. Jobs whose state is ``trigger_state`` are handed to ``exec``.

    ``exec(ac, oc, jc)`` (or ``async def``) returns ``(jc, next_state)``,
    ``(jc, next_state, kicks)`` or ``(jc, next_state, kicks, error)``. A terminal state
    has no work to do; a run is complete when every job is in a terminal state.
    """

    trigger_state: str
    exec: Callable[..., Any] | None = None
    _: KW_ONLY
    terminal: bool = False
    #: Execs at once: an int, or `jorbmp.AdaptiveConcurrency(min, max)` for a limit
    #: chosen at run time for throughput.
    concurrency: int | AdaptiveConcurrency = 1
    rate_limit: Any = None
    kind: Kind = "auto"
    max_retries: int | None = 3
    error_state: str = FAILED
    timeout: float | None = None
    #: Seconds between a failed attempt and the next: a number, or a function of the
    #: attempt number (1 for the first retry). The job waits off the queue, holding
    #: no worker; the time is kept on the job (`Job.not_before`), so it survives a
    #: stop and a resume. Default: exponential backoff with jitter (`Backoff`).
    retry_delay: float | Callable[[int], float] = DEFAULT_RETRY_DELAY
    #: Where a process state's execs run instead of a local worker pool, e.g.
    #: ``jorbmp.dask.DaskBackend(...)``; None: the processor's default (local processes).
    backend: Any = None
    #: Process states: a worker that has run this many jobs is replaced by a fresh one
    #: after its current batch (for libraries that leak); None: never.
    max_jobs_per_worker: int | None = None
    #: Process states: a worker whose RSS exceeds this many bytes once a batch's results
    #: are all back is replaced after it; None: never.
    max_worker_memory: float | None = None

    def resolved_kind(self) -> Literal["process", "async", "thread"]:
        """The kind this state runs as: ``"auto"`` picks async for coroutine functions."""
        if self.kind != "auto":
            return self.kind
        return "async" if is_coroutine_function(self.exec) else "process"

    def retry_seconds(self, attempt: int) -> float:
        """The delay before retry number ``attempt``; ``ValueError`` naming the state when
        ``retry_delay`` gives anything but a finite number of seconds >= 0."""
        delay = self.retry_delay
        try:
            seconds = delay(attempt) if callable(delay) else delay
        except Exception as exc:
            raise ValueError(
                f"state {self.trigger_state!r}: retry_delay({attempt}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not seconds >= 0
            or seconds == float("inf")
        ):
            raise ValueError(
                f"state {self.trigger_state!r}: retry_delay gave {seconds!r} for attempt "
                f"{attempt}; expected a finite number of seconds >= 0"
            )
        return float(seconds)

    @property
    def name(self) -> str:
        return self.trigger_state


def is_coroutine_function(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with an async ``__call__``."""
    if fn is None:
        return False
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound method itself
    return call is not None and inspect.iscoroutinefunction(call)
