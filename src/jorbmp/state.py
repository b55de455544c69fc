"""`State`, a named step jobs go through, and `KickRequest`, a new job an exec asks for."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from .run import FAILED

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
    concurrency: int = 1
    rate_limit: Any = None
    kind: Kind = "auto"
    max_retries: int | None = 3
    error_state: str = FAILED
    timeout: float | None = None
    #: Where a process state's execs run instead of a local worker pool, e.g.
    #: ``jorbmp.dask.DaskBackend(...)``; None: the processor's default (local processes).
    backend: Any = None

    def resolved_kind(self) -> Literal["process", "async", "thread"]:
        """The kind this state runs as: ``"auto"`` picks async for coroutine functions."""
        if self.kind != "auto":
            return self.kind
        return "async" if is_coroutine_function(self.exec) else "process"

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
