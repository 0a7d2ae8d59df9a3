"""Two parts of a batch-64 decoding step on the 0.5B's shapes, timed against the alternatives tried
(bf16, random inputs, medians are not needed: each is the mean of `--n` calls after one warm-up):

- attention of one query token: transformers' packed grouped-query SDPA call (q 64 x 2 x 7 x 64
  against `--keys` cached keys, a boolean mask; keys/values as the engine's buffered views, strided,
  and contiguous) against the same attention by hand (bf16 matmuls, fp32 softmax);
- the greedy pick over 64 x 151,936 logits: the engine's fp32 copy of the head's bf16 output plus
  `max(-1)`, against `max(-1)` on the bf16 output itself (the same index: the conversion is exact).

    cd bench && PYTHONPATH=../src ../.venv/bin/python decode_step_parts.py [--keys 200]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(f, n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - t) / n * 1e3, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    torch.manual_seed(0)
    B, Hk, G, D, T, V = 64, 2, 7, 64, a.keys, 151936
    q = torch.randn(B, Hk, G, D, dtype=torch.bfloat16)
    kb, vb = (torch.randn(B, Hk, T + 256, D, dtype=torch.bfloat16) for _ in range(2))
    k, v = kb[:, :, :T], vb[:, :, :T]  # views of buffers with spare columns, as BufferedLayer's
    kc, vc = k.contiguous(), v.contiguous()
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)

    def by_hand(k, v):
        s = torch.matmul(q, k.transpose(-1, -2)).float() * D ** -0.5
        return torch.matmul(torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(torch.bfloat16), v)

    head = torch.randn(B, V).to(torch.bfloat16)
    buf = torch.empty(B, V)
    with torch.no_grad():
        res = {"attention_ms": {
            "sdpa_buffered_views": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), a.n),
            "sdpa_contiguous": timed(lambda: F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask), a.n),
            "by_hand_buffered_views": timed(lambda: by_hand(k, v), a.n),
            "by_hand_contiguous": timed(lambda: by_hand(kc, vc), a.n)},
            "greedy_pick_ms": {
            "fp32_copy": timed(lambda: buf.copy_(head), a.n),
            "max_fp32": timed(lambda: buf.max(-1).indices, a.n),
            "max_bf16": timed(lambda: head.max(-1).indices, a.n)},
            "same_index": bool(torch.equal(buf.copy_(head).max(-1).indices, head.max(-1).indices)),
            "keys": T, "threads": torch.get_num_threads()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
