"""The body of a worker process: receive batches of job contexts, run the exec, reply.

Imports only the protocol and the exec runner (see `jorbmp._protocol` for the
conversation). The coordinator owns shutdown: workers ignore SIGINT so a Ctrl-C in
the terminal reaches only the coordinator, and they exit when their pipe closes.
"""

from __future__ import annotations

import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from ._execute import ContextCodec, describe, execute
from ._protocol import SLOT_INDEX, SLOT_STARTED, Startup, WorkerSpec


def worker_main(conn: Connection, spec: WorkerSpec, slot: Any) -> None:
    """Entry point of a worker process (the target of ``multiprocessing.Process``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the coordinator's asyncio wakeup fd; its signals must
    # not wake the coordinator's loop.
    signal.set_wakeup_fd(-1)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(list[spec.job_type])  # type: ignore[name-defined]
    try:
        ac = spec.ac_factory() if spec.ac_factory is not None else spec.ac
    except Exception as exc:
        conn.send_bytes(encoder.encode(Startup(f"ac_factory failed in a worker: {describe(exc)}")))
        return
    conn.send_bytes(encoder.encode(Startup()))
    fn, oc, state, codec = spec.exec, spec.overall, spec.state, ContextCodec(spec.job_type)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the coordinator closed the pipe: orderly exit
        slot[SLOT_INDEX] = 0
        outcomes = []
        for i, jc in enumerate(decoder.decode(data)):
            slot[SLOT_INDEX] = i
            slot[SLOT_STARTED] = time.monotonic()
            outcomes.append(execute(state, fn, ac, oc, jc, codec))
        slot[SLOT_STARTED] = 0.0
        try:
            conn.send_bytes(encoder.encode(outcomes))
        except (BrokenPipeError, OSError):
            return  # the coordinator is gone
