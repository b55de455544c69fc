"""The coordinator/worker protocol, in one place.

Each process state has its own pool of worker processes. Every worker owns one
duplex pipe (``multiprocessing.Pipe``) to the coordinator and one small shared array
(`Slot`) that the coordinator reads without messages::

    coordinator                                   worker (one per pool slot)
    -----------                                   --------------------------
    Process(args=(pipe, WorkerSpec, slot))  --->  build AC (ac_factory) once
                                            <---  Startup(error=None | text)
    encode([jc, jc, ...])  (a batch)        --->  for each jc: slot = (i, now)
                                                    outcome = exec(ac, oc, jc)
                                            <---  encode([Outcome, ...])
    close the pipe                          --->  EOF: the worker exits

- AC, OC, the exec function and the job type cross once, at start (``WorkerSpec``,
  pickled by multiprocessing for spawn, inherited for fork). Per job only the msgpack
  encoding of its context goes out, and an `Outcome` comes back.
- A worker has at most one batch at a time, so the coordinator never blocks writing
  to a pipe whose reader is busy, and look-ahead is bounded by concurrency x batch.
- `Slot` holds (index in batch, start time of the running exec or 0). When the pipe
  hits EOF the coordinator knows which job the worker died in; the housekeeping tick
  uses the start time to enforce ``State.timeout``.
- Contexts in an `Outcome` travel as ``msgspec.Raw`` so the coordinator decodes each
  one against the run's job type on its own: one bad context fails one job, not a batch.
  The contexts of one exec's kicks travel together, as one encoded array: any bad one
  fails that exec's whole transition anyway, and one decode is cheaper than many.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

# Outcome.code values.
OK = 0  # exec returned a valid transition (possibly with an error to record)
FAILED_ATTEMPT = 1  # exec raised, returned garbage, or broke a rule: counts toward max_retries
RATE_LIMITED = 2  # RateLimitError raised or returned: back off, retry, not a failed attempt

NIL = msgspec.Raw(b"\xc0")  # msgpack nil

# Slot indexes.
SLOT_INDEX = 0
SLOT_STARTED = 1
SLOT_SIZE = 2


class Outcome(msgspec.Struct, array_like=True, gc=False):
    """What one exec call produced; built by `jorbmp._execute` in whatever runs the exec."""

    code: int
    # The encoded JC (msgpack) for OK and RATE_LIMITED; msgpack nil otherwise. (Not
    # ``Raw | None``: msgspec cannot decode Raw inside a union.)
    context: msgspec.Raw = NIL
    next_state: str = ""
    kick_states: list[str] | None = None  # the state of each kicked job
    error: str | None = None  # text recorded in state_errors[prior state]
    retry_after: float | None = None
    seconds: float = 0.0  # exec wall time
    trace: str | None = None  # formatted traceback of a raised exception, logged at DEBUG
    kick_contexts: msgspec.Raw = NIL  # the kicked jobs' JCs, as one msgpack array


class Startup(msgspec.Struct, array_like=True):
    """A worker's first message: None when ready, else why it cannot run jobs."""

    error: str | None = None


class WorkerSpec(msgspec.Struct):
    """Everything a worker needs, sent once when it starts (pickled, not msgpack)."""

    state: str
    exec: Callable[..., Any]
    ac: Any
    ac_factory: Callable[[], Any] | None
    overall: Any
    job_type: Any

    def app_context(self) -> Any:
        """The AC for execs in the process calling this: built by ``ac_factory`` if given."""
        return self.ac_factory() if self.ac_factory is not None else self.ac
