"""The model: jobs moving through named states, and the Run that holds them.

Nothing here knows about processors, workers or checkpoint formats; both the
coordinator and the serializers build on these types.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import msgspec
import msgspec.inspect

__all__ = ["FAILED", "NEW", "Job", "Run"]

NEW = "new"
"""The state `Run.add_job` puts a job in unless told otherwise (jorb's TRIGGER_STATE_NEW)."""

FAILED = "failed"
"""Default `State.error_state`; added as a terminal state when a processor needs it."""

JC = TypeVar("JC")
OC = TypeVar("OC")


# The shared timestamp of the current millisecond (see `utcnow`).
_now_tick = -1
_now = datetime.now(timezone.utc)


def utcnow() -> datetime:
    """The current UTC time to the millisecond, as one object shared by every caller
    within that millisecond: a million jobs added in a loop share a few hundred
    datetimes instead of holding 48 bytes each, and it is cheaper than datetime.now()."""
    global _now_tick, _now
    tick = time.monotonic_ns() >> 20  # ~1.05 ms
    if tick != _now_tick:
        _now_tick, _now = tick, datetime.now(timezone.utc)
    return _now


_NO_ERRORS: Mapping[str, list[str]] = MappingProxyType({})
# Serialises the claim of a run by a processor (check and set in one step).
_claim_lock = threading.Lock()
_encode = msgspec.msgpack.Encoder().encode

ACCEPTED_TYPES = (
    "a msgspec.Struct, a dataclass, an attrs class, a TypedDict, a NamedTuple, or "
    "plain data (dict, list, str, int, float, bool, None, bytes, datetime, ...)"
)


def _decoder_for(what: str, typ: Any) -> msgspec.msgpack.Decoder[Any]:
    """A decoder for ``typ``, or ``TypeError`` saying what a context may be."""
    name = getattr(typ, "__name__", repr(typ))
    try:
        # msgspec takes any other class as a custom type, for hooks we do not have.
        if isinstance(msgspec.inspect.type_info(typ), msgspec.inspect.CustomType):
            raise TypeError(f"msgspec cannot encode or decode {name} without hooks")
        return msgspec.msgpack.Decoder(typ)
    except TypeError as exc:
        raise TypeError(
            f"{what} {name} cannot be checkpointed ({exc}); use {ACCEPTED_TYPES}"
        ) from None


# gc=False: a run can hold millions of jobs; keeping them out of the cyclic garbage
# collector saves 16 bytes each and long GC pauses. A Job never refers back to itself.
class Job(msgspec.Struct, Generic[JC], omit_defaults=True, gc=False):
    """One unit of work: its context (JC), the state it is in, and its history.

    ``state_errors`` maps a state to the error texts recorded there, oldest first.
    ``retries`` counts failed attempts in the current state; ``kicks`` counts every
    job this one ever kicked, so the next kick's id is ``f"{id}->{kicks}"``.
    ``not_before`` (seconds since the epoch, or None) is the earliest time of its next
    attempt: a retry delay or a ``retry_after``, kept on the job so that it survives
    a stop and a resume.
    ``traceback`` is the formatted traceback of the job's last attempt when that
    attempt raised (bounded: see `jorbmp._execute.TRACE_FRAMES`), else None. Each
    finished attempt replaces it: with its traceback if it raised, with None if it
    returned (an error returned, too) or failed without raising (a worker death, a
    timeout, a bad return value); a `RateLimitError`, which is no attempt, leaves it.
    """

    id: str
    context: JC
    state: str = NEW
    # None until the first error: most jobs never have one, and an empty dict per job
    # would be a quarter of a big run's memory. `state_errors` creates it on demand.
    _state_errors: dict[str, list[str]] | None = msgspec.field(default=None, name="state_errors")
    parent: str | None = None
    last_update: datetime = msgspec.field(default_factory=utcnow)
    retries: int = 0
    kicks: int = 0
    not_before: float | None = None
    # (A tenth slot: 96 bytes a job, the allocator's size class the nine filled.)
    traceback: str | None = None

    @property
    def state_errors(self) -> dict[str, list[str]]:
        """Error texts recorded per state, oldest first (a real dict: changes stick)."""
        errors = self._state_errors
        if errors is None:
            errors = self._state_errors = {}
        return errors

    @state_errors.setter
    def state_errors(self, value: dict[str, list[str]]) -> None:
        self._state_errors = value

    def __repr__(self) -> str:
        return (
            f"Job(id={self.id!r}, state={self.state!r}, context={self.context!r}, "
            f"state_errors={dict(self.recorded_errors())!r}, parent={self.parent!r}, "
            f"retries={self.retries}, kicks={self.kicks}, last_update={self.last_update!r})"
        )

    def recorded_errors(self) -> Mapping[str, list[str]]:
        """`state_errors` as a read-only view, without creating a dict for a job with none."""
        return self._state_errors or _NO_ERRORS


class Run(Generic[OC, JC]):
    """A named batch of jobs plus the overall context (OC); checkpointed as a whole.

    A run is re-entrant: load it from its checkpoint and execute it again, and it
    continues where it stopped.
    """

    def __init__(self, name: str, overall: OC = None, job_type: type[JC] | None = None) -> None:  # type: ignore[assignment]
        self.name = name
        try:
            _encode(overall)
        except (TypeError, OverflowError, msgspec.EncodeError) as exc:
            raise TypeError(
                f"run {name!r}: the overall context, of type {type(overall).__name__}, cannot "
                f"be checkpointed ({exc}); use {ACCEPTED_TYPES}"
            ) from None
        self.overall = overall
        self.job_type = job_type
        self._check: msgspec.msgpack.Decoder[Any] | None = None
        if job_type is not None:
            self._check = _decoder_for(f"run {name!r}: job_type", job_type)
        self.jobs: dict[str, Job[JC]] = {}
        self.next_id = 0
        # The summary of the latest execution (a RunReport as plain data), stored in
        # the checkpoint so that `python -m jorbmp status` can show it later.
        self.report: dict[str, Any] | None = None
        # Set by the processor while it executes this run.
        self._executing = False

    def add_job(self, context: JC, state: str = NEW) -> str:
        """Add a job in ``state`` (default `NEW`) and return its id: "0", "1", ..."""
        if self._executing:
            raise RuntimeError(
                f"run {self.name!r}: cannot add jobs while a processor is executing it"
            )
        if self.job_type is None:
            self._check = _decoder_for(f"run {self.name!r}: job context", type(context))
            self.job_type = type(context)
        while (job_id := str(self.next_id)) in self.jobs:
            self.next_id += 1
        self.validate(context, f"job {job_id!r}")
        self.next_id += 1
        self.jobs[job_id] = Job(id=job_id, context=context, state=state)
        return job_id

    def validate(self, context: Any, what: str) -> None:
        """``ValueError`` (naming ``what``) unless ``context`` is a valid ``job_type``, as
        a checkpoint would read it back: a context the run could not be reloaded with
        never gets in."""
        check = self._check
        if check is None:
            if self.job_type is None:
                return
            check = self._check = _decoder_for(f"run {self.name!r}: job_type", self.job_type)
        try:
            check.decode(_encode(context))
        # (OverflowError: an aware datetime whose UTC time falls outside years 1-9999.)
        except (TypeError, OverflowError, msgspec.EncodeError, msgspec.ValidationError) as exc:
            name = getattr(self.job_type, "__name__", "the job type")
            raise ValueError(
                f"run {self.name!r}: {what}: context {context!r} is not a valid {name}: {exc}"
            ) from None

    def _claim(self) -> None:
        """Mark the run as executing; ``RuntimeError`` if a processor already is."""
        with _claim_lock:
            if self._executing:
                raise RuntimeError(f"run {self.name!r} is already being executed")
            self._executing = True

    def redrive(
        self,
        from_state: str | None,
        to_state: str,
        error_contains: str | None = None,
        job_ids: Collection[str] | None = None,
    ) -> list[str]:
        """Move the jobs in ``from_state`` (only those with an error containing
        ``error_contains``, if given; only those in ``job_ids``, if given, where
        ``from_state`` None means any state) to ``to_state``, resetting their retry
        counts and any retry delay they were waiting out.

        The jorb way to patch a run: park failures in a terminal state, fix the code,
        send them back. Returns the ids of the jobs moved, in the run's order.
        ``KeyError`` (naming it) for an id the run does not have: nothing moves.
        """
        if self._executing:
            raise RuntimeError(f"run {self.name!r}: cannot redrive while a processor executes it")
        if from_state is None and job_ids is None:
            raise ValueError(f"run {self.name!r}: redrive needs a state to move from, or job ids")
        wanted = None if job_ids is None else set(job_ids)
        if wanted is not None:
            unknown = next((i for i in job_ids or () if i not in self.jobs), None)
            if unknown is not None:
                raise KeyError(f"run {self.name!r} has no job {unknown!r}; nothing moved")
        moved = []
        now = utcnow()
        for job in self.jobs.values():
            if from_state is not None and job.state != from_state:
                continue
            if wanted is not None and job.id not in wanted:
                continue
            if error_contains is not None and not any(
                error_contains in text for texts in job.recorded_errors().values() for text in texts
            ):
                continue
            job.state = to_state
            job.retries = 0
            job.not_before = None  # a redrive means "try it now"
            job.last_update = now
            moved.append(job.id)
        return moved

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        return dict(Counter(job.state for job in self.jobs.values()))

    def __repr__(self) -> str:
        per_state = ", ".join(f"{s}={n}" for s, n in self.counts().items())
        return f"<Run {self.name!r} jobs={len(self.jobs)} {per_state}>"

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Run):
            return NotImplemented
        return (
            self.name == other.name
            and self.overall == other.overall
            and self.jobs == other.jobs
            and self.next_id == other.next_id
        )

    __hash__ = None  # type: ignore[assignment]
