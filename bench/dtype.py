"""fp32 vs bf16 on the CPU, side by side in one run: the training step, synthesis and evaluation
decoding, for the embedded Qwen2.5-Coder-0.5B-Instruct and SmolLM2-135M-Instruct.

    .venv/bin/python bench/dtype.py [--backbones qwen_coder_0_5b smollm2] [--dtypes float32 bfloat16]

Each (backbone, dtype) runs in a fresh subprocess, one after the other, on the same inputs:
- matmul: GFLOP/s of a (2048 x 2048) @ (2048 x 2048) product in that dtype (the machine's rate);
- train: one objective step (efficient path, paper form, forward + backward into fp32 soft tokens)
  at B=3, k=l=32, L=128 random tokens: one warm-up step, then the median of `--steps` steps;
- synthesis: the HF engine from 32 domain tokens (random vocabulary rows), batch 32, exactly 64
  new tokens per sample (min = max), temperature 0.8, top_p 0.95;
- evaluation: the HF engine on the first 32 HumanEval problems as evaluate.py prompts them (chat,
  prompt.style=evalplus), greedy, exactly 96 new tokens each (min = max), batch 32.
Forcing every row to the same length makes the two dtypes do identical work. Writes
bench/results/dtype.json and prints the table pasted into bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"qwen_coder_0_5b": "embedded:qwen2.5-coder-0.5b-instruct", "smollm2": "embedded"}


def matmul_rate(dtype, n: int = 2048, reps: int = 8) -> float:
    import torch
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def child(backbone: str, dtype: str, steps: int) -> dict:
    import torch

    from domino.core.backbone import load_backbone
    from domino.core.benchmarks import load_benchmark
    from domino.core.generation.hf import HFEngine
    from domino.core.generation.params import SamplingParams, sample_seed
    from domino.evaluation.prompting import build_prompt
    from domino.training.objective import combine
    from domino.training.objective_cached import cached_nll

    t = time.perf_counter()
    bb = load_backbone(path=PATHS[backbone], dtype=dtype)
    load_s = time.perf_counter() - t
    model, cfg, tok = bb.model, bb.model.config, bb.tokenizer
    out = {"backbone": backbone, "dtype": bb.dtype, "load_s": round(load_s, 2), "threads": torch.get_num_threads(),
           "matmul_gflops": round(matmul_rate(model.dtype), 1)}

    # training step
    g = torch.Generator().manual_seed(0)
    B, k, L = 3, 32, 128
    W = model.get_input_embeddings().weight.detach().float()
    D = W[torch.randint(0, W.shape[0], (k,), generator=g)].clone().requires_grad_()
    S = W[torch.randint(0, W.shape[0], (B * k,), generator=g)].view(B, k, -1).clone().requires_grad_()
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    am = torch.ones_like(ids)
    times, loss = [], None
    for i in range(steps + 1):
        D.grad = S.grad = None
        t = time.perf_counter()
        dom, mat = cached_nll(model, D, S, ids, am)
        loss = combine(dom, mat, form="paper")["loss"]
        loss.backward()
        if i:
            times.append(time.perf_counter() - t)
    out["train"] = {"B": B, "k": k, "l": k, "L": L, "step_s": round(statistics.median(times), 3),
                    "loss": round(loss.item(), 5), "steps": [round(x, 3) for x in times]}

    # synthesis: 32 samples x 64 tokens from the domain tokens alone
    p = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=64, min_new_tokens=64)
    eng = HFEngine(model, tok, p, batch_size=32)
    t = time.perf_counter()
    gens = eng.generate_shared(eng.prefill(D.detach()), [sample_seed(0, i) for i in range(32)])
    dt = time.perf_counter() - t
    n = sum(len(x.token_ids) for x in gens)
    out["synthesis"] = {"samples": 32, "tokens": n, "s": round(dt, 2), "tokens_per_s": round(n / dt, 1)}

    # evaluation: 32 HumanEval prompts, greedy
    probs = load_benchmark("humaneval")[:32]
    prompts = [list(tok(build_prompt(q, tok, True, "evalplus"), add_special_tokens=False)["input_ids"]) for q in probs]
    p = SamplingParams(temperature=0.0, max_new_tokens=96, min_new_tokens=96)
    eng = HFEngine(model, tok, p, batch_size=32)
    t = time.perf_counter()
    gens = eng.generate_prompts(prompts, [0] * len(prompts))
    dt = time.perf_counter() - t
    n = sum(len(x.token_ids) for x in gens)
    out["evaluation"] = {"prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "tokens": n,
                         "s": round(dt, 2), "tokens_per_s": round(n / dt, 1)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=list(PATHS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/dtype.json"))
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print("RESULT " + json.dumps(child(*args._child, args.steps)))
        return
    rows = []
    for b in args.backbones:
        for d in args.dtypes:
            r = subprocess.run([sys.executable, __file__, "--_child", b, d, "--steps", str(args.steps)],
                               capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{b} {d} failed:\n{r.stderr[-3000:]}")
            rows.append(json.loads(line[7:]))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
            "load_avg_1m_after": round(os.getloadavg()[0], 2), "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print("\n| backbone | dtype | matmul GFLOP/s | train step s (B3 k=l32 L128) | synthesis tok/s | evaluation tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['dtype']} | {r['matmul_gflops']} | {r['train']['step_s']} | "
              f"{r['synthesis']['tokens_per_s']} | {r['evaluation']['tokens_per_s']} |")
    for b in args.backbones:
        by = {r["dtype"]: r for r in rows if r["backbone"] == b}
        if {"float32", "bfloat16"} <= set(by):
            f, h = by["float32"], by["bfloat16"]
            print(f"| {b} | **bf16 / fp32** | {h['matmul_gflops'] / f['matmul_gflops']:.2f}x | "
                  f"{f['train']['step_s'] / h['train']['step_s']:.2f}x faster | "
                  f"{h['synthesis']['tokens_per_s'] / f['synthesis']['tokens_per_s']:.2f}x | "
                  f"{h['evaluation']['tokens_per_s'] / f['evaluation']['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
