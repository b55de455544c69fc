"""Shared fixtures (status listeners that record what they see), the test order, and
the Dask tests' lost-worker timeout."""

from __future__ import annotations

import os
import threading

import pytest

from jorbmp import StatusCount, StatusListener

# A LocalCluster closes a worker's nanny for good when no worker of that name is
# registered `lost-worker-timeout` (15 s) after one of its removals: a worker death or
# a client.restart() 15 s after an earlier one, while that worker is still coming back,
# left the cluster a worker short forever (a run waiting for it hung; a later test of a
# module-scoped cluster timed out waiting for 2 workers). The Dask tests kill and
# restart workers on purpose, often: every worker they lose comes back. Dask reads it
# from the environment when first imported (and its workers inherit it).
os.environ.setdefault("DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT", "600s")


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
