"""Where the time of top-p sampling goes: the HF engine decoding from a shared prefix (32 domain
tokens drawn from the vocabulary, as synthesis does) on the embedded Qwen2.5-Coder-0.5B-Instruct
(bf16 on a CPU with bf16 kernels), torch profiler over one batch.

    .venv/bin/python bench/profile_sampling.py [--batch 64] [--new 40] [--temperature 0.8] [--top-p 0.95]

Prints tokens/s, where the nucleus search ended, and the profiler's table.
`--ckpt <run>/domain_prompt.safetensors` samples from trained domain tokens instead.
`--repeats N` times N unprofiled batches instead (median; no table), and `--out F` writes them as
JSON; run it with `PYTHONPATH=<a checkout of an older commit>/src` for that commit's figure.
"""
import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from domino.core.backbone import load_backbone
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams


def search_end(eng):
    """Where the top-p search ended: a probability floor (the smallest of the last step's rows now,
    one for all rows at 98ef5d1) or a candidate count (3212542 and older)."""
    tau = getattr(eng, "_nucleus_tau", None)
    if isinstance(tau, dict):
        return min(tau.values(), default=None)
    return tau if tau is not None else getattr(eng, "_nucleus_k", None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--ckpt", default=None, help="a trained domain prompt (default: 32 random vocabulary rows)")
    ap.add_argument("--repeats", type=int, default=0, help="time this many unprofiled batches instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bb = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct")
    if args.ckpt:
        from domino.core.domain_prompt import load_domain_prompt
        D = load_domain_prompt(args.ckpt).tokens.to(bb.model.dtype)
    else:
        g = torch.Generator().manual_seed(0)
        D = bb.model.get_input_embeddings().weight[torch.randint(1000, 100000, (32,), generator=g)].detach().clone()
    p = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new,
                       min_new_tokens=args.new)
    eng = HFEngine(bb.model, bb.tokenizer, p, batch_size=args.batch)
    prefix = eng.prefill(D)
    eng.generate_shared(prefix, [0, 1])  # warm-up
    if args.repeats:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            gens = eng.generate_shared(prefix, list(range(args.batch)))
            times.append(time.perf_counter() - t)
        tokens = sum(len(g.token_ids) for g in gens)
        med = statistics.median(times)
        row = {"batch": args.batch, "new": args.new, "ckpt": args.ckpt, "temperature": args.temperature,
               "top_p": args.top_p, "seconds": times, "median_s": med, "tokens": tokens,
               "tok_s": tokens / med, "search_end": search_end(eng), "threads": torch.get_num_threads(),
               "domino": __import__("domino").__file__}
        print(json.dumps(row))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(row, f, indent=1)
        return
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate_shared(prefix, list(range(args.batch)))
    dt = time.perf_counter() - t
    print(f"{args.batch} rows x {args.new} tokens: {dt:.1f} s (profiled), {args.batch * args.new / dt:.0f} tok/s; "
          f"top-p search ended at: {search_end(eng)}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
