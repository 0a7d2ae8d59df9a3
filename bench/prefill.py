"""The prefill's last logits: transformers' `logits_to_keep=1` vs `generation.hf.last_logits`.

    .venv/bin/python bench/prefill.py [--batch 32] [--len 239]

One bf16 (dtype=auto) forward of random token ids through the embedded Qwen2.5-Coder-0.5B-Instruct,
each path timed once after a warm-up; prints seconds and the largest logit difference.
"""
import argparse
import time

import torch

from domino.core.backbone import load_backbone
from domino.core.generation.hf import last_logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--len", type=int, default=239)
    args = ap.parse_args()
    model = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct").model
    ids = torch.randint(0, 150000, (args.batch, args.len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids[:2, :16])
        t = time.perf_counter()
        ours, _ = last_logits(model, input_ids=ids, use_cache=False)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
        t_theirs = time.perf_counter() - t
    print(f"| path | prefill s ({args.batch} x {args.len}) |\n|---|---|\n| logits_to_keep=1 | {t_theirs:.1f} |\n"
          f"| last_logits | {t_ours:.1f} |\nmax abs difference {(ours - theirs).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
