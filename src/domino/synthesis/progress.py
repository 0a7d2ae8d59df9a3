"""A progress bar for long synthesis runs: samples/s, tokens/s, ETA (rich)."""
from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class SynthesisProgress:
    def __init__(self, total: int, completed: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]synthesis"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[sps]:.2f} samples/s · {task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)
        self._task = self._progress.add_task("synthesis", total=total, completed=completed, sps=0.0, tps=0.0)

    def update(self, completed: int, samples_per_s: float, tokens_per_s: float) -> None:
        self._progress.update(self._task, completed=completed, sps=samples_per_s, tps=tokens_per_s)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
