"""A progress bar for long synthesis runs: samples/s, tokens/s, ETA (rich)."""
from __future__ import annotations

from domino.core.progress import rich_progress


class SynthesisProgress:
    def __init__(self, total: int, completed: int = 0, enabled: bool = True):
        self.enabled = enabled
        rate = "{task.fields[sps]:.2f} samples/s · {task.fields[tps]:.0f} tok/s"
        self._progress = rich_progress("[bold]synthesis", rate, disable=not enabled)
        self._task = self._progress.add_task("synthesis", total=total, completed=completed, sps=0.0, tps=0.0)

    def update(self, completed: int, samples_per_s: float, tokens_per_s: float) -> None:
        self._progress.update(self._task, completed=completed, sps=samples_per_s, tps=tokens_per_s)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
