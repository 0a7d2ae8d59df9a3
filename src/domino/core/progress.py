"""The progress bars of every long loop: `rich_progress` (done / total, a throughput column, elapsed
and ETA; rich), which synthesis, evaluation and `Bar` use, and `Bar`, one bar for the loops that
have no bar of their own (embedding texts, ...). Off when `enabled=False` or DOMINO_PROGRESS=0."""
from __future__ import annotations

import os

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def rich_progress(description: str, rate: str, *, percent: bool = False, disable: bool = False) -> Progress:
    """A rich Progress with the columns every bar here shares: `description`, bar, done/total,
    (percent,) `rate` (a TextColumn format over the task's fields), elapsed, ETA."""
    middle = [TaskProgressColumn()] if percent else []
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), *middle, TextColumn(rate),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=disable)


class Bar:
    def __init__(self, description: str, total: int, unit: str = "items", enabled: bool = True,
                 completed: int = 0):
        self.enabled = enabled and os.environ.get("DOMINO_PROGRESS", "1") != "0"
        self._p = rich_progress(f"[bold]{description}", f"{{task.fields[rate]}} {unit}/s", percent=True,
                                disable=not self.enabled)
        self._t = self._p.add_task(description, total=total, completed=completed, rate="-")

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._t, n)
        speed = self._p.tasks[0].speed
        if speed:
            self._p.update(self._t, rate=f"{speed:.1f}")

    def __enter__(self) -> "Bar":
        self._p.start()
        return self

    def __exit__(self, *exc) -> None:
        self._p.stop()
