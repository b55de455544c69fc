"""The checkpoint guard's timing, with its clock advanced by the test (no sleeping): when
it retries, when it gives up (space back exactly at the deadline, or just after), how
often it warns. The engine's behaviour on a real full disk is in test_disk_full.py."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from jorbmp import Run
from jorbmp._checkpoint_guard import WARN_EVERY_SECONDS, CheckpointGuard
from jorbmp.checkpoint._space import space_error
from jorbmp.checkpoint.base import Serializer
from jorbmp.errors import CheckpointSpaceError

TICK = 0.1  # the coordinator's housekeeping tick


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Disk(Serializer):
    """A serializer whose writes fail for lack of space while ``full``; it notes when
    the guard tried one."""

    def __init__(self, clock: Clock, interval: float = 1.0) -> None:
        self.path = Path("/disk/run.json")
        self.interval = interval
        self.full = True
        self.clock = clock
        self.tries: list[float] = []
        self.cost = 0.0  # seconds a try takes (the clock moves by that much)

    def flush(self, run: Run[Any, Any], final: bool = False) -> None:
        self.tries.append(self.clock.now)
        self.clock.now += self.cost
        if self.full:
            raise space_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
        self.writes += 1


class Guarded:
    def __init__(self, patience: float, interval: float = 1.0) -> None:
        self.clock = Clock()
        self.disk = Disk(self.clock, interval)
        self.changes: list[bool] = []
        self.given_up: list[CheckpointSpaceError] = []
        self.guard = CheckpointGuard(
            self.disk,
            patience,
            lambda: self.changes.append(self.guard.paused),
            self.given_up.append,
            self.clock,
        )
        self.run: Run[Any, Any] = Run("r", None)

    def tick_until(self, end: float) -> None:
        """Housekeeping ticks up to ``end`` (the clock moves first)."""
        while self.clock.now + TICK <= end + 1e-9:
            self.clock.now = round(self.clock.now + TICK, 6)
            self.guard.flush(self.run)


@pytest.mark.timeout(30)
def test_retries_every_interval_then_resumes() -> None:
    g = Guarded(patience=60.0)
    g.guard.flush(g.run)
    assert g.guard.paused and g.changes == [True]
    g.tick_until(2.95)
    assert g.disk.tries == [0.0, 1.0, 2.0]  # every interval, not every tick
    assert "paused" in g.guard.status() and "/disk/run.json" in g.guard.status()
    g.disk.full = False
    g.tick_until(3.05)
    assert not g.guard.paused and g.changes == [True, False]
    assert g.guard.status() == ""
    g.tick_until(3.5)
    assert g.disk.tries[-1] == 3.5  # back to the serializer's own pace: every tick
    assert not g.given_up


@pytest.mark.timeout(30)
def test_space_back_exactly_at_the_deadline_does_not_stop() -> None:
    g = Guarded(patience=2.5)
    g.guard.flush(g.run)
    g.tick_until(2.45)
    assert g.disk.tries == [0.0, 1.0, 2.0]
    g.disk.full = False  # back for the try at the deadline, 2.5 s after the first failure
    g.tick_until(2.5)
    assert g.disk.tries[-1] == 2.5
    assert not g.guard.paused and not g.given_up


@pytest.mark.timeout(30)
def test_space_back_just_after_the_deadline_stops_and_says_so() -> None:
    g = Guarded(patience=2.5)
    g.guard.flush(g.run)
    g.tick_until(2.5)
    assert len(g.given_up) == 1
    message = str(g.given_up[0])
    assert "/disk/run.json" in message and "checkpoint_patience=2.5" in message
    assert "No space left on device (ENOSPC)" in message
    g.tick_until(4.0)
    assert len(g.given_up) == 1  # once
    g.disk.full = False
    with pytest.raises(CheckpointSpaceError, match="final checkpoint was written"):
        g.guard.final_flush(g.run)


@pytest.mark.timeout(30)
def test_patience_zero_stops_at_the_first_failure(tmp_path: Path) -> None:
    """The error says what the file holds: the last checkpoint where there is one,
    else that nothing was saved."""
    for exists in (False, True):
        g = Guarded(patience=0.0)
        g.disk.path = tmp_path / "run.json"
        if exists:
            g.disk.path.write_text("{}")
        g.guard.flush(g.run)
        assert len(g.given_up) == 1
        said = "the file holds the last checkpoint" if exists else "nothing was saved"
        with pytest.raises(CheckpointSpaceError, match=said):
            g.guard.final_flush(g.run)


@pytest.mark.timeout(30)
def test_interval_zero_retries_every_tick() -> None:
    g = Guarded(patience=60.0, interval=0.0)
    g.guard.flush(g.run)
    g.tick_until(0.5)
    assert len(g.disk.tries) == 6


@pytest.mark.timeout(30)
def test_a_costly_try_is_spaced_out() -> None:
    """A try that takes 0.5 s of the loop (a JSON snapshot of a big run) is retried
    every 5 s, not every interval: at most ~10% of the loop goes to retrying."""
    g = Guarded(patience=60.0, interval=0.2)
    g.disk.cost = 0.5
    g.guard.flush(g.run)
    g.tick_until(20.0)
    gaps = [b - a for a, b in zip(g.disk.tries, g.disk.tries[1:], strict=False)]
    assert gaps and min(gaps) >= 5.0, gaps


@pytest.mark.timeout(30)
def test_warns_once_then_every_so_often(caplog: pytest.LogCaptureFixture) -> None:
    g = Guarded(patience=60.0, interval=0.2)
    with caplog.at_level(logging.INFO, logger="jorbmp"):
        g.guard.flush(g.run)
        g.tick_until(40.0)  # ~200 tries
        g.disk.full = False
        g.tick_until(40.5)
        g.disk.full = True  # a second episode soon after: INFO, not another WARNING
        g.tick_until(41.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(g.disk.tries) > 150  # (about every interval, at the tick after it)
    assert len(warnings) == 2 + int(40.0 // WARN_EVERY_SECONDS), warnings
    assert "dispatch paused" in warnings[0] and "resumed" in warnings[-1]
    assert any(r.levelno == logging.INFO and "paused" in r.getMessage() for r in caplog.records)
