"""Forward + backward of one layer's attention alone, at the 0.5B's heads (14 query heads, 2
key/value heads, head dim 64), bf16 inputs: transformers' SDPA attention (on a CPU its flash kernel)
with the boolean causal mask the objective's continuations pass, against
`train_step_attention.math_fp32`. Rows x queries x keys per shape, the queries at the end of the
keys; each variant's fastest of 3, two turns alternated.

    cd bench && PYTHONPATH=../src ../.venv/bin/python attention_micro.py [--shapes 16x128x256,9x256x320,4x512x576]
"""
import argparse
import time

import torch
from train_step_attention import math_fp32
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class Layer:  # what the attention functions read off the module
    num_key_value_groups = 7
    is_causal = True


def fwd_bwd_ms(fn, q, k, v, mask) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn(Layer, q, k, v, mask, scaling=64 ** -0.5)[0].float().square().sum().backward()
        best = min(best, time.perf_counter() - t)
        q.grad = k.grad = v.grad = None
    return 1000 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16x128x256,9x256x320,4x512x576,16x64x192")
    a = ap.parse_args()
    for shape in a.shapes.split(","):
        B, T, S = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        q = torch.randn(B, 14, T, 64, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, 2, S, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None].expand(B, 1, T, S)
        res = {"sdpa": [], "math_fp32": []}
        for _ in range(2):
            res["sdpa"].append(fwd_bwd_ms(sdpa_attention_forward, q, k, v, mask))
            res["math_fp32"].append(fwd_bwd_ms(math_fp32, q, k, v, mask))
        print(f"{shape}: " + "; ".join(f"{n} {', '.join(f'{x:.0f}' for x in t)} ms" for n, t in res.items()),
              flush=True)


if __name__ == "__main__":
    main()
