"""The default objective path's two layouts (`objective.layout`) against each other in one process:
warm steps alternating (joint, split, split, joint, ...) at each shape, medians, every sample kept.

    python bench/train_step_layouts.py [--backbone embedded|embedded:qwen2.5-coder-0.5b-instruct]
                                       [--dtype float32|bfloat16] [--shapes 2x4x8,4x8x64] [--reps 5]

A shape BxKxL is B texts of L random tokens (full length), k = l = K soft tokens (random vocabulary
rows), paper form; one step = forward + backward. Prints which layout `auto` picks at each shape.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="embedded")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", default="2x4x8,4x8x64,4x16x128")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import functools

    from train_step import step_inputs, timed_step  # bench/train_step.py

    from domino.core.backbone import load_backbone
    from domino.training.objective_cached import cached_nll, resolve_layout

    model = load_backbone(path=a.backbone, dtype=a.dtype).model
    out = {}
    for shape in a.shapes.split(","):
        B, k, L = (int(x) for x in shape.lower().split("x"))
        ids, am, D, S = step_inputs(model, B, k, L)

        def step(layout: str) -> float:
            return timed_step(functools.partial(cached_nll, layout=layout), model, D, S, ids, am)[0]

        res = {"joint": [], "split": []}
        step("joint")
        step("split")  # warm-up of both
        for r in range(a.reps):
            for layout in (("joint", "split") if r % 2 == 0 else ("split", "joint")):
                res[layout].append(step(layout))
        med = {x: statistics.median(v) for x, v in res.items()}
        auto = resolve_layout("auto", "cpu", B, k, model.dtype.itemsize)
        out[shape] = {"samples": res, "median": med, "auto": auto}
        print(f"{shape}: joint {med['joint']:.3f} s, split {med['split']:.3f} s, joint/split "
              f"{med['joint'] / med['split']:.2f}x, auto picks {auto}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"backbone": a.backbone, "dtype": a.dtype, "reps": a.reps,
                                           "results": out}, indent=1))


if __name__ == "__main__":
    main()
