"""Before/after of the default objective path in one process: this tree's `cached_nll` against the
one in an earlier commit, warm steps alternating (old, new, new, old, ...) so that a machine whose
speed drifts (a shared VM) affects both alike; medians, and whether loss and gradients are the
same bits.

    python bench/train_step_ab.py --rev 351fe04 [--backbone embedded:qwen2.5-coder-0.5b-instruct]
                                  [--dtype bfloat16] [--shape 4x64x256] [--reps 3]

The earlier `src/domino/training/objective_cached.py` is read with `git show REV:PATH` and imported
beside this tree's (it must import only modules this tree still has).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = "src/domino/training/objective_cached.py"


def load_old(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:{PATH}"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    f = Path(tempfile.mkdtemp()) / "objective_cached_old.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("objective_cached_old", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the earlier commit")
    ap.add_argument("--backbone", default="embedded")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shape", default="4x64x256")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from train_step import step_inputs, timed_step  # bench/train_step.py

    from domino.core.backbone import load_backbone
    from domino.training import objective_cached as new

    old = load_old(a.rev)
    bb = load_backbone(path=a.backbone, dtype=a.dtype)
    model = bb.model
    B, k, L = (int(x) for x in a.shape.lower().split("x"))
    ids, am, D, S = step_inputs(model, B, k, L)

    def step(mod):
        return (*timed_step(mod.cached_nll, model, D, S, ids, am), D.grad.clone(), S.grad.clone())

    step(new)  # warm-up (first touch of the memory)
    res = {"old": [], "new": []}
    for r in range(a.reps):
        order = (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))
        for name, mod in order:
            res[name].append(step(mod))
            print(f"rep {r} {name}: {res[name][-1][0]:.2f} s", flush=True)
    med = {n: statistics.median(x[0] for x in res[n]) for n in res}
    same = all(torch.equal(o[i], n[i]) for o, n in zip(res["old"], res["new"]) for i in (2, 3)) and all(
        o[1] == n[1] for o, n in zip(res["old"], res["new"]))
    out = {"command": "python bench/train_step_ab.py " + " ".join(sys.argv[1:]), "rev": a.rev,
           "backbone": a.backbone, "dtype": str(model.dtype), "shape": a.shape, "threads": torch.get_num_threads(),
           "steps_s": {n: [x[0] for x in res[n]] for n in res}, "median_s": med,
           "speedup": med["old"] / med["new"], "same_loss_and_gradients": same}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("median_s", "speedup", "same_loss_and_gradients")}))


if __name__ == "__main__":
    main()
