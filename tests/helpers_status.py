"""Listeners shared by the status-stream tests."""

from __future__ import annotations

import threading

from jorbmp import StatusCount, StatusListener


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
