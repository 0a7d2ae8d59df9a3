"""The objective's training step under each attention implementation the backbone can run: SDPA
(on a CPU its flash kernel), SDPA restricted to its math backend, HF's eager attention, and two
fp32 ones registered here (`sdpa_fp32`: SDPA on fp32 copies of q/k/v; `math_fp32`: scores,
softmax and the product with V in fp32, the query heads of a key/value head as one matrix, no
repeat_kv), warm steps alternated in one process (rep r runs the list forwards when r is even, backwards when odd),
each step's time, loss and the relative distance of its D and S gradients from the first step's.

    cd bench && PYTHONPATH=../src ../.venv/bin/python train_step_attention.py [--shape 4x64x128] [--reps 3]
        [--backbone embedded:qwen2.5-coder-0.5b-instruct] [--dtype bfloat16] [--layout split]
        [--variants sdpa,math,eager,sdpa_fp32,math_fp32]

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

VARIANTS = ("sdpa", "math", "eager", "sdpa_fp32", "math_fp32")


def sdpa_fp32(module, query, key, value, attention_mask, **kw):
    """transformers' SDPA attention on fp32 copies of q/k/v (and of a float mask), output cast back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, w = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kw)
    return out.to(query.dtype), w


def math_fp32(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Attention with fp32 scores, softmax and product with V; the g query heads of each key/value
    head as one (g*T)-row matrix against that head's keys (no repeat_kv copy)."""
    B, H, T, d = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = H // Hkv
    sc = torch.matmul(query.float().reshape(B, Hkv, g * T, d), key.float().transpose(2, 3)).view(B, Hkv, g, T, S)
    sc = sc * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is None:  # causal, queries at the end of the keys
        sc = sc.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=sc.device).tril(S - T), float("-inf"))
    elif attention_mask.dtype == torch.bool:
        sc = sc.masked_fill(~attention_mask[:, :, None], float("-inf"))
    else:
        sc = sc + attention_mask[:, :, None].float()
    p = torch.softmax(sc, dim=-1).view(B, Hkv, g * T, S)
    out = torch.matmul(p, value.float()).view(B, H, T, d)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    for name, fn in (("sdpa_fp32", sdpa_fp32), ("math_fp32", math_fp32)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4x64x128")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", default="split")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    variants = a.variants.split(",")
    register()
    B, k, L = (int(x) for x in a.shape.lower().split("x"))
    model = load_backbone(path=a.backbone, dtype=a.dtype).model
    ids, am, D, S = step_inputs(model, B, k, L, 0)
    fn = functools.partial(cached_nll, layout=a.layout)
    ref, rows = None, []
    for r in range(a.reps):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            model.set_attn_implementation("sdpa" if v == "math" else v)
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
