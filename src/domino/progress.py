"""One progress bar for the long loops that have no bar of their own (embedding texts, ...):
done / total, throughput, elapsed and ETA (rich). Off when `enabled=False` or DOMINO_PROGRESS=0."""
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


class Bar:
    def __init__(self, description: str, total: int, unit: str = "items", enabled: bool = True,
                 completed: int = 0):
        self.enabled = enabled and os.environ.get("DOMINO_PROGRESS", "1") != "0"
        self._p = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                           TaskProgressColumn(), TextColumn(f"{{task.fields[rate]}} {unit}/s"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
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
