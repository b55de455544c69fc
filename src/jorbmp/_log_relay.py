"""Worker logs reach the coordinator's logging: what an exec logs in a worker process
is handled by the application's handlers, in the coordinator, under every start
method.

::

    coordinator                                worker
    -----------                                ------
    levels_now() -> WorkerSpec.log_levels ---> install(): drop inherited handlers,
                                               set the same levels, one WorkerRelay
                                               on the root logger
                                               exec: log.info(...) -> Logger filters
                                               by level (nothing built if disabled)
                                               -> WorkerRelay.emit: queue a LogLine
                                       <---    Logs, before the chunk's Results (or
                                               at once: see `WorkerRelay.emit`)
    LogReceiver.receive: per record, if the
    coordinator's logger is enabled for it,
    logging.getLogger(name).handle(record)
    with jorbmp_state, jorbmp_job

- Filtering happens in the worker, with the coordinator's levels (taken when the
  state's pool is made, as `exec` starts): a suppressed record costs what
  ``logger.debug`` costs when disabled (a cached level check), and an exec that logs
  nothing costs nothing: a worker checks whether its queue is empty once per chunk
  of results.
- A record travels as text: its message with the arguments applied, its exception
  formatted (``exc_text``); the arguments themselves may not travel (not picklable)
  and are never sent.
- Inherited handlers are removed from every logger in a worker (under ``fork`` they
  are the application's, and would write too: each record twice), and every logger
  propagates to the root, where the relay is: the coordinator applies its own
  loggers' ``propagate`` when it handles the record.
- Memory is bounded: a message holds at most `MAX_RECORDS` records and `MAX_CHARS`
  characters; what does not fit is dropped and counted, and the coordinator logs
  how many were (a WARNING on the ``jorbmp`` logger).

The worker half (`install`, `WorkerRelay`) imports nothing of the coordinator; the
coordinator half (`levels_now`, `LogReceiver`) is plain logging code.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from ._execute import describe, printable
from ._protocol import EXECUTING, IDLE, SLOT_BATCH, SLOT_INDEX, SLOT_PHASE, LogLevels, LogLine, Logs

__all__ = ["LogReceiver", "WorkerRelay", "install", "levels_now"]

# Records and characters (messages and exception texts) one `Logs` message holds at
# most; a worker's queue holds no more, and what comes while it is full is dropped
# and counted. A queue ships with each chunk of results (every few ms of work), so
# only an exec that logs this much within one chunk, or within `SHIP_SECONDS` of one
# long exec, loses records; a runaway one costs at most this much memory per worker.
MAX_RECORDS = 1000
MAX_CHARS = 1 << 20
# Characters of one record's message (and of its exception text) kept; the rest is
# cut, and the cut says how much.
MAX_RECORD_CHARS = 64 * 1024
# A long exec's records ship at most this long after the oldest was queued (checked
# as records come), not only when the exec ends.
SHIP_SECONDS = 0.5
# Records at this level or above ship at once, with what is queued before them: what
# an exec logs just before its worker dies (``os._exit``, a crash) is not lost with it.
SHIP_AT_ONCE_LEVEL = logging.ERROR

_formatter = logging.Formatter()


def levels_now() -> LogLevels:
    """The coordinator's levels, as workers must filter (see `install`)."""
    levels: dict[str, int] = {}
    disabled: list[str] = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):  # (a PlaceHolder)
            continue
        if logger.level != logging.NOTSET:
            levels[name] = logger.level
        if logger.disabled:
            disabled.append(name)
    return LogLevels(logging.getLogger().level, levels, disabled, logging.root.manager.disable)


def install(levels: LogLevels, send: Callable[[bytes], None], slot: Any) -> WorkerRelay:
    """Make this worker's logging a relay to the coordinator: remove every handler it
    inherited, apply ``levels``, let every logger propagate to the root, and put a
    `WorkerRelay` there (which ``send``s to the coordinator; ``slot`` is the worker's
    status slot, for the job each record comes from)."""
    root = logging.getLogger()
    loggers = [root, *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
            logger.disabled = False
            logger.setLevel(logging.NOTSET)
    root.setLevel(levels.root)
    for name, level in levels.levels.items():
        logging.getLogger(name).setLevel(level)
    for name in levels.disabled:
        logging.getLogger(name).disabled = True
    logging.disable(levels.disable)
    relay = WorkerRelay(send, slot)
    root.addHandler(relay)
    # A process the exec forks inherits the relay, and with it this worker's socket:
    # its records must not interleave with this worker's messages.
    os.register_at_fork(after_in_child=relay.forget)
    return relay


class WorkerRelay(logging.Handler):
    """The worker's one handler: queues each record as a `LogLine` and ships the
    queue as one `Logs` message (`ship`).

    The worker ships it before each chunk of results and when it goes idle; a record
    ships itself (from whichever thread logs it) when the worker is idle (a thread
    the exec started, logging after it), at `SHIP_AT_ONCE_LEVEL` and above, or
    `SHIP_SECONDS` after the oldest queued one. The handler's lock (held around
    `emit` by ``Handler.handle``) guards the queue; `ship` takes it too.
    """

    def __init__(self, send: Callable[[bytes], None], slot: Any) -> None:
        super().__init__()
        self.send = send
        self.slot = slot
        self.queue: list[LogLine] = []
        self.chars = 0
        self.dropped = 0
        self.emitting = False  # in `emit`: a record logged meanwhile (by __str__) is dropped
        self.encode = msgspec.msgpack.Encoder().encode

    def __repr__(self) -> str:
        return f"<WorkerRelay queued={len(self.queue)} dropped={self.dropped}>"

    def emit(self, record: logging.LogRecord) -> None:
        if self.emitting:
            return  # logged while formatting a record: relaying it would recurse
        self.emitting = True
        try:
            self._queue(record)
        except Exception:  # a relay that fails must never fail the exec
            self.dropped += 1
        finally:
            self.emitting = False

    def _queue(self, record: logging.LogRecord) -> None:
        if self.queue and record.created - self.queue[0].created >= SHIP_SECONDS:
            self.ship()
        queue = self.queue  # (after `ship`, which starts a new one)
        if len(queue) >= MAX_RECORDS or self.chars >= MAX_CHARS:
            self.dropped += 1
            return
        message = _cut(_message(record))
        exc_text = record.exc_text
        if exc_text is None and record.exc_info:
            exc_text = _formatter.formatException(record.exc_info)
        if exc_text is not None:
            exc_text = _cut(printable(exc_text))
        stack = record.stack_info
        if stack is not None:
            stack = _cut(printable(stack))
        slot = self.slot
        phase = slot[SLOT_PHASE]
        index = int(slot[SLOT_INDEX]) if phase == EXECUTING else -1
        queue.append(
            LogLine(
                record.name, record.levelno, message, record.created, record.pathname,
                record.lineno, record.funcName, exc_text, stack,
                record.threadName, int(slot[SLOT_BATCH]), index,
            )
        )  # fmt: skip
        self.chars += len(message) + len(exc_text or "") + len(stack or "")
        if phase == IDLE or record.levelno >= SHIP_AT_ONCE_LEVEL:
            self.ship()

    def ship(self) -> None:
        """Send what is queued (and how many were dropped) as one `Logs` message."""
        with self.lock:  # type: ignore[union-attr]
            if not self.queue and not self.dropped:
                return
            logs = Logs(self.queue, self.dropped)
            self.queue, self.chars, self.dropped = [], 0, 0
            try:
                data = self.encode(logs)
            except UnicodeEncodeError:  # a lone surrogate somewhere (a file name)
                data = self.encode(_printable(logs))
            # OSError: the coordinator is gone (the worker sees it too); ValueError: over
            # the framing's limit (not with these bounds).
            with contextlib.suppress(OSError, ValueError):
                self.send(data)

    def forget(self) -> None:
        """In a process forked from the worker: let go of the relay (see `install`)."""
        self.queue, self.chars, self.dropped = [], 0, 0
        logging.getLogger().removeHandler(self)


def _message(record: logging.LogRecord) -> str:
    """The record's message, as ``getMessage`` makes it; or, when that raises (an
    argument whose ``__str__`` fails, a format that does not fit), a text that says so."""
    try:
        return printable(record.getMessage())
    except Exception as exc:
        try:
            what = repr(record.msg)
        except Exception:
            what = f"a {type(record.msg).__name__}"
        return printable(f"[jorbmp: this record's message cannot be formatted: {describe(exc)}; "
                         f"its format: {what}]")  # fmt: skip


def _cut(text: str) -> str:
    if len(text) <= MAX_RECORD_CHARS:
        return text
    return f"{text[:MAX_RECORD_CHARS]} [jorbmp: {len(text) - MAX_RECORD_CHARS} characters cut]"


def _printable(logs: Logs) -> Logs:
    """``logs`` with every text made encodable (see `jorbmp._execute.printable`)."""

    def fix(text: str | None) -> str | None:
        return None if text is None else printable(text)

    records = [
        msgspec.structs.replace(
            r,
            name=printable(r.name),
            pathname=printable(r.pathname),
            func=fix(r.func),
            stack_info=fix(r.stack_info),
            thread_name=fix(r.thread_name),
        )
        for r in logs.records
    ]
    return Logs(records, logs.dropped)


class LogReceiver:
    """The coordinator's half, one per process state: handles the records of `Logs`
    messages through the application's loggers, as if logged here, with two more
    attributes: ``jorbmp_state`` (the state) and ``jorbmp_job`` (the id of the job
    whose exec was running in that worker when it was logged; None outside an exec).

    Records are built by the application's record factory, if it set one; otherwise
    from a template (``LogRecord.__init__`` looks up the current thread, process and
    task, which here would be wrong anyway: a third of the cost of a record)."""

    __slots__ = ("_decode", "_files", "_loggers", "state")

    def __init__(self, state: str) -> None:
        self.state = state
        self._decode = msgspec.msgpack.Decoder(Logs).decode
        self._loggers: dict[str, logging.Logger] = {}
        self._files: dict[str, tuple[str, str]] = {}  # pathname: (filename, module)

    def receive(
        self,
        data: bytes,
        batches: Sequence[Sequence[Any]],
        completed: int,
        pid: int,
        process_name: str,
    ) -> None:
        """Handle the records of one `Logs` message from the worker process ``pid``
        (named ``process_name``), whose batches of jobs in flight are ``batches``, the
        first of them its batch number ``completed``."""
        logs = self._decode(data)
        factory = logging.getLogRecordFactory()
        plain = factory is logging.LogRecord
        loggers, state = self._loggers, self.state
        for line in logs.records:
            logger = loggers.get(line.name)
            if logger is None:
                logger = loggers[line.name] = logging.getLogger(line.name)
            if not logger.isEnabledFor(line.levelno):
                continue
            job = None
            k = line.batch - completed
            if line.index >= 0 and 0 <= k < len(batches) and line.index < len(batches[k]):
                job = batches[k][line.index].id
            if plain:
                record = self._record(line)
            else:
                record = factory(
                    line.name, line.levelno, line.pathname, line.lineno, line.message, None,
                    None, line.func, line.stack_info,
                )  # fmt: skip
                record.created = line.created
                record.msecs = (line.created - int(line.created)) * 1000
                record.relativeCreated = (line.created - _START) * 1000
                record.exc_text = line.exc_text
                record.threadName = line.thread_name
                record.thread = 0  # (its ident in the worker would mean nothing here)
            record.process = pid
            record.processName = process_name
            record.jorbmp_state = state
            record.jorbmp_job = job
            _handle(logger, record)
        if logs.dropped:
            self._dropped(logs.dropped, pid)

    def _record(self, line: LogLine) -> logging.LogRecord:
        """The `LogRecord` of ``line``, as ``LogRecord.__init__`` would make it."""
        record = _new_record(logging.LogRecord)
        files = self._files.get(line.pathname)
        if files is None:
            files = self._files[line.pathname] = _file_names(line.pathname)
        created = line.created
        record.__dict__ = {
            **_TEMPLATE,
            "name": line.name,
            "msg": line.message,
            "levelname": logging.getLevelName(line.levelno),
            "levelno": line.levelno,
            "pathname": line.pathname,
            "filename": files[0],
            "module": files[1],
            "exc_text": line.exc_text,
            "stack_info": line.stack_info,
            "lineno": line.lineno,
            "funcName": line.func,
            "created": created,
            "msecs": (created - int(created)) * 1000,
            "relativeCreated": (created - _START) * 1000,
            "thread": 0,  # (its ident in the worker would mean nothing here)
            "threadName": line.thread_name,
        }
        return record

    def _dropped(self, n: int, pid: int) -> None:
        logger = logging.getLogger("jorbmp")
        if not logger.isEnabledFor(logging.WARNING):
            return
        record = logger.makeRecord(
            "jorbmp", logging.WARNING, __file__, 0,
            "state %r: a worker (pid %d) dropped %d log records: more than %d records or "
            "%d characters within one chunk of results or %.1f s",
            (self.state, pid, n, MAX_RECORDS, MAX_CHARS, SHIP_SECONDS), None,
        )  # fmt: skip
        record.jorbmp_state = self.state
        record.jorbmp_job = None
        _handle(logger, record)


def _file_names(pathname: str) -> tuple[str, str]:
    """A record's ``filename`` and ``module``, as ``LogRecord.__init__`` makes them."""
    try:
        filename = os.path.basename(pathname)
        return filename, os.path.splitext(filename)[0]
    except (TypeError, ValueError, AttributeError):
        return pathname, "Unknown module"


_new_record = object.__new__
# Every attribute a record has in this version of Python (``taskName`` since 3.12),
# and when ``relativeCreated`` counts from (logging's import).
_template = logging.LogRecord("", logging.NOTSET, "", 0, "", None, None)
_TEMPLATE: dict[str, Any] = {**vars(_template), "args": None, "exc_info": None}
_START = _template.created - _template.relativeCreated / 1000


def _handle(logger: logging.Logger, record: logging.LogRecord) -> None:
    """``logger.handle(record)``; an application's handler or filter that raises must
    not end the run (the handlers report their own errors, as logging does)."""
    with contextlib.suppress(Exception):
        logger.handle(record)
