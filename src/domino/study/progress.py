"""Progress of a study over its tasks, with an ETA from the throughput of the tasks run so far
(skipped tasks count as done but not towards the throughput). Also logged one line per task, so a
run in the background (no terminal) shows it in its log."""
from __future__ import annotations

import logging
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StudyProgress:
    def __init__(self, total_cost: float, enabled: bool = True):
        self.total, self.done, self.run_cost, self.run_time = max(total_cost, 1e-9), 0.0, 0.0, 0.0
        self._t0: float | None = None
        self._progress = Progress(TextColumn("[bold]study"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                  TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]} · {task.fields[now]}"),
                                  disable=not enabled)
        self._task = self._progress.add_task("study", total=self.total, eta="?", now="")

    def eta(self) -> str:
        if self.run_cost <= 0:
            return "?"
        return _hms((self.total - self.done) * self.run_time / self.run_cost)

    def skip(self, cost: float, name: str) -> None:
        self.done += cost
        self._progress.update(self._task, completed=self.done)
        log.info("study: %s already done, skipped", name)

    def start(self, name: str) -> None:
        self._t0 = time.perf_counter()
        self._progress.update(self._task, now=name, eta=self.eta())
        log.info("study: %s ... (%.0f%% done, ETA %s)", name, 100 * self.done / self.total, self.eta())

    def advance(self, cost: float) -> None:
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        self.done += cost
        if cost > 0:
            self.run_cost += cost
            self.run_time += dt
        self._progress.update(self._task, completed=self.done, eta=self.eta())
        log.info("study: task took %s (%.0f%% done, ETA %s)", _hms(dt), 100 * self.done / self.total, self.eta())

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
