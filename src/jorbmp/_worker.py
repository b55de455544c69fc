"""The body of a worker process: receive batches of job contexts, run the exec, reply.

Imports only the protocol, the framing and the exec runner (see `jorbmp._protocol`
for the conversation). The coordinator owns shutdown: workers ignore SIGINT so a
Ctrl-C in the terminal reaches only the coordinator, and they exit when their
socket closes, or at once when the coordinator dies (``PR_SET_PDEATHSIG``).

Each worker leads its own process group, so that the coordinator can kill a worker
together with whatever its exec started (a timed-out ``subprocess.run``, say). That
group is in the background of the coordinator's terminal, if it has one, so workers
ignore SIGTTOU and SIGTTIN (and so do the tools their execs run, which inherit that):
a tool that sets the terminal's mode would otherwise stop the whole group, worker
included, and the run would hang; one that reads the terminal gets an error instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import select
import signal
import socket
import sys
import threading
from typing import Any

import msgspec

from . import _comms, _log_relay
from ._comms import WorkerEnd
from ._execute import ContextCodec, bad_context, describe, run_batch
from ._oom import raise_oom_score
from ._protocol import (
    CHUNK_BYTES,
    CHUNK_SECONDS,
    DECODING,
    FAILED_ATTEMPT,
    IDLE,
    SLOT_BATCH,
    SLOT_CLOSING,
    SLOT_INDEX,
    SLOT_PHASE,
    Outcome,
    Results,
    Startup,
    WorkerSpec,
)

PR_SET_PDEATHSIG = 1
# The signal the kernel sends a worker when the coordinator dies (see
# `_die_with_coordinator`).
DEATH_SIGNAL = signal.SIGRTMIN + 5 if hasattr(signal, "SIGRTMIN") else signal.SIGHUP


def _die_with_coordinator(parent: int, sock: socket.socket, slot: Any) -> None:
    """Make sure this worker, and what its exec started, dies with the coordinator.

    When the coordinator is the parent (pid ``parent``), the kernel sends
    `DEATH_SIGNAL` when it dies (``PR_SET_PDEATHSIG``, Linux), and the handler kills the
    worker's group; until the handler is installed the signal's default action kills
    the worker alone. A real-time signal, which no exec or library is likely to
    handle or ignore (SIGHUP, say, would be). The handler runs in Python: during one
    long call into C it waits for that call to return, and the worker dies then,
    before it can report anything.
    Otherwise (forkserver: the parent is the server, which outlives the coordinator;
    or another OS) a thread waits for the coordinator's end of the socket to close,
    which the kernel does when it dies.
    """
    if parent and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            signal.signal(DEATH_SIGNAL, _orphaned)
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, DEATH_SIGNAL)
            if os.getppid() != parent:
                _kill_group()  # orphaned between fork and prctl: the run is gone
            return
    if hasattr(select, "poll") and hasattr(select, "POLLRDHUP"):
        threading.Thread(
            target=_watch, args=(sock.fileno(), slot), name="jorbmp-watchdog", daemon=True
        ).start()


def _orphaned(signum: int, frame: Any) -> None:
    _kill_group()


def _kill_group() -> None:
    """SIGKILL this worker and what its exec started (its group, if it leads one)."""
    if os.getpgid(0) == os.getpid():  # never the coordinator's group
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(fd: int, slot: Any) -> None:
    """Kill this worker's group once the coordinator's end of ``fd`` closes without
    the coordinator having said it would (`SLOT_CLOSING`): it died."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    while not poller.poll():
        pass
    if not slot[SLOT_CLOSING]:
        _kill_group()


def worker_main(sock: socket.socket, spec: WorkerSpec, shared_slot: Any) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # lead a group of its own (the coordinator does it too: a race)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # see the module docstring
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    slot = memoryview(shared_slot).cast("B").cast("d")  # faster stores than ctypes
    _die_with_coordinator(spec.parent_pid, sock, slot)
    raise_oom_score()  # the kernel's first victim, never the coordinator (`jorbmp._oom`)
    # What a forked worker inherits (the coordinator's heap: the run, the application's
    # objects) is never garbage here. Left to the cyclic collector, a full collection
    # would write to every page holding such an object and so copy them all: memory
    # the worker shares with the coordinator would become its own.
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the coordinator's handlers and wakeup fd: SIGTERM must
    # kill it like any process, and its signals must not wake the coordinator's loop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    link = WorkerEnd(sock)
    encoder = msgspec.msgpack.Encoder()
    levels = spec.log_levels  # (before the AC: what ac_factory logs is relayed too)
    relay = None if levels is None else _log_relay.install(levels, link.send, slot)
    try:
        ac = spec.app_context()
    except Exception as exc:
        startup = Startup(f"ac_factory failed in a worker: {describe(exc)}")
    else:
        startup = Startup()
    try:
        link.send(encoder.encode(startup))
    except OSError:
        return  # the run ended before this worker was ready: nothing to do
    if startup.error is not None:
        return
    decoder = _BatchDecoder(spec.job_type)
    fn, oc, state, codec = spec.exec, spec.overall, spec.state, ContextCodec(spec.job_type)
    out_per_job = 0.0  # bytes of results per job, as last seen
    batch = 0
    while (data := link.recv()) is not None:
        slot[SLOT_INDEX] = 0
        slot[SLOT_BATCH] = batch
        slot[SLOT_PHASE] = DECODING
        batch += 1
        jcs, bad = decoder.decode(data)
        in_per_job = len(data) / max(1, len(jcs))
        first = 0
        while first < len(jcs):
            chunk_jobs = max(1, int(CHUNK_BYTES / max(in_per_job, out_per_job, 1.0)))
            results = run_batch(
                state, fn, ac, oc, jcs, codec, slot, spec.timed, first, CHUNK_SECONDS,
                chunk_jobs, bad,
            )  # fmt: skip
            n = len(results.plain)
            if relay is not None and relay.queue:
                relay.ship()  # before the results: the coordinator still knows the jobs
            try:
                sent = send_results(link, encoder.encode, results)
            except OSError:
                return  # the coordinator is gone
            out_per_job = sent / n
            first += n
        slot[SLOT_PHASE] = IDLE
        if relay is not None and relay.queue:
            relay.ship()  # (from here on, a record ships itself: see `WorkerRelay`)


class _BatchDecoder:
    """Decodes a batch of contexts; when the batch as a whole does not decode, decodes
    each on its own, so that a bad context fails its job instead of the worker."""

    def __init__(self, job_type: Any) -> None:
        self.many = msgspec.msgpack.Decoder(list[job_type]).decode
        self.raws = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
        self.one = msgspec.msgpack.Decoder(job_type).decode
        self.name = getattr(job_type, "__name__", "the job type")

    def decode(self, data: bytes) -> tuple[list[Any], dict[int, str] | None]:
        try:
            return self.many(data), None
        except msgspec.ValidationError:
            pass
        jcs: list[Any] = []
        bad: dict[int, str] = {}
        for i, raw in enumerate(self.raws(data)):
            try:
                jcs.append(self.one(raw))
            except msgspec.ValidationError as exc:
                jcs.append(None)
                bad[i] = bad_context(self.name, exc)
        return jcs, bad


def send_results(link: WorkerEnd, encode: Any, results: Results) -> int:
    """Send ``results``, split into smaller messages if they do not fit in one (or
    cannot be encoded at once); a single job's results that cannot be sent at all
    become a failed attempt that says why. Returns the bytes sent."""
    try:
        data = encode(results)
    except MemoryError:
        data = None
    n = len(results.plain)
    if (
        data is not None
        and (len(data) <= 2 * CHUNK_BYTES or n == 1)
        and len(data) <= _comms.MAX_PAYLOAD
    ):
        link.send(data)
        return len(data)
    data = None  # let it go before splitting
    outcomes = list(results.outcomes())
    if n > 1:
        half = n // 2
        return send_results(link, encode, Results.of(outcomes[:half])) + send_results(
            link, encode, Results.of(outcomes[half:])
        )
    try:
        size = f"{len(encode(results))} bytes, over the limit of {_comms.MAX_PAYLOAD}"
    except MemoryError:
        size = "too big to encode: MemoryError"
    failed = Outcome(
        FAILED_ATTEMPT,
        error=f"the results of this exec cannot be sent to the coordinator ({size})",
        seconds=outcomes[0].seconds,
    )
    data = encode(Results.of([failed]))
    link.send(data)
    return len(data)
