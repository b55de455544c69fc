"""Running one exec call and turning whatever happens into an `Outcome`.

Shared by worker processes, the inline runner, threads and async tasks, so every
kind of state interprets return values, errors and exceptions the same way.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ._protocol import FAILED_ATTEMPT, NIL, OK, RATE_LIMITED, Outcome
from .errors import RateLimitError
from .state import KickRequest

RETURN_SHAPE = "(jc, next_state), (jc, next_state, kicks) or (jc, next_state, kicks, error)"


class ContextCodec:
    """Encodes the contexts an exec returns, after checking they are of the run's job type.

    The coordinator decodes every context against the job type anyway; the
    ``isinstance`` check here also catches an object of another class whose fields
    happen to decode (a different Struct with all-default fields, say).
    """

    __slots__ = ("encode", "job_type")

    def __init__(self, job_type: Any) -> None:
        self.encode: Callable[[Any], bytes] = msgspec.msgpack.Encoder().encode
        self.job_type: type | None = job_type if isinstance(job_type, type) else None

    def check(self, state: str, value: Any, what: str) -> None:
        """Raise TypeError (naming ``state``) unless ``value`` is of the job type."""
        job_type = self.job_type
        if job_type is not None and not isinstance(value, job_type):
            raise TypeError(
                f"exec of state {state!r} {what} that is not a valid {job_type.__name__}: "
                f"got {type(value).__name__}"
            )

    def dump(self, state: str, value: Any, what: str) -> msgspec.Raw:
        self.check(state, value, what)
        return msgspec.Raw(self.encode(value))


def describe(exc: BaseException) -> str:
    """The text recorded for an exception: ``"TypeName: message"``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _elapsed(started: float) -> float:
    """Seconds since ``started`` (a perf_counter value; 0.0 means unknown)."""
    return time.perf_counter() - started if started else 0.0


def _failed(error: str, started: float, trace: str | None = None) -> Outcome:
    return Outcome(FAILED_ATTEMPT, error=error, seconds=_elapsed(started), trace=trace)


def from_exception(state: str, exc: BaseException, started: float) -> Outcome:
    """The outcome of an exec that raised ``exc``."""
    if isinstance(exc, RateLimitError):
        return Outcome(
            RATE_LIMITED,
            error=describe(exc),
            retry_after=exc.retry_after,
            seconds=_elapsed(started),
        )
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _failed(describe(exc), started, trace)


def interpret(state: str, ret: Any, codec: ContextCodec, started: float) -> Outcome:
    """Check an exec's return value against the contract and encode it."""
    seconds = time.perf_counter() - started
    # The common case, `(jc, next_state)` with a jc of exactly the job type, costs half
    # of the general checks below, and this runs once per job in every worker.
    if type(ret) is tuple and len(ret) == 2:
        jc, next_state = ret
        if type(jc) is codec.job_type and type(next_state) is str:
            try:
                return Outcome(OK, msgspec.Raw(codec.encode(jc)), next_state, seconds=seconds)
            except Exception:
                pass  # the general path below encodes it again and reports why
    if not isinstance(ret, (tuple, list)) or not 2 <= len(ret) <= 4:
        got = f"a {len(ret)}-tuple" if isinstance(ret, (tuple, list)) else type(ret).__name__
        return _failed(f"exec of state {state!r} returned {got}; expected {RETURN_SHAPE}", started)
    jc, next_state = ret[0], ret[1]
    kicks = ret[2] if len(ret) > 2 else None
    error = ret[3] if len(ret) > 3 else None
    if not isinstance(next_state, str):
        return _failed(
            f"exec of state {state!r} returned next_state of type {type(next_state).__name__}; "
            "expected str",
            started,
        )
    if error is not None and not isinstance(error, (str, BaseException)):
        return _failed(
            f"exec of state {state!r} returned an error of type {type(error).__name__}; "
            "expected str, Exception or None",
            started,
        )
    try:
        context = codec.dump(state, jc, "returned a context")
        kick_states: list[str] | None = None
        kick_contexts = NIL
        if kicks:
            kick_states = []
            contexts = []
            for kick in kicks:
                if not isinstance(kick, KickRequest) or not isinstance(kick.state, str):
                    return _failed(
                        f"exec of state {state!r} returned a kick of type "
                        f"{type(kick).__name__}; expected KickRequest(context, state)",
                        started,
                    )
                codec.check(state, kick.context, "kicked a job with a context")
                kick_states.append(kick.state)
                contexts.append(kick.context)
            kick_contexts = msgspec.Raw(codec.encode(contexts))
    except TypeError as exc:
        return _failed(str(exc), started)
    except (ValueError, msgspec.EncodeError) as exc:
        return _failed(
            f"exec of state {state!r} returned a context that cannot be encoded: {exc}", started
        )
    code = OK
    retry_after = None
    text = None
    if isinstance(error, RateLimitError):
        code, retry_after = RATE_LIMITED, error.retry_after
    if isinstance(error, BaseException):
        text = describe(error)
    elif error:
        text = error
    return Outcome(
        code, context, next_state, kick_states, text, retry_after, seconds, None, kick_contexts
    )


def execute(
    state: str, fn: Callable[..., Any], ac: Any, oc: Any, jc: Any, codec: ContextCodec
) -> Outcome:
    """Call a blocking exec and interpret the result."""
    started = time.perf_counter()
    try:
        ret = fn(ac, oc, jc)
    except (Exception, SystemExit) as exc:  # sys.exit() in an exec is a failed attempt too
        return from_exception(state, exc, started)
    return interpret(state, ret, codec, started)


async def execute_async(
    state: str,
    fn: Callable[..., Awaitable[Any]],
    ac: Any,
    oc: Any,
    jc: Any,
    codec: ContextCodec,
    timeout: float | None,
) -> Outcome:
    """Await an async exec (abandoned after ``timeout`` seconds) and interpret the result."""
    started = time.perf_counter()
    try:
        if timeout is None:
            ret = await fn(ac, oc, jc)
        else:
            ret = await asyncio.wait_for(fn(ac, oc, jc), timeout)
    except asyncio.TimeoutError:
        return _failed(f"timed out after {timeout:g}s", started)
    except (Exception, SystemExit) as exc:  # sys.exit() in an exec is a failed attempt too
        return from_exception(state, exc, started)
    return interpret(state, ret, codec, started)
