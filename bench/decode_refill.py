"""Continuous batching (`HFEngine.generate_many`) against fixed batches (`generate_prompts`, what
evaluation does today) on evaluation's own workload: the embedded Qwen2.5-Coder-0.5B-Instruct
(bf16 on a CPU with bf16 kernels), greedy answers to the first `--problems` HumanEval problems in
the evalplus chat prompt, at most `--new` tokens, stopping at the code block's closing fence.

    .venv/bin/python bench/decode_refill.py [--problems 48] [--batch 32] [--new 512]
    .venv/bin/python bench/decode_refill.py --compare packed [--reps 2]
    .venv/bin/python bench/decode_refill.py --compare batch --batches 32 64 [--reps 1]

`--compare packed`: continuous batching with the engine's weights packed for oneDNN
(engine.packed_weights, domino.core.generation.packed) against without, alternated `--reps` times.
`--compare batch`: continuous batching at each of `--batches` rows (engine.batch_size), alternated.

Both paths admit prompts shortest first. Reports wall seconds, decoded tokens, tokens/s, decoding
steps and prefills for each (and the engine's own split of the time: prefills, decoding loop), and
how many answers are identical (bf16 rounding depends on which rows share a batch, so greedy
answers can differ where two tokens are nearly tied).
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from domino.core.backbone import load_backbone
from domino.core.benchmarks import load_benchmark
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams
from domino.evaluation.prompting import CLOSE_FENCE, build_prompt


def run(engine: HFEngine, fn, *args):
    engine.n_forward = engine.n_prefill = 0
    pre0, dec0 = engine.prefill_s, engine.decode_s
    t = time.perf_counter()
    gens = fn(*args)
    dt = time.perf_counter() - t
    n_tok = sum(len(g.token_ids) for g in gens)
    dec = engine.decode_s - dec0
    return gens, {"seconds": round(dt, 1), "tokens": n_tok, "tok_s": round(n_tok / dt, 1),
                  "decode_steps": engine.n_forward - engine.n_prefill, "prefills": engine.n_prefill,
                  "prefill_s": round(engine.prefill_s - pre0, 1), "decode_s": round(dec, 1),
                  "decode_tok_s": round(n_tok / dec, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--compare", choices=["fixed", "packed", "batch"], default="fixed")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64],
                    help="--compare batch: engine.batch_size values")
    ap.add_argument("--reps", type=int, default=2, help="--compare packed/batch: runs of each, alternated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = {"packed": "decode_refill_packed.json", "batch": "decode_refill_batch.json"}
    name = names.get(args.compare, "decode_refill.json")
    out = Path(args.out or Path(__file__).parent / "results" / name)
    bb = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct")
    tok = bb.tokenizer
    probs = load_benchmark("humaneval")[: args.problems]
    prompts = [list(tok(build_prompt(p, tok, True, "evalplus"), add_special_tokens=False)["input_ids"])
               for p in probs]
    seeds = list(range(len(prompts)))
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new, stop=(CLOSE_FENCE,))
    eng = HFEngine(bb.model, tok, params, batch_size=args.batch)
    eng.generate_prompts([prompts[0][:8]] * 2, [0, 0])  # warm-up

    if args.compare == "packed":
        return compare_packed(eng, bb, prompts, seeds, args, out)
    if args.compare == "batch":
        return compare_batch(bb, params, prompts, seeds, args, out)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def fixed():
        out = [None] * len(prompts)
        for b in range(0, len(order), args.batch):
            idx = order[b: b + args.batch]
            for i, g in zip(idx, eng.generate_prompts([prompts[i] for i in idx], [seeds[i] for i in idx])):
                out[i] = g
        return out

    fixed_gens, fixed_row = run(eng, fixed)
    print("fixed", json.dumps(fixed_row), flush=True)
    many_gens, many_row = run(eng, eng.generate_many, prompts, seeds)
    print("refill", json.dumps(many_row), flush=True)
    same = sum(a.token_ids == b.token_ids for a, b in zip(fixed_gens, many_gens))
    res = {"model": bb.id, "dtype": bb.dtype, "threads": torch.get_num_threads(), "problems": len(prompts),
           "batch": args.batch, "max_new_tokens": args.new, "fixed": fixed_row, "refill": many_row,
           "speedup": round(fixed_row["seconds"] / many_row["seconds"], 2), "identical_answers": same}
    write(out, res)


def write(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


def compare_packed(eng: HFEngine, bb, prompts, seeds, args, out: Path) -> None:
    if not eng.pack:
        raise SystemExit("this engine does not pack (engine.packed_weights=auto found no oneDNN bf16 here)")
    rows: dict[bool, list] = {False: [], True: []}
    gens = {}
    for _ in range(args.reps):
        for pack in (False, True):
            eng.pack = pack
            gens[pack], row = run(eng, eng.generate_many, prompts, seeds)
            rows[pack].append(row)
            print("packed" if pack else "unpacked", json.dumps(row), flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()}
    write(out, {"model": bb.id, "dtype": bb.dtype, "threads": torch.get_num_threads(), "problems": len(prompts),
                "batch": args.batch, "max_new_tokens": args.new, "unpacked": rows[False], "packed": rows[True],
                "speedup_of_medians": round(med[False] / med[True], 3),
                "identical_answers": sum(a.token_ids == b.token_ids for a, b in zip(gens[False], gens[True]))})


def compare_batch(bb, params: SamplingParams, prompts, seeds, args, out: Path) -> None:
    engines = {b: HFEngine(bb.model, bb.tokenizer, params, batch_size=b) for b in args.batches}
    rows: dict[int, list] = {b: [] for b in args.batches}
    gens = {}
    for _ in range(args.reps):
        for b, eng in engines.items():
            gens[b], row = run(eng, eng.generate_many, prompts, seeds)
            rows[b].append(row)
            print(f"batch {b}", json.dumps(row), flush=True)
    med = {b: statistics.median(r["seconds"] for r in v) for b, v in rows.items()}
    first = args.batches[0]
    write(out, {"model": bb.id, "dtype": bb.dtype, "threads": torch.get_num_threads(), "problems": len(prompts),
                "max_new_tokens": args.new, "packed": engines[first].pack, "runs": {str(b): v for b, v in rows.items()},
                "speedup_of_medians_vs_first": {str(b): round(med[first] / m, 3) for b, m in med.items()},
                "identical_to_first": {str(b): sum(a.token_ids == c.token_ids for a, c in zip(gens[first], g))
                                       for b, g in gens.items()}})


if __name__ == "__main__":
    main()
