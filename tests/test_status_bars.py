"""`TqdmStatusListener` on terminals of every size, and reused for another run.

Whatever the terminal's size, tiny or unknown, something is drawn and the bars never
outnumber its rows: tqdm must show every bar the listener made ("... (more hidden)
..." replaced the only bar of a 2-row terminal), and a terminal that reports no size
is taken at ``LINES``. A listener reused after a run that left it behind (its output
paused longer than the end of `exec` waits) starts the next run with bars of its own.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import select
import struct
import termios
import threading
import time
from typing import Any

import msgspec
import pytest

from jorbmp import Processor, Run, State, StatusCount, TqdmStatusListener


def twelve() -> list[StatusCount]:
    """10 working states, then done and failed."""
    return [
        *(StatusCount(f"w{i}", waiting=1) for i in range(10)),
        StatusCount("done", terminal=True, completed=3),
        StatusCount("failed", terminal=True, completed=1),
    ]


def draw_on_pty(rows: int, columns: int, counts: list[StatusCount]) -> tuple[int, str]:
    """Bars made for ``counts`` on a pty of ``rows`` x ``columns``, and what they drew."""
    leader, follower = pty.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        with open(follower, "w", closefd=False) as tty:
            listener = TqdmStatusListener(file=tty)
            listener.status_update(counts)
            listener.status_update(counts)
            made = len(listener.bars)
            listener.close()
            tty.flush()
        data = b""
        while select.select([leader], [], [], 0.2)[0]:
            data += os.read(leader, 65536)
    finally:
        os.close(leader)
        os.close(follower)
    return made, data.decode(errors="replace")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 40])
def test_bars_fit_a_terminal_of_any_size_and_show(rows: int) -> None:
    made, text = draw_on_pty(rows, 100, twelve())
    # 64d858c: 12 bars on 1 row (tqdm reads 0 rows there and takes 20); on 2 rows one
    # bar, which tqdm replaced with "... (more hidden) ...".
    assert made == min(12, max(1, rows - 2)), made  # two rows free, as tqdm leaves
    assert "more hidden" not in text, text
    assert "job" in text, text  # a bar was drawn
    assert "(2 terminal states)" in text or "done" in text, text  # the run's progress


@pytest.mark.timeout(60)
def test_a_terminal_without_a_size_is_taken_at_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINES", "10")
    monkeypatch.setenv("COLUMNS", "100")
    made, text = draw_on_pty(0, 0, twelve())  # a fresh pty reports 0 x 0
    # 64d858c gave tqdm one row per state: 12 bars on a 10-row terminal.
    assert made == 8, made
    assert "more hidden" not in text, text
    assert "done" in text and "failed" in text, text


class Paused(io.StringIO):
    """A terminal whose output can stop draining (Ctrl-S) and resume (Ctrl-Q)."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = threading.Event()
        self.draining.set()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.draining.wait(30)
        return super().write(text)


class JC(msgspec.Struct):
    n: int = 0


def tstep(ac: Any, oc: Any, jc: JC) -> Any:
    time.sleep(0.005)
    return jc, "done"


def make_run(n: int) -> Run[None, JC]:
    run: Run[None, JC] = Run("bars")
    for i in range(n):
        run.add_job(JC(n=i))
    return run


@pytest.mark.timeout(90)
def test_a_listener_left_behind_draws_the_next_run_with_its_own_bars(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = Paused()
    listener = TqdmStatusListener(file=out, plain=False, ncols=120, nrows=30)
    first = [
        State("new", tstep, kind="thread", concurrency=4),
        State("resize", tstep, kind="thread", concurrency=4),
        State("done", terminal=True),
    ]
    second = [State("new", tstep, kind="thread", concurrency=4), State("done", terminal=True)]
    out.draining.clear()  # the first run's first update blocks: it is left behind
    try:
        with caplog.at_level(logging.WARNING, logger="jorbmp"):
            Processor(None, first, None, listener).exec(make_run(100))
            resumed = threading.Timer(0.3, out.draining.set)
            resumed.start()
            run = make_run(300)
            Processor(None, second, None, listener).exec(run)
            resumed.join()
    finally:
        out.draining.set()
    assert run.counts() == {"done": 300}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    # 64d858c kept the first run's bars, for 4 states: an IndexError in every update.
    assert errors == [], errors
    assert listener.bars == []  # the second run closed its bars
    text = out.getvalue()
    tail = text[text.rindex("resize") :]  # after the first run's bars were closed
    assert "300/300" in tail, tail[-2000:]  # the second run's last update was drawn


@pytest.mark.timeout(30)
def test_other_states_get_new_bars() -> None:
    out = io.StringIO()
    listener = TqdmStatusListener(file=out, plain=False, ncols=120)
    listener.status_update([StatusCount("new", waiting=2), StatusCount("resize"), *twelve()[-2:]])
    # Another run's states (as a listener shared by two runs sees them): 64d858c drew
    # them with the first layout, an IndexError here.
    listener.status_update([StatusCount("upload", waiting=2), *twelve()[-2:]])
    assert [bar.desc.strip() for bar in listener.bars] == ["upload", "done", "failed"]
    listener.close()
    assert listener.bars == []
