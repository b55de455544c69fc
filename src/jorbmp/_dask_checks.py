"""Checks that a Dask state's contexts reach its workers intact.

Two layers, both against the same failure: a msgspec Struct class that reaches a Dask
worker in another shape than here (sent by value, it arrives without its fields; an
older or newer module on the worker has other fields), so that every context the
worker decodes silently loses data.

- Before anything runs (`check_travels`): job, OC and exec types that cloudpickle,
  which Dask uses, would send by value are refused with a `ValueError`.
- On every batch, on the worker (`jorbmp._dask_worker.run_batch`): the contexts it
  decoded must encode again to the bytes it received. When they do not, it runs
  nothing and sends its encoding back, and `Echoes` judges it here (`compare`):
  equal values with the same fields (a set encodes in another order in another
  process) are fine, and that worker is told to stop comparing; anything else fails
  the state.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect
import msgspec.structs

from ._execute import describe
from ._protocol import WorkerSpec

if TYPE_CHECKING:
    from ._dask_pool import DaskPool, Task

__all__ = ["Echoes", "check_travels", "compare", "same", "short"]

_MAIN_MODULES = ("__main__", "__mp_main__")


def short(value: Any) -> str:
    """``repr(value)``, cut to a length that fits in an error message."""
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "...)"


def _fields(value: Any, where: str = "$") -> set[str]:
    """The paths of every map key in plain decoded data (list items share one path)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}"
            paths.add(path)
            paths |= _fields(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= _fields(item, f"{where}[]")
    return paths


def same(a: Any, b: Any) -> bool:
    """Whether two decoded values hold the same data: ``==``, except that NaN equals
    NaN (a NaN in a context is no loss) and Structs compare field by field (one with
    ``eq=False`` compares by identity)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return bool(a == b)  # an int sent for a float field decodes as a float there
    if isinstance(a, msgspec.Struct):
        return all(map(same, msgspec.structs.astuple(a), msgspec.structs.astuple(b)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def compare(job_type: Any, contexts: list[Any], echo: bytes) -> str | None:
    """None when ``echo`` (a worker's encoding of ``contexts`` as it decoded them) holds
    the same values with the same fields; else what differs, for an error message.

    The fields are compared too: a field the worker's type lacks comes back missing,
    and decoding here would fill in its default, hiding the loss."""
    try:
        decoded = msgspec.msgpack.Decoder(list[job_type]).decode(echo)
        lost = _fields(msgspec.msgpack.decode(msgspec.msgpack.encode(contexts))) - _fields(
            msgspec.msgpack.decode(echo)
        )
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, IndexError) as exc:
        return f"{short(contexts[0])} does not survive the trip there ({describe(exc)})"
    if same(decoded, contexts) and not lost:
        return None
    seen = decoded[0] if decoded else None
    what = f"{short(contexts[0])} arrives there as {short(seen)}"
    if lost:
        what += f" without the field(s) {', '.join(sorted(lost)[:5])}"
    return what


# Times a worker is told to trust its encoding of contexts before the state fails.
TRUST_TRIES = 5


class Echoes:
    """Judges, for one `DaskPool`, the batches its workers sent back unrun: their
    encoding of the contexts they decoded differed from what they received."""

    __slots__ = ("pool", "told", "tries")

    def __init__(self, pool: DaskPool) -> None:
        self.pool = pool
        # Workers told to trust their encoding: when they confirmed (loop time; None
        # while the message travels), and how many times they were told; by address,
        # forgotten when that worker leaves (see `worker_gone`).
        self.told: dict[str, float | None] = {}
        self.tries: dict[str, int] = {}

    def judge(self, task: Task, echo: bytes, worker: str) -> None:
        """Dask worker ``worker`` decoded the contexts of ``task`` to something else (its
        encoding of them, ``echo``, differs) and ran nothing. Equal values (a set's
        order differs between processes) are fine: the jobs go back uncharged, and that
        worker is told to stop comparing. Else the state cannot run there without
        losing data: it fails, and no job changed."""
        pool = self.pool
        what = compare(pool.spec.job_type, [job.context for job in task.jobs], echo)
        if what is None:
            told = self.told.get(worker, -1.0)
            # Tell it (again) unless the message travels, or the batch left before it
            # arrived. A worker told TRUST_TRIES times that still compares is not ours.
            if told is not None and task.submitted > told:
                tries = self.tries[worker] = self.tries.get(worker, 0) + 1
                if tries > TRUST_TRIES:
                    what = (
                        f"it kept comparing contexts after being told to stop {TRUST_TRIES} times"
                    )
                else:
                    self._tell(worker)
            if what is None:
                pool.sink.unrun(task.jobs)
                return
        pool.fatal(
            f"Dask worker {worker} decodes job contexts differently from this process, so "
            f"every job would lose data: {what}. Are the job type and the types it uses "
            "defined in __main__, or differently on the workers? Define them in a module "
            "the workers import"
        )

    def worker_gone(self, worker: str) -> None:
        """A Dask worker left: one that comes back at the same address (a fixed port,
        a nanny's restart) is a new process, which compares again until told."""
        self.told.pop(worker, None)
        self.tries.pop(worker, None)

    def _tell(self, worker: str) -> None:
        from ._dask_worker import trust

        pool = self.pool
        pool.log.debug("state %r: Dask worker %s encodes sets in another order", pool.state, worker)
        self.told[worker] = None

        async def tell() -> None:
            with contextlib.suppress(Exception):  # a worker gone: it asks again, or not
                await pool.connection.client._run(trust, pool.name, workers=[worker])
            pool.tell(self._confirmed, worker)

        pool.connection.run_quietly(tell())

    def _confirmed(self, worker: str) -> None:
        self.told[worker] = self.pool.loop.time()


def _by_value(obj: Any) -> bool:
    """Whether cloudpickle (which Dask uses) would send ``obj``, a class or function,
    by value: defined in ``__main__``, inside a function, or in a module registered
    with ``cloudpickle.register_pickle_by_value``. A msgspec Struct class sent by
    value arrives in the other process without its fields."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return False
    if module in _MAIN_MODULES or "<locals>" in qualname:
        return True
    try:
        import cloudpickle  # type: ignore[import-untyped]

        registered = set(cloudpickle.list_registry_pickle_by_value())
    except Exception:  # an old cloudpickle: nothing registered by value
        return False
    parts = module.split(".")
    return any(".".join(parts[:i]) in registered for i in range(1, len(parts) + 1))


def _types_in(tp: Any) -> list[Any]:
    """``tp`` and the classes its msgspec type information names (fields' types, items
    of containers, members of unions), each once."""
    try:
        info = msgspec.inspect.type_info(tp)
    except Exception:  # not a type msgspec knows: only itself
        return [tp]
    found: list[Any] = [tp]
    seen: set[int] = set()
    stack = [info]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "cls", None)
        if cls is not None and cls not in found:
            found.append(cls)
        for field in getattr(node, "fields", ()) or ():
            stack.append(field.type)
        for attr in ("item_type", "key_type", "value_type"):
            if (sub := getattr(node, attr, None)) is not None:
                stack.append(sub)
        for attr in ("types", "item_types"):
            stack.extend(getattr(node, attr, ()) or ())
    return found


def check_travels(spec: WorkerSpec) -> None:
    """Refuse, before anything runs, a job type, OC type or exec that would reach the
    Dask workers by value (see `_by_value`): its contexts would silently lose data."""
    what: list[tuple[str, Any]] = [
        ("the job type" if tp is spec.job_type else "type", tp) for tp in _types_in(spec.job_type)
    ]
    if spec.overall is not None:
        oc_type = type(spec.overall)
        what += [("the OC type" if tp is oc_type else "type", tp) for tp in _types_in(oc_type)]
    what.append(("exec", spec.exec))
    for label, obj in what:
        if (isinstance(obj, type) or callable(obj)) and _by_value(obj):
            name = f"{obj.__module__}.{obj.__qualname__}"
            where = (
                "in __main__ (the script run)"
                if obj.__module__ in _MAIN_MODULES
                else (
                    "inside a function"
                    if "<locals>" in obj.__qualname__
                    else "in a module registered to pickle by value"
                )
            )
            raise ValueError(
                f"state {spec.state!r}: {label} {name} is defined {where}, so it would "
                "reach the Dask workers by value, where a msgspec Struct arrives "
                "without its fields (every context silently reset or failing): move "
                "it to an importable module that the Dask workers can import too"
            )
