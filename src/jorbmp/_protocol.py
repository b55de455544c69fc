"""The coordinator/worker protocol, in one place.

Each process state has its own pool of worker processes. Every worker owns one
socket to the coordinator (framing in `jorbmp._comms`) and one small shared array
(the slot) that the coordinator reads without messages::

    coordinator                                   worker (one per pool slot)
    -----------                                   --------------------------
    Process(args=(sock, WorkerSpec, slot))  --->  build AC (ac_factory) once
                                            <---  Startup(error=None | text)
    encode([jc, jc, ...])  (a batch)        --->  for each jc: slot = (i, now, EXEC)
                                                    exec(ac, oc, jc)
                                            <---  encode(Results) of the jobs done
                                                  so far, every few ms of work
                                            <---  ... until the batch is done
    close the socket                        --->  EOF: the worker exits

- AC, OC, the exec function and the job type cross once, at start (``WorkerSpec``,
  pickled by multiprocessing for spawn, inherited for fork). Per job only the msgpack
  encoding of its context goes out, and its outcome comes back in a batch's `Results`.
- Results stream back in chunks of at most `CHUNK_SECONDS` of work (and about
  `CHUNK_BYTES`): a worker that dies loses the results of at most that much work,
  so few finished jobs run again.
- The slot holds (index in batch of the current job, start time or 0, phase). The
  phase says what the worker was doing: waiting, decoding a batch, executing job
  ``index``, or encoding and sending the results up to ``index``. When a worker
  dies the coordinator knows whom to blame: the job it died in, or (outside an
  exec) the jobs it was decoding or sending, which are then retried one at a time
  until the culprit is found. The start time is the chunk's, or each exec's when
  the state has a timeout; the housekeeping tick uses it to enforce ``State.timeout``.
- `Results` keeps the common outcome (a context, a next state and maybe kicks, no
  error) in columns: its contexts, and its kicks' contexts, travel as one encoded
  array each, decoded by the coordinator in one call, and it costs no `Outcome` on
  either side. Every other outcome travels whole.
- Contexts in an `Outcome` travel as ``msgspec.Raw`` so the coordinator decodes each
  one against the run's job type on its own: one bad context fails one job. (When a
  batch's array of contexts does not decode, the coordinator falls back to that.)
  The contexts of one exec's kicks travel together, as one encoded array: any bad one
  fails that exec's whole transition anyway, and one decode is cheaper than many.
- Log records the worker's execs emit (at levels the coordinator's `LogLevels` let
  through) go up as `Logs`, any time after the worker starts and before the
  `Results` of the chunk in which they were emitted (`jorbmp._log_relay`); a worker
  whose execs log nothing sends none.

Threads, the inline runner and Dask workers build the same `Results` (`run_batch`);
async states and failures a backend reports itself wrap whole outcomes (`Results.of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec

# Outcome.code values.
OK = 0  # exec returned a valid transition (possibly with an error to record)
FAILED_ATTEMPT = 1  # exec raised, returned garbage, or broke a rule: counts toward max_retries
RATE_LIMITED = 2  # RateLimitError raised or returned: back off, retry, not a failed attempt

NIL = msgspec.Raw(b"\xc0")  # msgpack nil
EMPTY_ARRAY = msgspec.Raw(b"\x90")  # msgpack []

# Slot indexes.
SLOT_INDEX = 0
SLOT_STARTED = 1
SLOT_PHASE = 2
SLOT_BATCH = 3  # which of the batches this worker received, counting from 0
SLOT_CLOSING = 4  # set by the coordinator before it closes the socket on purpose
SLOT_SIZE = 5

# Slot phases: what a worker is doing.
IDLE = 0.0  # waiting for a batch (or not started)
DECODING = 1.0  # decoding the batch it received
EXECUTING = 2.0  # running the exec of job ``index``
SENDING = 3.0  # encoding and sending the results of the jobs up to ``index``

# Results go back to the coordinator at least this often while a batch runs (in
# seconds of exec time), so that a worker death loses at most this much finished
# work; a job that takes longer goes back on its own as soon as it ends.
CHUNK_SECONDS = 0.005
# Aim for messages of at most about this many bytes, both ways: bigger ones cost
# memory on both sides for no gain (the cost per message is long amortised).
CHUNK_BYTES = 8 << 20


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


class Results(msgspec.Struct, array_like=True, gc=False):
    """The outcomes of one batch of execs, in the batch's order.

    ``plain[i]`` is the index in ``next_states`` of job i's next state when its exec
    returned a valid context, a next state and maybe valid kicks, and no error; its
    context is then the next element of ``contexts``. Otherwise ``plain[i]`` is -1
    and its outcome is the next of ``others``.

    When any plain outcome kicked, ``kick_counts[i]`` is how many jobs job i kicked
    (0 for the others): the next that many of ``kick_states`` (indexes in
    ``next_states``) and ``kick_contexts``.
    """

    plain: list[int]
    seconds: list[float]  # exec wall time of each job
    next_states: list[str] = []
    contexts: msgspec.Raw = EMPTY_ARRAY  # msgpack array of the plain outcomes' contexts
    others: list[Outcome] = []
    kick_counts: list[int] = []  # empty when no plain outcome kicked
    kick_states: list[int] = []
    kick_contexts: msgspec.Raw = EMPTY_ARRAY  # msgpack array of every kick's context

    @classmethod
    def of(cls, outcomes: list[Outcome]) -> Results:
        """Results holding ``outcomes`` whole (for failures reported by a backend)."""
        return cls([-1] * len(outcomes), [o.seconds for o in outcomes], others=outcomes)

    def outcomes(self) -> Iterator[Outcome]:
        """Every job's outcome as an `Outcome`, the plain ones rebuilt (the general path)."""
        contexts = iter(_decode_raws(self.contexts))
        others = iter(self.others)
        next_states = self.next_states
        counts = self.kick_counts or [0] * len(self.plain)
        kick_contexts = _decode_raws(self.kick_contexts)
        at = 0  # the first kick of the next job that kicked
        for k, seconds, n in zip(self.plain, self.seconds, counts, strict=True):
            if k < 0:
                yield next(others)
                continue
            outcome = Outcome(OK, next(contexts), next_states[k], seconds=seconds)
            if n:
                outcome.kick_states = [next_states[i] for i in self.kick_states[at : at + n]]
                outcome.kick_contexts = msgspec.Raw(_encode(kick_contexts[at : at + n]))
                at += n
            yield outcome


_decode_raws = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
_encode = msgspec.msgpack.Encoder().encode


class Startup(msgspec.Struct, array_like=True):
    """A worker's first message: None when ready, else why it cannot run jobs."""

    error: str | None = None


class LogLevels(msgspec.Struct, frozen=True):
    """The coordinator's logging levels, for a worker to filter records as the
    coordinator would (see `jorbmp._log_relay`): the root logger's level, those set
    on named loggers, the loggers disabled, and ``logging.disable``'s level."""

    root: int
    levels: dict[str, int] = {}
    disabled: list[str] = []
    disable: int = 0


class LogLine(msgspec.Struct, array_like=True, gc=False):
    """One log record emitted in a worker: its message with the arguments applied
    (they may not travel), the exception text formatted. ``batch`` and ``index`` are
    the worker's batch number and the index in it of the job executing then (-1:
    none), for the coordinator to name the job."""

    name: str
    levelno: int
    message: str
    created: float
    pathname: str
    lineno: int
    func: str | None
    exc_text: str | None
    stack_info: str | None
    thread_name: str | None
    batch: int
    index: int


class Logs(msgspec.Struct, gc=False):
    """A worker's log records since its last `Logs`, sent before the results of the
    jobs that emitted them; ``dropped`` counts the records left out (see
    `jorbmp._log_relay.MAX_RECORDS`). Not array-like: it encodes as a msgpack map,
    where `Startup` and `Results` are arrays, so `is_logs` tells it by its first byte."""

    records: list[LogLine]
    dropped: int = 0


def is_logs(data: bytes) -> bool:
    """Whether a worker's message is `Logs` (a msgpack fixmap, 0x80-0x8f)."""
    return data[0] & 0xF0 == 0x80


class WorkerSpec(msgspec.Struct):
    """Everything a worker needs, sent once when it starts (pickled, not msgpack)."""

    state: str
    exec: Callable[..., Any]
    ac: Any
    ac_factory: Callable[[], Any] | None
    overall: Any
    job_type: Any
    timed: bool = False  # the state has a timeout: workers note when each exec starts
    # The coordinator's pid when it is the worker's parent (fork, spawn), else 0.
    parent_pid: int = 0
    # Set: the worker relays its log records to the coordinator (`jorbmp._log_relay`).
    log_levels: LogLevels | None = None

    def app_context(self) -> Any:
        """The AC for execs in the process calling this: built by ``ac_factory`` if given."""
        return self.ac_factory() if self.ac_factory is not None else self.ac
