"""Curation's responses stage with and without continuous batching: `HFChatGenerator` as curation
builds it (the responses template of conf/curation/default.yaml, greedy, at most `--new` tokens),
on synthesized problems (`--samples`, default the Qwen study's DOMINO samples), in calls of
`batch_size` records decoded as one fixed batch (`engine.refill=false`, what curation did) against
calls of `chunk` records decoded `batch_size` rows at a time with refill (the default now).

    PYTHONPATH=src .venv/bin/python bench/curate_refill.py [--n 32] [--batch 8] [--chunk 32] [--new 768]
    PYTHONPATH=src .venv/bin/python bench/curate_refill.py --batches 8 32 [--n 32]

`--batches`: continuous batching only, one path per batch size (`generation.batch_size`), each in
calls of 4 x batch_size records (curation's default chunk), instead of fixed against refill.

Interleaved (fixed, refill, ...) so load changes hit both; reports seconds, tokens, tokens/s and how
many responses are identical (bf16 rounding depends on which rows share a batch).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omegaconf import OmegaConf
from synthesize_refill import interleave, save  # bench/synthesize_refill.py

from domino.core.backbone import load_backbone
from domino.core.generation.chat import HFChatGenerator
from domino.curation.responses import build_conversation

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--samples", default=str(ROOT / "results/study_qwen/samples/released_domino_s0_e10.jsonl"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--new", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="compare these batch sizes (refill, chunk 4 x batch) instead of fixed vs refill")
    ap.add_argument("--out", default=str(ROOT / "bench/results/curate_refill.json"))
    args = ap.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/curation/default.yaml"))["responses"]
    texts = [json.loads(x)["text"] for x in Path(args.samples).read_text().splitlines()[: args.n]]
    convs = [build_conversation(t, cfg["template"], cfg.get("system")) for t in texts]
    bb = load_backbone(path=args.backbone)
    sampling = {"temperature": 0.0, "max_new_tokens": args.new}
    if args.batches:
        gens = {f"batch_{b}": (HFChatGenerator(bb, sampling=sampling, batch_size=b, refill=True), 4 * b)
                for b in args.batches}
    else:
        gens = {"fixed": (HFChatGenerator(bb, sampling=sampling, batch_size=args.batch), args.batch),
                "refill": (HFChatGenerator(bb, sampling=sampling, batch_size=args.batch, refill=True), args.chunk)}
    next(iter(gens.values()))[0](convs[:1])  # warm-up

    def path(gen, per_call):
        return lambda: [x for s in range(0, len(convs), per_call) for x in gen(convs[s:s + per_call])]

    runs, outs, med = interleave({k: path(*v) for k, v in gens.items()}, args.repeats,
                                 lambda out: (sum(len(bb.tokenizer(x, add_special_tokens=False)["input_ids"])
                                                  for x in out), {}))
    res = {"model": bb.id, "dtype": bb.dtype, "samples": args.samples, "n": len(convs), "batch": args.batch,
           "chunk": args.chunk, "max_new_tokens": args.new, "runs": runs, "median_seconds": med,
           "speedup_median": {k: round(med[next(iter(med))] / v, 3) for k, v in med.items()},
           "identical_to_first": {k: sum(a == b for a, b in zip(outs[next(iter(outs))], o)) for k, o in outs.items()},
           "date": time.strftime("%Y-%m-%d %H:%M")}
    save(res, args.out)


if __name__ == "__main__":
    main()
