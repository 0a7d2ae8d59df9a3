"""Decoding throughput against batch size on the embedded Qwen2.5-Coder-0.5B-Instruct (bf16 on a CPU
with bf16 kernels): the HF engine vs transformers' `generate(use_cache=True)`, greedy, equal outputs.

    .venv/bin/python bench/decode_batch.py [--batches 32 64 128] [--new 64] [--prompt 160]

Every row decodes exactly `--new` tokens (min = max new tokens) after a `--prompt`-token random
prompt (the same for every row of a batch: no padding), so every batch does the same work per
token. Reports tokens/s, the model FLOPs per decoded token (2 x non-embedding parameters + the
untied head, plus attention over the cache) and their rate against the bf16 matmul rate measured in
the same process; checks that the engine's greedy tokens equal generate's.

The square-product rate is not what a decoding step's matrix products can reach: at batch B each
weight matrix is read once to multiply only B rows, so they are bound by memory bandwidth. The
bench therefore also times the model's own weight matrices (every linear layer of the decoder and
the head) multiplied by B rows, one pass after another: `batch_matmul_gflops`, the rate the step's
linear work could reach with nothing else in the step, and `decode_frac_of_batch_matmul`, the
decoding steps' FLOPs over their time against it.

Three fractions of the matmul rate for the engine: `engine_frac_of_matmul` counts only the decoded
tokens' FLOPs over the whole call (prefill included in the time, not in the work);
`engine_all_frac_of_matmul` counts the prompt tokens' FLOPs too (2 x non-embedding parameters plus
causal attention each; the head once per row); `decode_frac_of_matmul` is the decoding steps alone
(`decode_s`: the engine's own clock of its decoding loop in that call, `HFEngine.decode_s`; the
prefill is `prefill_s`, and `other_s` the rest of the call, mostly packing the weights). Before
2026-12-05 (c) the prefill was timed by itself before the call and subtracted, which a slow first
prefill could turn into a decoding rate twice the real one.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from dtype import matmul_rate  # bench/dtype.py: GFLOP/s of a square product in that dtype

from domino.core.backbone import load_backbone
from domino.core.generation.hf import HFEngine
from domino.core.generation.packed import packed_linears
from domino.core.generation.params import SamplingParams


def flops_per_token(cfg, n_params_layers: int, ctx: int) -> float:
    h, V, nl = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    attn = 4 * nl * cfg.num_attention_heads * (h // cfg.num_attention_heads) * ctx
    return 2 * n_params_layers + 2 * h * V + attn


def batch_matmul_rate(model, rows: int, reps: int = 3, pack: bool = False, hint: int | None = None,
                      max_rows: int | None = None) -> float:
    """GFLOP/s of `rows` x in @ in x out products over every linear layer of the model (the
    decoder's and the head), in order: a decoding step's linear work with nothing else. `pack`:
    with the weights packed once for oneDNN (domino.core.generation.packed), as the engine runs them,
    for `hint` rows (default `rows`)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in layers}
    flops = sum(2 * rows * m.weight.numel() for m in layers)

    def one_pass():
        for m in layers:
            m(xs[m.in_features])

    with torch.no_grad(), packed_linears(model, hint or rows, enabled=pack, max_rows=max_rows):
        one_pass()
        t = time.perf_counter()
        for _ in range(reps):
            one_pass()
        return flops * reps / (time.perf_counter() - t) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--reps", type=int, default=1, help="times each (batch, packed) engine run is repeated, alternated")
    ap.add_argument("--packed", choices=["both", "auto", "false"], default="both",
                    help="the engine's packed_weights: both = a row with packed weights (auto) and one without")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_batch.json"))
    args = ap.parse_args()
    bb = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct")
    model, tok = bb.model, bb.tokenizer
    layers = sum(p.numel() for p in model.get_decoder().layers.parameters())
    peak = matmul_rate(model.dtype) * 1e9
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 100000, (args.prompt,), generator=g).tolist()
    fl = flops_per_token(model.config, layers, args.prompt + args.new // 2)
    rows = []
    modes = ["false", "auto"] if args.packed == "both" else [args.packed]
    generated = {}  # batch -> (generate's tokens, seconds): timed once per batch size
    for B, mode in [(B, m) for _ in range(args.reps) for B in args.batches for m in modes]:
        p = SamplingParams(temperature=0.0, max_new_tokens=args.new, min_new_tokens=args.new)
        eng = HFEngine(model, tok, p, batch_size=B, packed_weights=mode)
        batch_rate = batch_matmul_rate(model, B, pack=eng.pack) * 1e9
        eng.generate_prompts([prompt[:8]] * 2, [0, 0])  # warm-up
        pre0, dec0 = eng.prefill_s, eng.decode_s
        t = time.perf_counter()
        ours = eng.generate_prompts([prompt] * B, list(range(B)))
        dt = time.perf_counter() - t
        pre, dec = eng.prefill_s - pre0, eng.decode_s - dec0  # the engine's own split of this call
        cfg = model.config
        prompt_fl = B * (2 * layers * args.prompt + 4 * cfg.num_hidden_layers * cfg.hidden_size
                         * args.prompt * (args.prompt + 1) // 2) + B * 2 * cfg.hidden_size * cfg.vocab_size
        row = {"batch": B, "packed": eng.pack, "engine_s": round(dt, 2), "engine_tok_s": round(B * args.new / dt, 1),
               "engine_frac_of_matmul": round(B * args.new * fl / dt / peak, 3),
               "engine_all_frac_of_matmul": round((B * args.new * fl + prompt_fl) / dt / peak, 3),
               "prefill_s": round(pre, 2), "decode_s": round(dec, 2), "other_s": round(dt - pre - dec, 2),
               "decode_tok_s": round(B * args.new / dec, 1),
               "decode_frac_of_matmul": round(B * args.new * fl / dec / peak, 3),
               "batch_matmul_gflops": round(batch_rate / 1e9, 1),
               "batch_matmul_frac_of_matmul": round(batch_rate / peak, 3),
               "decode_frac_of_batch_matmul": round(B * args.new * fl / dec / batch_rate, 3)}
        if not args.skip_generate:
            if B not in generated:
                ids = torch.tensor([prompt] * B)
                with torch.no_grad():
                    t = time.perf_counter()
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                         max_new_tokens=args.new, min_new_tokens=args.new,
                                         pad_token_id=tok.pad_token_id)
                    generated[B] = (out[:, len(prompt):].tolist(), time.perf_counter() - t)
            theirs, gt = generated[B]
            row.update(generate_s=round(gt, 2), generate_tok_s=round(B * args.new / gt, 1),
                       speedup=round(gt / dt, 2), same_tokens=sum(a.token_ids == b for a, b in zip(ours, theirs)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"matmul_gflops_bf16": round(peak / 1e9, 1), "flops_per_token": fl, "prompt": args.prompt,
           "new": args.new, "rows": rows, "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"bf16 matmul {peak / 1e9:.0f} GFLOP/s; {fl / 1e9:.2f} GFLOP per decoded token")


if __name__ == "__main__":
    main()
