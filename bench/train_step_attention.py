"""The objective's training step under each attention implementation the backbone can run: SDPA
(on a CPU its flash kernel), SDPA restricted to its math backend, and HF's eager attention, warm
steps alternated in one process (rep r runs the list forwards when r is even, backwards when odd),
each step's time, loss and the relative distance of its D and S gradients from the first step's.

    cd bench && PYTHONPATH=../src ../.venv/bin/python train_step_attention.py [--shape 4x64x128] [--reps 3]
        [--backbone embedded:qwen2.5-coder-0.5b-instruct] [--dtype bfloat16] [--layout split]

The first step of the process (whichever variant) is also its cold one: read the later ones.
"""
import argparse
import contextlib
import functools
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from train_step import step_inputs, timed_step

from domino.core.backbone import load_backbone
from domino.training.objective_cached import cached_nll

VARIANTS = ("sdpa", "math", "eager")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4x64x128")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", default="split")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    B, k, L = (int(x) for x in a.shape.lower().split("x"))
    model = load_backbone(path=a.backbone, dtype=a.dtype).model
    ids, am, D, S = step_inputs(model, B, k, L, 0)
    fn = functools.partial(cached_nll, layout=a.layout)
    ref, rows = None, []
    for r in range(a.reps):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            model.set_attn_implementation("eager" if v == "eager" else "sdpa")
            ctx = sdpa_kernel(SDPBackend.MATH) if v == "math" else contextlib.nullcontext()
            with ctx:
                s, loss = timed_step(fn, model, D, S, ids, am)
            g = (D.grad.clone(), S.grad.clone())
            ref = ref or g
            diff = [((x - y).norm() / y.norm()).item() for x, y in zip(g, ref)]
            rows.append({"variant": v, "rep": r, "step_s": s, "loss": loss, "grad_rel_diff": diff})
            print(f"{v}: {s:.2f} s, loss {loss:.6f}, D/S gradients {diff[0]:.2e} / {diff[1]:.2e} "
                  "from the first step's", flush=True)
    out = {"shape": a.shape, "backbone": a.backbone, "dtype": a.dtype, "layout": a.layout,
           "threads": torch.get_num_threads(), "steps": rows}
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
