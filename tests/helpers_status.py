"""Listeners shared by the status-stream tests."""

from __future__ import annotations

import threading

import msgspec

from jorbmp import Run, StatusCount, StatusListener


class JC(msgspec.Struct):
    n: int = 0


def make_run(n: int, name: str = "status") -> Run[None, JC]:
    """A run of ``n`` jobs in state "new"."""
    run: Run[None, JC] = Run(name)
    for i in range(n):
        run.add_job(JC(n=i))
    return run


class StuckAfterFirst(StatusListener):
    """Takes the first update, then blocks in every later one until released (60 s at
    most, so that a test that forgets to release it still ends)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.closed = 0

    def status_update(self, counts: list[StatusCount]) -> None:
        self.calls += 1
        if self.calls > 1:
            self.release.wait(60)

    def close(self) -> None:
        self.closed += 1


class Recorder(StatusListener):
    """Keeps every status update it gets."""

    def __init__(self) -> None:
        self.updates: list[list[StatusCount]] = []

    def status_update(self, counts: list[StatusCount]) -> None:
        self.updates.append(counts)
