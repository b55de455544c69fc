"""A coordinator whose logging is configured as an application's would be, executing
process states whose execs log (see test_worker_logs.py). Run as::

    python -c "import helpers_worker_logs as h; h.main()" METHOD DIR [SCENARIO]

It logs to ``DIR/app.log`` (root, INFO) and ``DIR/iso.log`` (logger ``app.iso``, which
does not propagate), then prints the run's counts as JSON. Each line of app.log says
which process wrote it (``coordinator`` or ``worker``), so that a test can tell a
relayed record from one an inherited handler wrote in a forked worker.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from jorbmp import Processor, Run, State

FORMAT = "%(written_by)s|%(levelname)s|%(name)s|%(jorbmp_state)s|%(jorbmp_job)s|%(message)s"
COORDINATOR = os.getpid()

log = logging.getLogger("app")
quiet = logging.getLogger("app.quiet")  # at WARNING: DEBUG and INFO suppressed
iso = logging.getLogger("app.iso")  # propagate=False, its own file


class LJ(msgspec.Struct):
    n: int
    what: str
    dir: str


class Marker:
    """An argument whose formatting leaves a file behind: it must never be formatted
    when its record is below the level."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __str__(self) -> str:
        Path(self.path).write_text("formatted")
        return "marker"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class WrittenBy(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.written_by = "coordinator" if os.getpid() == COORDINATOR else "worker"
        return True


def factory() -> None:
    """An ac_factory that logs: in each worker before it is ready, and here."""
    log.info("ac_factory in pid %d", os.getpid())


def logs(ac: Any, oc: Any, jc: LJ) -> Any:
    marker = os.path.join(jc.dir, f"marker-{jc.n}")
    log.info("job %d says hello", jc.n)
    log.debug("%s", Marker(marker))
    quiet.info("%s", Marker(marker))
    quiet.warning("job %d: a quiet logger's warning", jc.n)
    what = jc.what
    if what == "exception":
        try:
            {}["missing"]
        except KeyError:
            log.exception("job %d failed to look up", jc.n)
    elif what == "isolated":
        iso.warning("job %d: isolated", jc.n)
    elif what == "thread":

        def later() -> None:
            time.sleep(0.05)
            log.warning("job %d: from a thread, after its exec returned", jc.n)

        threading.Thread(target=later).start()
    elif what == "unprintable":
        log.info("job %d: %s", jc.n, Unprintable())
    elif what == "not utf-8":
        log.info("job %d: file %s", jc.n, os.fsdecode(b"caf\xe9.txt"))
    elif what == "jorbmp":
        logging.getLogger("jorbmp").warning("job %d: jorbmp's own logger", jc.n)
    elif what == "runaway":
        for i in range(5000):
            log.info("job %d: line %d", jc.n, i)
    elif what == "huge":
        log.info("job %d: huge %s end", jc.n, "x" * 200_000)
    elif what == "long":  # one exec logging over longer than a message waits
        for i in range(3):
            log.info("job %d: long exec, line %d", jc.n, i)
            time.sleep(0.3)
    elif what == "crash":
        log.error("job %d: about to die", jc.n)
        os._exit(3)
    elif what == "slow":
        time.sleep(1.0)
    return jc, "done"


WHATS = [
    "exception",
    "isolated",
    "thread",
    "unprintable",
    "not utf-8",
    "jorbmp",
    "huge",
    "slow",
]


def configure(directory: Path) -> None:
    handler = logging.FileHandler(directory / "app.log", encoding="utf-8")
    handler.setFormatter(
        logging.Formatter(FORMAT, defaults={"jorbmp_state": "-", "jorbmp_job": "-"})
    )
    handler.addFilter(WrittenBy())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    quiet.setLevel(logging.WARNING)
    iso_handler = logging.FileHandler(directory / "iso.log", encoding="utf-8")
    iso_handler.setFormatter(logging.Formatter(FORMAT, defaults={"written_by": "?"}))
    iso_handler.addFilter(WrittenBy())
    iso.addHandler(iso_handler)
    iso.propagate = False


def main() -> None:
    method, directory = sys.argv[1], Path(sys.argv[2])
    scenario = sys.argv[3] if len(sys.argv) > 3 else "all"
    configure(directory)
    whats = {"all": WHATS, "runaway": ["runaway"], "crash": ["crash", "long"]}[scenario]
    run: Run[None, LJ] = Run("logs", None, LJ)
    for n, what in enumerate(whats):
        run.add_job(LJ(n, what, str(directory)))
    states = [
        State("new", logs, concurrency=2, max_retries=0),
        State("done", terminal=True),
    ]
    context = multiprocessing.get_context(method)
    Processor(None, states, ac_factory=factory, mp_context=context).exec(run)
    logging.getLogger("app").info("coordinator: the run is over")
    print(json.dumps(run.counts()))
