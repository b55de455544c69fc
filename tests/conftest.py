"""Shared fixtures (status listeners that record what they see), and the test order."""

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the Dask tests last: a Dask client leaves threads running in this process
    (its IO loop), and every worker a later test forked would come from a process with
    threads in it, which Python 3.12+ warns may deadlock the child."""
    items.sort(key=lambda item: item.path.name.startswith("test_dask"))
