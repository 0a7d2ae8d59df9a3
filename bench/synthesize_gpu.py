"""Synthesis on a CUDA GPU: domino's HF engine (shared prefix K/V cache, finished rows leave the
batch) against transformers' batched `model.generate(..., use_cache=True)`, same model, same
domain tokens, same batch.

    python bench/synthesize_gpu.py --model 0.5b --batches 64,256 --k 64 --new-tokens 128 --out synth.json

Model: a randomly initialised Qwen2.5-0.5B-shaped decoder (bench/train_step_gpu.py), bf16, SDPA;
tokenizer: the embedded SmolLM2 one (decoding only; ids past its vocabulary decode to nothing).
Every sample is forced to exactly `--new-tokens` tokens (min = max new tokens), so both sides
generate the same number of tokens. Timed: the whole call (prefix prefill included for the
engine; `generate` runs the k domain tokens once per row), CUDA-synchronised, median of
`--repeats` after one warm-up call.

- greedy: tokens/s, and agreement of the token sequences (every row continues the same D, so each
  side's rows are identical; reported: whether they are, and how many leading tokens the engine's
  row shares with generate's).
- sample: temperature 1, top_p 0.95: tokens/s only (the two samplers draw different random numbers).
- prompts (greedy, `--agree-prompts` rows): distinct left-padded token prompts of 8-32 random ids,
  `HFEngine.generate_prompts` vs `generate(input_ids, attention_mask)`: exact-match share and mean
  shared prefix, in bf16 and in fp32 (bf16 rounding alone flips near-tied argmaxes of a random model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from train_step_gpu import build_model  # noqa: E402

from domino.core.backbone import embedded_tokenizer_dir, load_tokenizer  # noqa: E402
from domino.core.generation.hf import HFEngine  # noqa: E402
from domino.core.generation.params import SamplingParams  # noqa: E402


def timed(fn, dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def shared_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--k", type=int, default=64, help="domain tokens")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agree-prompts", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(ROOT / "bench/results/synthesize_gpu.json"))
    a = ap.parse_args()
    dev, N = a.device, a.new_tokens
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    tok = load_tokenizer(embedded_tokenizer_dir())
    model = build_model(a.model, dev, dtype, "sdpa")
    g = torch.Generator().manual_seed(0)
    W = model.get_input_embeddings().weight.detach()
    D = W[torch.randint(0, W.shape[0], (a.k,), generator=g).to(dev)].clone()
    import transformers
    res = {"command": "python bench/synthesize_gpu.py " + " ".join(sys.argv[1:]),
           "machine": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                       "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu", "dtype": a.dtype},
           "model": a.model, "k": a.k, "new_tokens": N, "rows": []}

    def engine_run(B, greedy):
        sp = SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0 if greedy else 0.95,
                            max_new_tokens=N, min_new_tokens=N)
        e = HFEngine(model, tok, sp, batch_size=B)
        return [x.token_ids for x in e.generate_shared(e.prefill(D), list(range(B)))]

    def generate_run(B, greedy):
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0)
        with torch.no_grad():
            out = model.generate(inputs_embeds=D[None].expand(B, -1, -1).contiguous(),
                                 attention_mask=torch.ones(B, a.k, dtype=torch.long, device=dev),
                                 max_new_tokens=N, min_new_tokens=N, use_cache=True, eos_token_id=None,
                                 pad_token_id=0, **kw)
        return out.tolist()

    for B in (int(x) for x in a.batches.split(",")):
        for mode in ("greedy", "sample"):
            greedy = mode == "greedy"
            row = {"batch": B, "mode": mode}
            for name, fn in (("engine", engine_run), ("generate", generate_run)):
                try:
                    fn(min(B, 8), greedy)  # warm-up (kernels, allocator)
                    secs, outs = [], None
                    for _ in range(a.repeats):
                        outs, s = timed(lambda: fn(B, greedy), dev)
                        secs.append(s)
                    s = statistics.median(secs)
                    ntok = sum(len(o) for o in outs)
                    row[name] = {"seconds": s, "seconds_all": secs, "tokens": ntok, "tokens_per_s": ntok / s}
                    row[name + "_out"] = outs
                except Exception as e:  # record it; the other side still runs
                    row[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            if "tokens_per_s" in row.get("engine", {}) and "tokens_per_s" in row.get("generate", {}):
                row["speedup"] = row["engine"]["tokens_per_s"] / row["generate"]["tokens_per_s"]
                if greedy:
                    eo, go = row["engine_out"], row["generate_out"]
                    row["agreement"] = {
                        "engine_rows_identical": all(x == eo[0] for x in eo),
                        "generate_rows_identical": all(x == go[0] for x in go),
                        "exact_match_rows": sum(x == y for x, y in zip(eo, go)) / len(eo),
                        "shared_prefix_tokens_row0": shared_len(eo[0], go[0]), "of": N,
                        "distinct_tokens_row0": len(set(eo[0]))}
            row.pop("engine_out", None)
            row.pop("generate_out", None)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=2))

    # distinct prompts, greedy: per-row agreement, bf16 then fp32
    if a.agree_prompts:
        P = a.agree_prompts
        lens = torch.randint(8, 33, (P,), generator=g).tolist()
        prompts = [torch.randint(0, W.shape[0], (n,), generator=g).tolist() for n in lens]
        for dt in dict.fromkeys((a.dtype, "float32")):
            model.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[dt])
            sp = SamplingParams(temperature=0.0, max_new_tokens=N, min_new_tokens=N)
            e = HFEngine(model, tok, sp, batch_size=P)
            (eo, te) = timed(lambda: [x.token_ids for x in e.generate_prompts(prompts, list(range(P)))], dev)
            T = max(lens)
            ids = torch.zeros(P, T, dtype=torch.long, device=dev)
            am = torch.zeros(P, T, dtype=torch.long, device=dev)
            for i, p in enumerate(prompts):
                ids[i, T - len(p):] = torch.tensor(p, device=dev)
                am[i, T - len(p):] = 1
            with torch.no_grad():
                (go, tg) = timed(lambda: model.generate(input_ids=ids, attention_mask=am, do_sample=False,
                                                        max_new_tokens=N, min_new_tokens=N, use_cache=True,
                                                        eos_token_id=None, pad_token_id=0)[:, T:].tolist(), dev)
            agree = {"mode": "prompts", "dtype": dt, "rows": P,
                     "exact_match_rows": sum(x == y for x, y in zip(eo, go)) / P,
                     "mean_shared_prefix_tokens": statistics.mean(shared_len(x, y) for x, y in zip(eo, go)),
                     "of": N, "engine_s": te, "generate_s": tg}
            res["rows"].append(agree)
            print(json.dumps(agree), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=2))

    def fmt(d):
        return f"{d['tokens_per_s']:,.0f}" if "tokens_per_s" in d else d.get("error", "-")

    print("\n| batch | mode | engine tok/s | generate tok/s | speed-up | greedy agreement |")
    print("|---|---|---|---|---|---|")
    for r in res["rows"]:
        if r.get("mode") == "prompts":
            print(f"| {r['rows']} | distinct prompts, {r['dtype']} | - | - | - "
                  f"| {100 * r['exact_match_rows']:.0f}% rows identical, mean shared prefix "
                  f"{r['mean_shared_prefix_tokens']:.1f}/{r['of']} |")
            continue
        e, gg = r.get("engine", {}), r.get("generate", {})
        ag = r.get("agreement")
        ags = "-" if not ag else (f"row 0 shares {ag['shared_prefix_tokens_row0']}/{ag['of']} tokens, "
                                  f"{100 * ag['exact_match_rows']:.0f}% rows identical")
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"| {r['batch']} | {r['mode']} | {fmt(e)} | {fmt(gg)} | {sp} | {ags} |")


if __name__ == "__main__":
    main()
