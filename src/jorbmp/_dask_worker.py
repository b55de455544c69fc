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


def run_batch(
    name: str, payload: bytes, check: bool = False, topic: str = "", key: str = ""
) -> bytes:
    """The Dask task: run a batch of encoded contexts through the state's exec.

    With ``check``, first make sure this worker decodes the contexts to the same
    values as the coordinator: their encoding again must be ``payload`` byte for byte.
    The answer is then ``(True, results)``, or ``(False, that encoding)`` with nothing
    run, for the coordinator to judge (a job type that reached this worker by value,
    without its fields, would otherwise silently reset every context).

    With a ``topic`` (the state has a timeout), the worker reports ``("start", key,
    worker address)`` under it as the exec starts and ``("end", key)`` when it ends,
    however it ends: the coordinator counts the timeout from the start, and keeps the
    slot of a timed-out exec until its end (a thread cannot be interrupted)."""
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, StatePlugin):
        raise RuntimeError(f"jorbmp plugin {name!r} is not registered on worker {worker.address}")
    if plugin.error is not None:
        raise RuntimeError(plugin.error)
    spec = plugin.spec
    state, fn, ac, oc, codec = spec.state, spec.exec, plugin.ac, spec.overall, plugin.codec
    contexts = plugin.decode(payload)
    if check:
        again = plugin.encode(contexts)
        if again != payload:
            return plugin.encode((False, again))
    if topic:
        worker.log_event(topic, ("start", key, worker.address))
    try:
        results = plugin.encode(_execute.run_batch(state, fn, ac, oc, contexts, codec))
    finally:
        if topic:
            worker.log_event(topic, ("end", key))
    return plugin.encode((True, results)) if check else results
