"""How far a bf16 training step's gradients are from the same step in fp32: the default objective
path of this tree (and, with --rev, of an earlier commit) on a backbone run in bf16, against this
tree's path on the same backbone run in fp32, same inputs.

    python bench/grad_precision.py [--rev 3edd826] [--backbone embedded:qwen2.5-coder-0.5b-instruct]
                                   [--shape 4x16x64] [--attn sdpa,eager]

Prints the loss of each and the relative error ||g - g_fp32|| / ||g_fp32|| of the gradients of D
and S: the scale against which a change's effect on bf16 gradients is to be read. `--attn`: the
bf16 steps of this tree under each listed attention implementation (the fp32 reference runs SDPA;
sdpa_fp32 and math_fp32 are bench/train_step_attention.py's).
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default=None, help="an earlier commit whose path is compared too")
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--shape", default="4x16x64")
    ap.add_argument("--attn", default="sdpa", help="comma list: attention implementations of the bf16 steps")
    a = ap.parse_args()

    from train_step import step_inputs, timed_step  # bench/train_step.py
    from train_step_ab import load_old
    from train_step_attention import register

    register()  # --attn may name sdpa_fp32 / math_fp32

    from domino.core.backbone import load_backbone
    from domino.training import objective_cached

    paths = {"this tree": objective_cached}
    if a.rev:
        paths[a.rev] = load_old(a.rev)
    B, k, L = (int(x) for x in a.shape.lower().split("x"))
    res = {}
    for dtype in ("float32", "bfloat16"):
        model = load_backbone(path=a.backbone, dtype=dtype).model
        ids, am, D, S = step_inputs(model, B, k, L)
        runs = [("this tree", objective_cached, "sdpa")]
        if dtype == "bfloat16":
            runs = [(name, mod, "sdpa") for name, mod in paths.items()]
            runs += [(f"this tree, {at}", objective_cached, at) for at in a.attn.split(",") if at != "sdpa"]
        for name, mod, attn in runs:
            model.set_attn_implementation(attn)
            _, loss = timed_step(mod.cached_nll, model, D, S, ids, am)
            res[(dtype, name)] = (loss, D.grad.clone(), S.grad.clone())
        del model
    ref = res[("float32", "this tree")]

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    out = {"backbone": a.backbone, "shape": a.shape, "fp32_loss": ref[0], "bf16": {}}  # names: path[, attention]
    for (dtype, name), (loss, gD, gS) in res.items():
        if dtype == "bfloat16":
            out["bf16"][name] = {"loss": loss, "gD_rel_err": rel(gD, ref[1]), "gS_rel_err": rel(gS, ref[2])}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
