"""`Processor`: validates the states, then executes runs against them.

The processor is the public face; the scheduling loop lives in
`jorbmp._coordinator` and the worker pools in `jorbmp._pool`. This module decides
which backend runs each state, owns signal handling (Ctrl-C, SIGTERM) and turns the
way a run ended into a return value or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from types import FrameType
from typing import Any, Generic, TypeVar

from . import _floats
from ._backends import (
    AsyncBackend,
    Backend,
    BackendFactory,
    InlineBackend,
    InlineRunner,
    ThreadBackend,
)
from ._checkpoint_guard import DEFAULT_PATIENCE, check_patience
from ._coordinator import Coordinator
from ._cpus import CpuBudget
from ._lane import Lane
from ._memory import MemoryGovernor
from ._memory_limit import check_room, resolve_memory_limit
from ._pool import ProcessPool
from ._pool_budget import PoolBudget
from ._pool_recycle import Recycler
from ._protocol import WorkerSpec
from .adaptive import AdaptiveConcurrency
from .checkpoint.base import NilSerializer, Serializer
from .errors import Stopped
from .ratelimit import make_gate
from .report import RunReport
from .run import FAILED, Run
from .state import KINDS, State, is_coroutine_function
from .status import NilStatusListener, StatusListener

__all__ = ["Processor"]

log = logging.getLogger("jorbmp")

AC = TypeVar("AC")

# Seconds a graceful stop waits for executing jobs before abandoning them. Long
# enough for typical API calls and builds to finish; a second Ctrl-C skips it.
DEFAULT_GRACE_PERIOD = 30.0
# Signals handled like Ctrl-C while `Processor.exec` runs in the main thread.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Processor(Generic[AC]):
    """Executes runs against a list of states (jorb's Processor).

    ``ac`` (app context: clients, handles) is passed to every exec; for process
    states it reaches each worker once, at start. ``ac_factory`` builds it inside each
    worker instead (and once here), for contexts that cannot be pickled. ``inline=True``
    (or ``JORBMP_INLINE=1``) runs process states in this process, one job at a time, so
    that ``breakpoint()`` works. ``backend`` (e.g. ``jorbmp.dask.DaskBackend``) runs every
    process state without a backend of its own there instead of in local processes.
    ``cpus``: at most that many execs of local process states at once, all of them
    together (by default the adaptive ones share the cores this process may use, and
    fixed ones are outside any budget). ``memory_limit``: bytes (or a fraction in (0, 1]
    of the memory available to this process) that this process and its local workers
    may use together (RSS); see `jorbmp._memory`.
    ``checkpoint_patience``: seconds a run waits
    for space when a checkpoint write fails for lack of it (dispatch paused meanwhile)
    before it stops and ``exec`` raises `CheckpointError`.
    """

    def __init__(
        self,
        ac: AC,
        states: Sequence[State],
        serializer: Serializer | None = None,
        status_listener: StatusListener | None = None,
        *,
        ac_factory: Callable[[], AC] | None = None,
        mp_context: BaseContext | str | None = None,
        inline: bool = False,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        backend: BackendFactory | None = None,
        cpus: int | None = None,
        memory_limit: int | float | None = None,
        checkpoint_patience: float = DEFAULT_PATIENCE,
    ) -> None:
        if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1):
            raise ValueError(f"Processor: cpus must be None or an int >= 1, got {cpus!r}")
        self.cpus = cpus
        self.memory_limit = resolve_memory_limit(memory_limit)  # bytes, or None
        self.ac = ac
        self.states = validate_states(states)
        if backend is not None:
            _check_backend(backend, "Processor: backend")
            for state in self.states:
                _check_recycling(state, state.backend or backend)
        self.backend = backend
        self.serializer = serializer if serializer is not None else NilSerializer()
        self.status_listener = (
            status_listener if status_listener is not None else NilStatusListener()
        )
        if ac_factory is not None:
            _check_picklable(ac_factory, "ac_factory")
        self.ac_factory = ac_factory
        if mp_context is None or isinstance(mp_context, str):
            mp_context = multiprocessing.get_context(mp_context)
        self.mp_context = mp_context
        self.inline = inline or os.environ.get("JORBMP_INLINE", "").lower() in ("1", "true", "yes")
        if grace_period < 0:
            raise ValueError(f"grace_period must be >= 0, got {grace_period}")
        self.grace_period = grace_period
        self.checkpoint_patience = check_patience(checkpoint_patience)
        self._local_ac: Any = None
        self._local_ac_built = False
        self._lock = threading.Lock()
        self._coordinator: Coordinator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self._in_exec = False
        self._interrupts = 0
        self.last_report: RunReport | None = None  # of the latest exec, however it ended

    def __repr__(self) -> str:
        names = ", ".join(s.trigger_state for s in self.states)
        return f"<Processor states=[{names}] {self.serializer!r}>"

    # -- public ---------------------------------------------------------------------

    def exec(self, run: Run[Any, Any]) -> None:
        """Execute ``run`` until every job is terminal.

        Raises `Stopped` after `stop`, ``KeyboardInterrupt`` after Ctrl-C or SIGTERM
        (the final checkpoint is written in both cases). However it ends, the run's
        `RunReport` is then in `last_report`.
        """
        self._enter()
        try:
            self._exec_in_new_loop(run)
        finally:
            self._leave()

    def _exec_in_new_loop(self, run: Run[Any, Any]) -> None:
        loop = asyncio.new_event_loop()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            loop.run_until_complete(self._execute(run))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def exec_async(self, run: Run[Any, Any]) -> None:
        """`exec` inside an application's running event loop (no signal handlers are
        installed; cancelling this coroutine abandons executing jobs, writes the
        checkpoint and re-raises)."""
        self._enter()
        try:
            await self._execute(run)
        finally:
            self._leave()

    def stop(self) -> None:
        """Stop gracefully, from any thread: no new dispatches, executing jobs get the
        grace period to finish, the checkpoint is written, then `exec` raises `Stopped`.

        Does nothing when no `exec` is in progress (a stop never carries over to the
        next run); a stop that arrives while `exec` is starting is honoured."""
        with self._lock:
            if not self._in_exec:
                return
            self._stop_requested = True
            coordinator, loop = self._coordinator, self._loop
        if coordinator is not None and loop is not None:
            # RuntimeError: the loop closed, the run already ended.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(coordinator.request_stop)

    # -- internals ------------------------------------------------------------------

    def _enter(self) -> None:
        with self._lock:
            if self._in_exec:
                raise RuntimeError("this processor is already executing a run")
            self._in_exec = True
            self._stop_requested = False

    def _leave(self) -> None:
        with self._lock:
            self._in_exec = False
            self._stop_requested = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread: only schedule work, so a
        # checkpoint write in progress is never interrupted halfway.
        loop = self._loop
        if loop is None or self._coordinator is None:
            # Starting up or already finishing: nothing to drain, behave like Python.
            raise KeyboardInterrupt
        self._interrupts += 1
        # Mark it now, not in the scheduled callback: the same signal sent to the
        # process group may kill workers, and their deaths must not be charged.
        self._coordinator.signalled = True
        loop.call_soon_threadsafe(self._interrupt)

    def _interrupt(self) -> None:
        coordinator = self._coordinator
        if coordinator is None:
            return
        if self._interrupts == 1:
            log.warning("interrupted: finishing executing jobs (interrupt again to abandon them)")
            coordinator.request_stop()
        else:
            coordinator.abandon()
            # The run may be over, its checkpoint final, and exec waiting for the
            # listener: "at once" cuts that wait too.
            coordinator.mailbox.give_up()

    async def _execute(self, run: Run[Any, Any]) -> None:
        _check_not_bootstrapping()
        self._check_run(run)
        serializer = self.serializer
        if not _floats.stores_nonfinite(serializer):
            # A NaN or infinity its format cannot store (set before the exec): refuse
            # now, before anything runs or is written, not at some later write (an
            # SQLite checkpoint rewrites unchanged jobs last). Its writes refuse them
            # too; execs returning them fail their attempt (see `jorbmp._floats`).
            where = getattr(serializer, "path", repr(serializer))
            _floats.refuse(where, serializer, _floats.nonfinite_in_run(run))
        run._claim()  # atomic: two processors never execute one Run at once
        try:
            await self._execute_claimed(run)
        finally:
            run._executing = False

    async def _execute_claimed(self, run: Run[Any, Any]) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._interrupts = 0
            runner = InlineRunner()
            budget = self._cpu_budget()
            coordinator = Coordinator(
                run,
                self.states,
                lambda state, lane: self._make_backend(state, lane, run, runner, budget),
                self.serializer,
                self.status_listener,
                self.grace_period,
                checkpoint_patience=self.checkpoint_patience,
                memory=self._memory_governor(),
            )
            self._coordinator = coordinator
            if self._stop_requested:
                coordinator.request_stop()
        self.last_report = None
        try:
            outcome = await coordinator.execute()
        finally:
            self.last_report = coordinator.final_report
            with self._lock:
                self._coordinator = None
                self._loop = None
        # A Ctrl-C (or SIGTERM) always ends `exec` with KeyboardInterrupt, even when the
        # jobs that were executing then finished the run: the program was asked to
        # stop, and what follows `exec` must not run as if it had not been.
        if self._interrupts:
            raise KeyboardInterrupt
        if outcome == "stopped":
            left = sum(1 for job in run.jobs.values() if not self._terminal(job.state))
            raise Stopped(f"run {run.name!r} stopped with {left} jobs not terminal")

    def _terminal(self, state: str) -> bool:
        return any(s.trigger_state == state and s.terminal for s in self.states)

    def _check_run(self, run: Run[Any, Any]) -> None:
        declared = {s.trigger_state for s in self.states}
        stray = [job for job in run.jobs.values() if job.state not in declared]
        if stray:
            ids = ", ".join(repr(job.id) for job in stray[:5])
            more = f" and {len(stray) - 5} more" if len(stray) > 5 else ""
            raise ValueError(
                f"run {run.name!r}: job {ids}{more} in state {stray[0].state!r}, "
                "which no State declares"
            )

    def _coordinator_ac(self) -> Any:
        """The AC for execs that run in this process (async, thread and inline states)."""
        if self.ac_factory is None:
            return self.ac
        if not self._local_ac_built:
            self._local_ac = self.ac_factory()
            self._local_ac_built = True
        return self._local_ac

    def _local_pool(self, state: State) -> bool:
        """Whether ``state``'s execs run in this machine's worker processes."""
        return (
            not state.terminal
            and state.resolved_kind() == "process"
            and not self.inline
            and state.backend is None
            and self.backend is None
        )

    def _cpu_budget(self) -> CpuBudget | None:
        """The run's CPU budget: ``cpus`` shared by every local process state, or by
        default the available cores shared by the adaptive ones; None (no cost at all)
        without ``cpus`` and without an adaptive local process state."""
        local = [s for s in self.states if self._local_pool(s)]
        adaptive = [s for s in local if isinstance(s.concurrency, AdaptiveConcurrency)]
        if self.cpus is None and not adaptive:
            return None
        budget = CpuBudget.for_cpus(self.cpus)
        for state in local:
            c = state.concurrency
            if isinstance(c, AdaptiveConcurrency):
                budget.add(state.trigger_state, None, c.max, c.min)
            elif self.cpus is not None:
                budget.add(state.trigger_state, c)
        return budget

    def _memory_governor(self) -> MemoryGovernor | None:
        """The run's memory governor: None (no cost at all) without ``memory_limit`` or
        without a local process state, whose workers are all it governs."""
        limit = self.memory_limit
        if limit is None or not any(self._local_pool(s) for s in self.states):
            return None
        governor = MemoryGovernor(limit)
        check_room(limit, governor.fixed)  # (the coordinator's RSS now)
        return governor

    def _make_backend(
        self,
        state: State,
        lane: Lane,
        run: Run[Any, Any],
        runner: InlineRunner,
        budget: CpuBudget | None = None,
    ) -> Backend:
        assert state.exec is not None
        kind = state.resolved_kind()
        job_type: Any = run.job_type if run.job_type is not None else Any
        name, fn, oc = state.trigger_state, state.exec, run.overall
        maximum = lane.limit.maximum  # (an adaptive state's limit moves below it)
        if kind == "process" and not self.inline:
            ac = None if self.ac_factory is not None else self.ac
            spec = WorkerSpec(
                name, fn, ac, self.ac_factory, oc, job_type, timed=state.timeout is not None
            )
            factory = state.backend if state.backend is not None else self.backend
            if factory is not None:
                return factory.create(spec, maximum, lane, state.timeout)
            cpu = None
            if budget is not None and name in budget:
                coord = lane.coord
                cpu = PoolBudget(budget, name, lambda other: coord.settle(coord.lanes[other]))
                lane.cpu = cpu
            recycler = None
            if state.max_jobs_per_worker is not None or state.max_worker_memory is not None:
                recycler = Recycler(name, state.max_jobs_per_worker, state.max_worker_memory)
            memory = None
            if lane.coord.memory is not None:
                memory = lane.coord.memory.pool(name, lambda: lane.coord.settle(lane))
            return ProcessPool(
                spec, maximum, self.mp_context, lane, state.timeout, cpu, recycler, memory
            )
        if kind == "process":
            # Built by ac_factory on the run's inline thread, where it is used, as a
            # worker builds its own.
            ac = self.ac if self.ac_factory is None else runner.app_context(self.ac_factory)
            return InlineBackend(name, fn, ac, oc, job_type, 1, lane, runner=runner)
        ac = self._coordinator_ac()
        if kind == "async":
            return AsyncBackend(name, fn, ac, oc, job_type, maximum, lane, timeout=state.timeout)
        return ThreadBackend(name, fn, ac, oc, job_type, maximum, lane)


def _check_retry_delay(state: State) -> None:
    delay = state.retry_delay
    if not callable(delay) and (isinstance(delay, bool) or not isinstance(delay, (int, float))):
        raise ValueError(
            f"state {state.trigger_state!r}: retry_delay must be seconds (a number) or a "
            f"function of the attempt number, got {delay!r}"
        )
    state.retry_seconds(1)  # one that cannot give a delay fails now, not mid-run


def _check_recycling(state: State, backend: object) -> None:
    """``max_jobs_per_worker`` and ``max_worker_memory``: positive, and only where there
    are local worker processes to replace (``backend``: where the state's execs run
    instead, if anywhere)."""
    name, jobs, memory = state.trigger_state, state.max_jobs_per_worker, state.max_worker_memory
    if jobs is None and memory is None:
        return
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(
            f"state {name!r}: max_jobs_per_worker must be None or an int >= 1, got {jobs!r}"
        )
    if memory is not None and (
        isinstance(memory, bool)
        or not isinstance(memory, (int, float))
        or not 0 < memory < float("inf")
    ):
        raise ValueError(
            f"state {name!r}: max_worker_memory must be None or a finite number of bytes "
            f"> 0, got {memory!r}"
        )
    what = "max_jobs_per_worker" if jobs is not None else "max_worker_memory"
    if state.terminal:
        raise ValueError(f"state {name!r} is terminal: it has no workers for {what} to replace")
    kind = state.resolved_kind()
    if kind != "process":
        raise ValueError(
            f"state {name!r}: {what} is for process states (kind={kind!r} runs its execs in "
            "the coordinator, which is never replaced)"
        )
    if backend is not None:
        raise ValueError(
            f"state {name!r}: {what} replaces local worker processes, but backend "
            f"{type(backend).__name__} runs this state's execs elsewhere"
        )


def _check_not_bootstrapping() -> None:
    """Refuse to execute a run inside a worker process that is still starting: under
    spawn and forkserver each worker imports the main module again, and a main module
    that runs the processor without ``if __name__ == "__main__":`` would do it there."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "jorbmp: Processor.exec was called while a worker process was starting: under "
            "the 'spawn' and 'forkserver' start methods every worker imports the main "
            "module again, so the code that builds and executes the run must be guarded "
            'by `if __name__ == "__main__":`'
        )


def _check_picklable(fn: object, what: str) -> None:
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ValueError(
            f"{what} {fn!r} cannot be pickled by reference, so worker processes cannot "
            f"run it ({type(exc).__name__}: {exc}); define it at module level "
            "(not a lambda, closure or nested function)"
        ) from None


def _check_backend(backend: object, what: str) -> None:
    if not callable(getattr(backend, "create", None)):
        raise ValueError(
            f"{what} must be a backend such as jorbmp.dask.DaskBackend(...), "
            f"got {type(backend).__name__}"
        )


def validate_states(states: Sequence[State]) -> list[State]:
    """Check the states (``ValueError`` naming the state) and add `FAILED` if needed."""
    result = list(states)
    names: set[str] = set()
    for state in result:
        name = state.trigger_state
        if not isinstance(name, str) or not name:
            raise ValueError(f"state {name!r}: trigger_state must be a non-empty string")
        if name in names:
            raise ValueError(f"state {name!r} is declared twice (duplicate trigger_state)")
        names.add(name)
    for state in result:
        name = state.trigger_state
        if state.kind not in KINDS:
            raise ValueError(f"state {name!r}: kind must be one of {KINDS}, got {state.kind!r}")
        _check_recycling(state, state.backend)
        if state.terminal:
            if isinstance(state.concurrency, AdaptiveConcurrency):
                raise ValueError(
                    f"state {name!r} is terminal: it runs nothing, so AdaptiveConcurrency "
                    "has nothing to adapt"
                )
            continue
        if state.exec is None:
            raise ValueError(f"state {name!r} is not terminal and has no exec")
        if not callable(state.exec):
            raise ValueError(f"state {name!r}: exec must be callable")
        concurrency = state.concurrency
        if isinstance(concurrency, AdaptiveConcurrency):
            concurrency.check(name)
        elif isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise ValueError(
                f"state {name!r}: concurrency must be an int or AdaptiveConcurrency, got "
                f"{concurrency!r} ({type(concurrency).__name__})"
            )
        elif concurrency < 1:
            raise ValueError(f"state {name!r}: concurrency must be >= 1, got {concurrency}")
        _check_retry_delay(state)
        if state.max_retries is not None and state.max_retries < 0:
            raise ValueError(f"state {name!r}: max_retries must be >= 0 or None")
        is_coro = is_coroutine_function(state.exec)
        kind = state.resolved_kind()
        if is_coro and kind != "async":
            raise ValueError(
                f"state {name!r}: exec is a coroutine function but kind={kind!r}; "
                "use kind='async' (or 'auto')"
            )
        if kind == "async" and not is_coro:
            raise ValueError(f"state {name!r}: kind='async' needs an async def exec")
        if kind == "process":
            _check_picklable(state.exec, f"state {name!r}: exec")
        if state.backend is not None:
            if kind != "process":
                raise ValueError(
                    f"state {name!r}: backend= is for process states (kind={kind!r} runs "
                    "in the coordinator)"
                )
            _check_backend(state.backend, f"state {name!r}: backend")
        if state.timeout is not None:
            if kind == "thread":
                raise ValueError(
                    f"state {name!r}: timeout is supported for process and async states "
                    "(a thread cannot be interrupted)"
                )
            if state.timeout <= 0:
                raise ValueError(f"state {name!r}: timeout must be > 0, got {state.timeout}")
        make_gate(name, state.rate_limit)
        if state.error_state not in names and state.error_state != FAILED:
            raise ValueError(
                f"state {name!r}: error_state {state.error_state!r} is not a declared state"
            )
    needs_failed = any(not s.terminal and s.error_state == FAILED for s in result)
    if needs_failed and FAILED not in names:
        result.append(State(FAILED, terminal=True))
    return result
