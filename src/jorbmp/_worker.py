"""The body of a worker process: receive batches of job contexts, run the exec, reply.

Imports only the protocol, the framing and the exec runner (see `jorbmp._protocol`
for the conversation). The coordinator owns shutdown: workers ignore SIGINT so a
Ctrl-C in the terminal reaches only the coordinator, and they exit when their
socket closes.
"""

from __future__ import annotations

import gc
import signal
import socket
from typing import Any

import msgspec

from ._comms import WorkerEnd
from ._execute import ContextCodec, describe, run_batch
from ._protocol import Startup, WorkerSpec


def worker_main(sock: socket.socket, spec: WorkerSpec, shared_slot: Any) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``)."""
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
    slot = memoryview(shared_slot).cast("B").cast("d")  # faster stores than ctypes
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(list[spec.job_type])  # type: ignore[name-defined]
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
    fn, oc, state, codec = spec.exec, spec.overall, spec.state, ContextCodec(spec.job_type)
    while (data := link.recv()) is not None:
        results = run_batch(state, fn, ac, oc, decoder.decode(data), codec, slot, spec.timed)
        try:
            link.send(encoder.encode(results))
        except OSError:
            return  # the coordinator is gone
