"""Running exec calls and turning whatever happens into outcomes.

Shared by worker processes, the inline runner, threads, Dask workers and async
tasks, so every kind of state interprets return values, errors and exceptions the
same way: `run_batch` for blocking execs, `execute_async` for coroutines.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import msgspec

from ._protocol import (
    EXECUTING,
    FAILED_ATTEMPT,
    NIL,
    OK,
    RATE_LIMITED,
    SENDING,
    SLOT_INDEX,
    SLOT_PHASE,
    SLOT_STARTED,
    Outcome,
    Results,
)
from .errors import RateLimitError
from .state import KickRequest

RETURN_SHAPE = "(jc, next_state), (jc, next_state, kicks) or (jc, next_state, kicks, error)"


class BrokenContract(Exception):
    """An exec's return value breaks the exec contract; the message says how."""


class ContextCodec:
    """Encodes the contexts an exec returns, after checking they are of the run's job type.

    The coordinator decodes every context against the job type anyway; the
    ``isinstance`` check here also catches an object of another class whose fields
    happen to decode (a different Struct with all-default fields, say).
    """

    __slots__ = ("encode", "job_type")

    def __init__(self, job_type: Any) -> None:
        self.encode: Callable[[Any], bytes] = msgspec.msgpack.Encoder().encode
        # (`typing.Any` is an instance of `type` on Python 3.11: an untyped run.)
        self.job_type: type | None = (
            job_type if isinstance(job_type, type) and job_type is not Any else None
        )

    def check(self, state: str, value: Any, what: str) -> None:
        """Raise `BrokenContract` (naming ``state``) unless ``value`` is of the job type."""
        job_type = self.job_type
        if job_type is not None and not isinstance(value, job_type):
            raise BrokenContract(
                f"exec of state {state!r} {what} that is not a valid {job_type.__name__}: "
                f"got {type(value).__name__}"
            )

    def dump(self, state: str, value: Any, what: str) -> msgspec.Raw:
        """``value`` (a context, or a list of them) encoded, or `BrokenContract`."""
        try:
            return msgspec.Raw(self.encode(value))
        except (TypeError, ValueError, OverflowError, MemoryError, msgspec.EncodeError) as exc:
            raise BrokenContract(
                f"exec of state {state!r} {what} that cannot be encoded: {exc}"
            ) from None


def bad_context(type_name: str, exc: Exception) -> str:
    """The error of a job whose context does not decode as the job type: it fails
    without running (the same text wherever the exec would have run)."""
    return f"job context is not a valid {type_name}: {exc}"


def printable(text: str) -> str:
    """``text`` as it can be recorded: lone surrogates (a file name from ``os.listdir``
    that is not UTF-8, say) escaped, since no checkpoint format can store them."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def describe(exc: BaseException) -> str:
    """The text recorded for an exception: ``"TypeName: message"``."""
    try:
        text = printable(str(exc))
    except Exception as inner:  # its __str__ raises: the worker must not die of it
        text = f"(its str() raised {type(inner).__name__})"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _failed(error: str, seconds: float, trace: str | None = None) -> Outcome:
    return Outcome(FAILED_ATTEMPT, error=error, seconds=seconds, trace=trace)


# How much of a raised exception's traceback is kept (on its job, `Job.traceback`, in
# the checkpoint, and in the DEBUG log): the last TRACE_FRAMES frames of each exception
# of the chain (those nearest the raise), then at most the last TRACE_CHARS characters
# (the exception's own line is at the end). Every job whose last attempt raised holds
# one, in memory and on disk: a deep recursion must not make that megabytes.
TRACE_FRAMES = 20
TRACE_CHARS = 8192


def format_trace(exc: BaseException) -> str:
    """The traceback of ``exc``, raised by an exec, as text bounded as said above."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the first frame is jorbmp's own call of the exec
    text = printable("".join(traceback.format_exception(type(exc), exc, tb, limit=-TRACE_FRAMES)))
    if len(text) > TRACE_CHARS:
        start = len(text) - TRACE_CHARS
        line = text.find("\n", start) + 1  # a whole line first, if there is one
        start = line if 0 < line < len(text) else start
        text = f"[{start} characters cut]\n{text[start:]}"
    return text


def from_exception(state: str, exc: BaseException, seconds: float) -> Outcome:
    """The outcome of an exec that raised ``exc`` after ``seconds``."""
    if isinstance(exc, RateLimitError):
        return Outcome(
            RATE_LIMITED, error=describe(exc), retry_after=exc.retry_after, seconds=seconds
        )
    return _failed(describe(exc), seconds, format_trace(exc))


def interpret(state: str, ret: Any, codec: ContextCodec, seconds: float) -> Outcome:
    """Check an exec's return value against the contract and encode it."""
    if not isinstance(ret, (tuple, list)) or not 2 <= len(ret) <= 4:
        got = f"a {len(ret)}-tuple" if isinstance(ret, (tuple, list)) else type(ret).__name__
        return _failed(f"exec of state {state!r} returned {got}; expected {RETURN_SHAPE}", seconds)
    jc, next_state = ret[0], ret[1]
    kicks = ret[2] if len(ret) > 2 else None
    error = ret[3] if len(ret) > 3 else None
    if not isinstance(next_state, str):
        return _failed(
            f"exec of state {state!r} returned next_state of type {type(next_state).__name__}; "
            "expected str",
            seconds,
        )
    if error is not None and not isinstance(error, (str, BaseException)):
        return _failed(
            f"exec of state {state!r} returned an error of type {type(error).__name__}; "
            "expected str, Exception or None",
            seconds,
        )
    if kicks is not None and not isinstance(kicks, (list, tuple)):
        return _failed(
            f"exec of state {state!r} returned kicks of type {type(kicks).__name__}; "
            "expected a list of KickRequest(context, state) or None",
            seconds,
        )
    try:
        codec.check(state, jc, "returned a context")
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
                        seconds,
                    )
                codec.check(state, kick.context, "kicked a job with a context")
                kick_states.append(kick.state)
                contexts.append(kick.context)
            kick_contexts = codec.dump(state, contexts, "kicked a job with a context")
    except BrokenContract as exc:
        return _failed(str(exc), seconds)
    code = OK
    retry_after = None
    text = None
    if isinstance(error, RateLimitError):
        code, retry_after = RATE_LIMITED, error.retry_after
    if isinstance(error, BaseException):
        text = describe(error)
    elif error:
        text = printable(error)
    return Outcome(
        code, context, next_state, kick_states, text, retry_after, seconds, None, kick_contexts
    )


def run_batch(
    state: str,
    fn: Callable[..., Any],
    ac: Any,
    oc: Any,
    jcs: Sequence[Any],
    codec: ContextCodec,
    slot: Any = None,
    timed: bool = False,
    first: int = 0,
    chunk_seconds: float = math.inf,
    chunk_jobs: int | None = None,
    bad: Mapping[int, str] | None = None,
) -> Results:
    """Call a blocking exec on each context from ``jcs[first]`` on, and collect the
    outcomes: of all of them, or (in a worker) of those that fit in one chunk of
    results, ``chunk_seconds`` of exec time or ``chunk_jobs`` jobs. The caller learns
    how many ran from the length of what it gets.

    ``slot`` (a worker's shared slot, see `jorbmp._protocol`) holds the index of the
    running exec and a start time (the chunk's, or with ``timed`` each exec's), then
    the phase `SENDING` once the chunk is done. ``bad`` maps the index of a context
    that could not be decoded to why: that job fails without running.
    """
    job_type = codec.job_type
    plain: list[int] = []
    seconds: list[float] = []
    next_states: dict[str, int] = {}
    contexts: list[Any] = []
    others: list[Outcome] = []
    kickers: list[int] = []  # the plain jobs that kicked, by index in the chunk
    kick_counts: list[int] = []  # how many each of them kicked
    kick_states: list[int] = []
    kick_contexts: list[Any] = []
    clock = time.perf_counter
    stop = len(jcs) if chunk_jobs is None else min(len(jcs), first + chunk_jobs)
    if slot is not None:
        # The phase before the index: a death in between shows the index of a job
        # already reported (nobody to blame), never a next job "sending" results.
        slot[SLOT_STARTED] = time.monotonic()
        slot[SLOT_PHASE] = EXECUTING
        slot[SLOT_INDEX] = first  # a death from here on is the first job's
    # One clock reading per exec: each ends where the one before ended, so an exec's
    # time includes the bookkeeping since (well under a microsecond).
    started = chunk_start = clock()
    for i in range(first, stop):
        jc = jcs[i]
        if slot is not None:
            slot[SLOT_INDEX] = i
            if timed:
                slot[SLOT_STARTED] = time.monotonic()
        if bad is not None and i in bad:
            ended = clock()
            outcome = _failed(bad[i], 0.0)
        else:
            try:
                ret = fn(ac, oc, jc)
            except (Exception, SystemExit) as exc:  # sys.exit() in an exec is a failed attempt too
                ended = clock()
                outcome = from_exception(state, exc, ended - started)
            else:
                ended = clock()
                # The common case, `(jc, next_state)` or `(jc, next_state, kicks)` with
                # contexts of exactly the job type, needs no checks beyond these and no
                # `Outcome` (see `Results`).
                kicks = None
                if type(ret) is tuple and len(ret) == 2:
                    context, next_state = ret
                elif type(ret) is tuple and len(ret) == 3 and _plain_kicks(ret[2], job_type):
                    context, next_state, kicks = ret
                else:
                    context = next_state = None  # not plain
                if type(context) is job_type and type(next_state) is str:
                    k = next_states.get(next_state)
                    if k is None:
                        k = next_states[next_state] = len(next_states)
                    if kicks:
                        kickers.append(len(plain))
                        kick_counts.append(len(kicks))
                        for kick in kicks:
                            kick_contexts.append(kick.context)
                            kk = next_states.get(kick.state)
                            if kk is None:
                                kk = next_states[kick.state] = len(next_states)
                            kick_states.append(kk)
                    plain.append(k)
                    seconds.append(ended - started)
                    contexts.append(context)
                    started = ended
                    if ended - chunk_start >= chunk_seconds:
                        break
                    continue
                outcome = interpret(state, ret, codec, ended - started)
        started = ended
        plain.append(-1)
        seconds.append(outcome.seconds)
        others.append(outcome)
        if ended - chunk_start >= chunk_seconds:
            break
    if slot is not None:
        slot[SLOT_STARTED] = 0.0
        slot[SLOT_PHASE] = SENDING
    results = Results(plain, seconds, list(next_states), others=others)
    if kickers:
        results.kick_counts = counts = [0] * len(plain)
        for i, n in zip(kickers, kick_counts, strict=True):
            counts[i] = n
        results.kick_states = kick_states
    if contexts:
        try:
            results.contexts = msgspec.Raw(codec.encode(contexts))
            if kick_contexts:
                results.kick_contexts = msgspec.Raw(codec.encode(kick_contexts))
        except Exception:
            return _whole(state, results, contexts, kick_contexts, codec)
    return results


def _plain_kicks(kicks: Any, job_type: type | None) -> bool:
    """Whether ``kicks`` (an exec's third return value) needs no checks beyond these:
    a list of `KickRequest` with contexts of exactly the job type and str states."""
    if type(kicks) is not list:
        return False
    for kick in kicks:
        if type(kick) is not KickRequest or type(kick.context) is not job_type:
            return False
        if type(kick.state) is not str:
            return False
    return True


def _whole(
    state: str,
    results: Results,
    contexts: list[Any],
    kick_contexts: list[Any],
    codec: ContextCodec,
) -> Results:
    """Some plain context cannot be encoded: ``results`` with every outcome whole, so
    that the general path encodes each context again and reports why for those that
    fail."""
    others = iter(results.others)
    pending = iter(contexts)
    kicks = iter(zip(results.kick_states, kick_contexts, strict=True))
    counts = results.kick_counts or [0] * len(results.plain)
    names = results.next_states
    whole = []
    for i, (k, n) in enumerate(zip(results.plain, counts, strict=True)):
        if k < 0:
            whole.append(next(others))
            continue
        ret: tuple[Any, ...] = (next(pending), names[k])
        if n:
            ret += ([KickRequest(context, names[s]) for s, context in islice(kicks, n)],)
        whole.append(interpret(state, ret, codec, results.seconds[i]))
    return Results.of(whole)


async def execute_async(
    state: str,
    fn: Callable[..., Awaitable[Any]],
    ac: Any,
    oc: Any,
    jc: Any,
    codec: ContextCodec,
) -> Outcome:
    """Await an async exec and interpret the result. Whatever the exec raises, its own
    ``TimeoutError`` included, is its outcome; a ``CancelledError`` propagates, for the
    task's owner to tell its own cancellations from the exec's."""
    started = time.perf_counter()
    try:
        ret = await fn(ac, oc, jc)
    except (Exception, SystemExit) as exc:  # sys.exit() in an exec is a failed attempt too
        return from_exception(state, exc, time.perf_counter() - started)
    return interpret(state, ret, codec, time.perf_counter() - started)
