"""`TqdmStatusListener`: one tqdm bar per state, kept in place, closed when the run ends."""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

from .status import StatusCount, StatusListener

__all__ = ["TqdmStatusListener"]


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.1f}s"
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}us"


class TqdmStatusListener(StatusListener):
    """A progress bar per state, in the order the states were given.

    A working state's bar counts the execs it finished and shows how many jobs wait
    and execute, its mean exec time and CPU; a terminal state's bar counts the jobs
    that arrived in it out of all jobs in the run. Extra keyword arguments go to
    every ``tqdm`` (e.g. ``file=``, ``disable=``, ``mininterval=``).
    """

    def __init__(self, file: IO[str] | None = None, **tqdm_kwargs: Any) -> None:
        self.file = file
        self.tqdm_kwargs = tqdm_kwargs
        self.bars: list[tqdm] = []

    def status_update(self, counts: list[StatusCount]) -> None:
        if not self.bars:
            width = max(len(c.state) for c in counts)
            file = self.file if self.file is not None else sys.stderr
            self.bars = [
                tqdm(
                    desc=c.state.ljust(width),
                    total=None,
                    position=i,
                    leave=True,
                    file=file,
                    dynamic_ncols=True,
                    unit="job",
                    **self.tqdm_kwargs,
                )
                for i, c in enumerate(counts)
            ]
        total = sum(c.completed + c.executing + c.waiting for c in counts)
        for bar, c in zip(self.bars, counts, strict=True):
            if c.terminal:
                bar.total = total
                bar.n = c.completed
                bar.set_postfix_str(f"errors={c.errors}" if c.errors else "", refresh=False)
            else:
                bar.n = c.processed
                bar.set_postfix_str(
                    f"wait={c.waiting} exec={c.executing} mean={_fmt_seconds(c.mean_seconds)} "
                    f"cpu={c.cpu_percent:.0f}% err={c.errors}",
                    refresh=False,
                )
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars:
            bar.close()
        self.bars = []
