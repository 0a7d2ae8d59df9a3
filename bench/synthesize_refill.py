"""Continuous batching on synthesis's own workload: `HFEngine.generate_shared_many` (freed rows
refilled with the next seeds, which join at the cached prefix) against fixed batches of
`generate_shared` (what synthesis did before `engine.refill`), from the same domain tokens, same
seeds, same sampling, samples ending at EOS as in real use.

    PYTHONPATH=src .venv/bin/python bench/synthesize_refill.py \\
        --ckpt results/study_qwen/prompts/tuned_bounded_s0_lr3e-3/epoch_010/domain_prompt.safetensors \\
        [--n 96] [--batch 32] [--new 320] [--repeats 2]
    PYTHONPATH=src .venv/bin/python bench/synthesize_refill.py --magpie     # the magpie baseline's prefix

Defaults are the Qwen study's synthesis settings (embedded Qwen2.5-Coder-0.5B-Instruct, bf16 on a
CPU with bf16 kernels, T 0.8, top_p 0.95, at most 320 new tokens). The two paths run interleaved
(fixed, refill, fixed, refill, ...) so a change in the shared machine's load hits both; medians are
reported. "identical" counts samples equal token for token on both paths (a joined row's attention
carries a padding mask, which rounds differently; where that moves a near-tied token, the sample
continues differently from the same distribution).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from domino.core.backbone import load_backbone
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams, sample_seed


def interleave(paths: dict[str, Callable[[], list]], repeats: int, measure: Callable[[list], tuple[int, dict]]):
    """Time each path `repeats` times, interleaved (a load change on the shared machine hits every
    path); `measure(outputs)`, after the clock stops, gives (tokens, extra fields of the row).
    Returns (runs by path, the last outputs by path, median seconds by path)."""
    runs: dict[str, list[dict]] = {k: [] for k in paths}
    outs = {}
    for r in range(repeats):
        for name, fn in paths.items():
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            n_tok, extra = measure(out)
            row = {"seconds": round(dt, 2), "tokens": n_tok, "tok_s": round(n_tok / dt, 1), **extra}
            runs[name].append(row)
            outs[name] = out
            print(name, r, json.dumps(row), flush=True)
    return runs, outs, {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}


def save(res: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--ckpt", default=None, help="a trained domain prompt (default: 32 random vocabulary rows)")
    ap.add_argument("--magpie", action="store_true",
                    help="the magpie baseline's shared prefix (a chat template's empty user turn) instead")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=320)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthesize_refill.json"))
    args = ap.parse_args()
    bb = load_backbone(path=args.backbone)
    stop_ids, stops = (), ()
    if args.magpie:
        from domino.synthesis.methods import build_plan, stop_strings
        plan = build_plan({"name": "magpie"}, bb.tokenizer)
        stop_ids, stops = plan.stop_token_ids, tuple(stop_strings(plan))
        D = bb.embed(torch.tensor(plan.prefix_ids)).detach()
    elif args.ckpt:
        from domino.core.domain_prompt import check_backbone, load_domain_prompt
        prompt = load_domain_prompt(args.ckpt)
        check_backbone(prompt, bb.model_hash, bb.hidden_size, bb.id)
        D = prompt.tokens
    else:
        idx = torch.randint(0, bb.embed.weight.shape[0], (32,), generator=torch.Generator().manual_seed(0))
        D = bb.embed.weight[idx].detach().clone()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.new,
                            stop=stops, stop_token_ids=tuple(stop_ids))
    eng = HFEngine(bb.model, bb.tokenizer, params, batch_size=args.batch)
    prefix = eng.prefill(D)
    seeds = [sample_seed(0, i) for i in range(args.n)]
    eng.generate_shared(prefix, seeds[:2])  # warm-up

    def fixed():
        return [g for b in range(0, args.n, args.batch) for g in eng.generate_shared(prefix, seeds[b:b + args.batch])]

    def refill():
        return eng.generate_shared_many(prefix, seeds)

    def steps_reset(fn):
        def run():
            eng.n_forward = 0
            return fn()
        return run

    runs, outs, med = interleave({"fixed": steps_reset(fixed), "refill": steps_reset(refill)}, args.repeats,
                                 lambda gens: (sum(len(g.token_ids) for g in gens), {"decode_steps": eng.n_forward}))
    lengths = [len(g.token_ids) for g in outs["refill"]]
    res = {"model": bb.id, "dtype": bb.dtype, "ckpt": args.ckpt, "magpie": args.magpie,
           "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "n": args.n, "batch": args.batch,
           "max_new_tokens": args.new, "temperature": args.temperature, "top_p": args.top_p, "runs": runs,
           "median_seconds": med, "speedup_median": round(med["fixed"] / med["refill"], 3),
           "refill_tokens_mean": round(sum(lengths) / len(lengths), 1),
           "finish": dict(Counter(g.finish_reason for g in outs["refill"])),
           "identical": sum(a.token_ids == b.token_ids for a, b in zip(outs["fixed"], outs["refill"])),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    save(res, args.out)


if __name__ == "__main__":
    main()
