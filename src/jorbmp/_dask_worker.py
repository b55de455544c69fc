"""What runs on a Dask worker for a state with `jorbmp.dask.DaskBackend`.

The state's `WorkerSpec` (exec, AC or ac_factory, OC, job type) reaches each Dask
worker once, inside a worker plugin, which builds the AC there, also on workers that
join later. A task then carries only a batch of encoded job contexts and returns
encoded outcomes, the same conversation as a local worker (see `jorbmp._protocol`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from distributed import WorkerPlugin, get_worker

from . import _execute
from ._execute import ContextCodec, describe
from ._protocol import WorkerSpec


class StatePlugin(WorkerPlugin):
    """Holds one state's spec and AC on a Dask worker (registered under ``name``)."""

    def __init__(self, name: str, spec: WorkerSpec) -> None:
        self.name = name
        self.spec = spec
        self.error: str | None = None
        # The coordinator judged that this worker's encoding of contexts, other bytes
        # than its own, holds the same values (a set's order differs): see `trust`.
        self.trusted = False

    def setup(self, worker: Any) -> None:
        spec = self.spec
        self.codec = ContextCodec(spec.job_type)
        self.decode = msgspec.msgpack.Decoder(list[spec.job_type]).decode  # type: ignore[name-defined]
        self.encode = msgspec.msgpack.Encoder().encode
        try:
            self.ac = spec.app_context()
        except Exception as exc:
            self.error = f"ac_factory failed on Dask worker {worker.address}: {describe(exc)}"
            raise


def _plugin(worker: Any, name: str) -> StatePlugin:
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, StatePlugin):
        raise RuntimeError(f"jorbmp plugin {name!r} is not registered on worker {worker.address}")
    return plugin


def run_batch(
    name: str, payload: bytes, topic: str = "", key: str = ""
) -> bytes | tuple[bytes, str]:
    """The Dask task: run a batch of encoded contexts through the state's exec, and
    return the encoded `Results`.

    First, on every batch, the contexts this worker decoded must encode again to
    ``payload`` byte for byte (one encode per batch): else this worker's job type is
    not the coordinator's (a skewed module, a type sent by value), and it returns
    ``(its encoding, its address)`` with nothing run, for the coordinator to judge.

    With a ``topic`` (the state has a timeout), the worker reports ``("start", key,
    worker address)`` under it as the exec starts and ``("end", key)`` when it ends,
    however it ends: the coordinator counts the timeout from the start, and keeps the
    slot of a timed-out exec until its end (a thread cannot be interrupted)."""
    worker = get_worker()
    plugin = _plugin(worker, name)
    if plugin.error is not None:
        raise RuntimeError(plugin.error)
    spec = plugin.spec
    state, fn, ac, oc, codec = spec.state, spec.exec, plugin.ac, spec.overall, plugin.codec
    contexts = plugin.decode(payload)
    if not plugin.trusted:
        again = plugin.encode(contexts)
        if again != payload:
            return again, str(worker.address)
    if topic:
        worker.log_event(topic, ("start", key, worker.address))
    try:
        return plugin.encode(_execute.run_batch(state, fn, ac, oc, contexts, codec))
    finally:
        if topic:
            worker.log_event(topic, ("end", key))


def trust(name: str, dask_worker: Any) -> None:
    """Run by ``client.run`` on one worker: its contexts hold the same values as the
    coordinator's in other bytes (a set's order), so it stops comparing bytes."""
    _plugin(dask_worker, name).trusted = True
