"""Shared fixtures: status listeners that record what they see."""

from __future__ import annotations

import threading

import pytest

from jorbmp import StatusCount, StatusListener


class RecordingListener(StatusListener):
    """Keeps every update (thread-safe) and whether close() was called."""

    def __init__(self) -> None:
        self.updates: list[list[StatusCount]] = []
        self.closed = 0
        self._lock = threading.Lock()

    def status_update(self, counts: list[StatusCount]) -> None:
        with self._lock:
            self.updates.append(list(counts))

    def close(self) -> None:
        self.closed += 1

    def last(self) -> dict[str, StatusCount]:
        return {c.state: c for c in self.updates[-1]}


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()
