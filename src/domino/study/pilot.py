"""A study's pilot (`study.pilot`): before any SFT compute is spent, a short DOMINO run of each
regime, with the diagnostics after every epoch, answers two questions: do the sample tokens move
(`s_drift` > `rule.min_s_drift`), and has training made a reference more likely under its own
sample tokens than under D alone: gain = l(x_i|D) - l(x_i|D,S_i) (`nll_dom_train` - `nll_pos`)
above `rule.margin` nats at the pilot's end AND above its value at init by more than the margin
(at init, random N(0,1) sample tokens already lower l(x_i|.) by ~0.015 nats on the 0.5B: extra
prefix positions, not learning). A regime whose pilot answers yes to both "works"; the loop's
DOMINO and soft-prompt arms use the first working regime in `pilot.prefer`, else `pilot.fallback`
(study.pilot.chosen_regime).

    pilot:
      epochs: 3
      regimes: {released: {config: released_domino, lr: [1.0e-3, 1.0e-3]}, tuned: {...}}
      rule: {margin: 0.01, min_s_drift: 1.0e-3}
      prefer: [tuned, released]
      fallback: released
"""
from __future__ import annotations

import json
import shutil
import time
from typing import TYPE_CHECKING

from domino.core.records import write_text_atomic
from domino.study.tasks import Task

if TYPE_CHECKING:
    from domino.study.run import Study

VERDICT = "pilot verdict"


def pilot_tasks(study: "Study", n_refs: int, seq: int) -> list[Task]:
    p = study.s.pilot
    epochs = int(p.epochs)
    tasks, names = [], []
    for regime, spec in p.regimes.items():
        config, lr = str(spec.config), (float(spec.lr[0]), float(spec.lr[1]))
        out = study.work / "pilot" / regime
        marker = study.dir / "pilot" / f"{regime}.json"

        def run(regime=regime, config=config, lr=lr, out=out, marker=marker) -> None:
            from domino.core.config import compose
            from domino.stages import run as run_stage
            if out.exists():
                shutil.rmtree(out)
            t0 = time.perf_counter()
            ov = study.train_overrides(config, study.seeds_of(config)[0], lr, run=out, epochs=epochs,
                                       points=list(range(1, epochs + 1)))
            run_stage("train", compose("train", ov))
            study._collect_diagnostics(config, study.seeds_of(config)[0], lr, out, marker)
            study._record_time(f"pilot {regime}", time.perf_counter() - t0)

        batch = int(study._train_value("data.batch_size", 4))
        tasks.append(Task(f"pilot {regime}", "pilot", epochs * n_refs * seq * 3 * (batch + 1), run, marker.exists,
                          rank=4))
        names.append(tasks[-1].name)
    tasks.append(Task(VERDICT, "pick", 0.0, lambda: write_verdict(study), (study.dir / "pilot.json").exists,
                      lambda: list(names), rank=4))
    return tasks


def verdict(points: list[dict], rule: dict) -> dict:
    """Whether the sample tokens work, read off the pilot's first (init) and last diagnostics points."""
    first, last = points[0], points[-1]
    margin, min_drift = float(rule.get("margin", 0.01)), float(rule.get("min_s_drift", 1e-3))

    def gain(p: dict) -> float | None:
        return (p["nll_dom_train"] - p["nll_pos"]) if p.get("nll_pos") is not None else None

    g0, g = gain(first), gain(last)
    moved = last.get("s_drift") is not None and last["s_drift"] > min_drift
    better = g is not None and g0 is not None and g > margin and g - g0 > margin
    return {"epoch": last["epoch"], "nll_dom_train": last["nll_dom_train"], "nll_pos": last.get("nll_pos"),
            "nll_neg": last.get("nll_neg"), "s_drift": last.get("s_drift"),
            "s_move_max_std": last.get("s_move_max_std"), "d_drift": last.get("d_drift"),
            "pos_gain_over_dom": g, "pos_gain_at_init": g0, "s_moved": bool(moved),
            "own_text_more_likely": bool(better), "works": bool(moved and better)}


def write_verdict(study: "Study") -> dict:
    p = study.s.pilot
    out = {"rule": dict(p.rule), "prefer": list(p.prefer), "fallback": str(p.fallback), "regimes": {}}
    for regime in p.regimes:
        diag = json.loads((study.dir / "pilot" / f"{regime}.json").read_text())
        out["regimes"][regime] = {**verdict(diag["points"], dict(p.rule)), "lr": [diag["lr_domain"], diag["lr_sample"]],
                                  "points": diag["points"]}
    working = [r for r in p.prefer if out["regimes"].get(r, {}).get("works")]
    out["chosen"] = working[0] if working else str(p.fallback)
    out["why"] = (f"{out['chosen']}: the first regime in {list(p.prefer)} whose sample tokens work" if working
                  else f"no regime's sample tokens work: the fallback, {p.fallback}")
    write_text_atomic(study.dir / "pilot.json", json.dumps(out, indent=1))
    return out


def chosen_regime(study: "Study") -> str:
    """The regime the loop's trained arms use; RuntimeError until the pilot's verdict exists.
    A study without a pilot uses `study.sft.regime` as given."""
    fixed = str(study.s.sft.get("regime") or "auto")
    if fixed != "auto":
        return fixed
    path = study.dir / "pilot.json"
    if not path.exists():
        raise RuntimeError("the pilot has not chosen the regime yet")
    return json.loads(path.read_text())["chosen"]
