"""A study's unit of work and the order tasks run in: each task knows whether it is done (a
marker file), what it needs first, and a rank; `schedule` picks the next one. Rerunning a study
skips what is done, so a stopped study (another session, another machine) continues."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _nothing() -> list[str]:
    return []


@dataclass
class Task:
    name: str                   # unique: other tasks name it in `needs`
    kind: str                   # train | pick | sample | pilot | curate | finetune | evaluate | report
    cost: float                 # relative cost (token passes), for the ETA
    run: Callable[[], Any] = field(repr=False)
    done: Callable[[], bool] = field(repr=False)
    needs: Callable[[], list[str]] = field(default=_nothing, repr=False)  # names that must be done first
    rank: int = 0               # among ready tasks the highest rank runs first (it lends it to its needs)


def schedule(tasks: list[Task], done: set[str]) -> Task | None:
    """The next task to run: among those not done whose needs are done, the highest effective
    rank (its own, or the highest of any pending task that needs it), then the earliest in the
    list. None when everything is done."""
    names = {t.name for t in tasks}
    pending = [t for t in tasks if t.name not in done]
    if not pending:
        return None
    needs = {t.name: t.needs() for t in pending}
    unknown = sorted({n for ns in needs.values() for n in ns} - names)
    if unknown:
        raise RuntimeError(f"study: tasks need {unknown}, which no task provides")
    rank = {t.name: t.rank for t in tasks}
    changed = True
    while changed:  # lend each pending task's rank to what it needs (a DAG: this terminates)
        changed = False
        for t in pending:
            for n in needs[t.name]:
                if rank[n] < rank[t.name]:
                    rank[n], changed = rank[t.name], True
    ready = [(i, t) for i, t in enumerate(pending) if all(n in done for n in needs[t.name])]
    if not ready:
        raise RuntimeError("study: no task can run; waiting: " + ", ".join(
            f"{t.name} (needs {[n for n in needs[t.name] if n not in done]})" for t in pending[:5]))
    return max(ready, key=lambda it: (rank[it[1].name], -it[0]))[1]
