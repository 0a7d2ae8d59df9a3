"""Synthesis throughput: the HF engine (shared prefix KV cache, batched, KV cache throughout) vs
(a) transformers' batched `generate` with its KV cache (what a user would pick instead: same batch
size, inputs_embeds=D repeated per row) and (b) a naive loop that calls `generate` once per sample
with use_cache=False (the released code's way).

    .venv/bin/python bench/synthesize.py --n 64 --max-new-tokens 128 --threads 1
    .venv/bin/python bench/synthesize.py --n 64 --max-new-tokens 128 --threads 1 --natural-stop

With the default, every sample is forced to exactly max_new_tokens tokens (min_new_tokens =
max_new_tokens), so all sides do the same work. With --natural-stop samples end at EOS, as in real
use: the engine drops finished rows from the batch, generate keeps computing them until the
longest row ends; tokens/s counts only the tokens that are kept. --check-greedy N decodes N samples
greedily on both batched paths and reports how many are token-identical.

    .venv/bin/python bench/synthesize.py --n 64 --max-new-tokens 128 --threads 1

Same model (the embedded SmolLM2-135M-Instruct), same domain tokens (k random vocabulary rows, the
sample_vocab init, or --ckpt), same sampling settings. Every sample is forced to exactly
max_new_tokens tokens (min_new_tokens = max_new_tokens) so both sides generate the same number of
tokens. The engine is timed --repeats times, interleaved with the single naive pass (the machine is
shared; the median is reported). Writes bench/results/synthesize.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from domino.core.backbone import load_backbone
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams, sample_seed

OUT = Path(__file__).resolve().parent / "results" / "synthesize.json"


def domain_tokens(bb, k: int, ckpt: str | None) -> torch.Tensor:
    if ckpt:
        from domino.core.domain_prompt import check_backbone, load_domain_prompt
        p = load_domain_prompt(ckpt)
        check_backbone(p, bb.model_hash, bb.hidden_size, bb.id)
        return p.tokens
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, bb.embed.weight.shape[0], (k,), generator=g)
    return bb.embed.weight[idx].detach().clone()


class ForwardTimer:
    """Wall time spent inside the model's forward calls (the rest of a decode loop is the loop's own
    overhead: sampling, bookkeeping, cache handling between calls)."""

    def __init__(self, model):
        self.model, self.seconds, self._orig = model, 0.0, model.forward

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return self._orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
        model.forward = timed

    def close(self):
        self.model.forward = self._orig


def run_engine(bb, D, n, params, batch_size):
    e = HFEngine(bb.model, bb.tokenizer, params, batch_size=batch_size)
    t0 = time.perf_counter()
    prefix = e.prefill(D)
    toks = 0
    for start in range(0, n, batch_size):
        seeds = [sample_seed(0, i) for i in range(start, min(start + batch_size, n))]
        toks += sum(len(g.token_ids) for g in e.generate_shared(prefix, seeds))
    return time.perf_counter() - t0, toks


@torch.no_grad()
def run_batched_generate(bb, D, n, p: SamplingParams, batch_size: int, do_sample: bool | None = None):
    """(seconds, kept tokens, token lists): `generate(inputs_embeds=D per row, use_cache=True)` in
    batches of batch_size; a row's tokens after its EOS are padding and are not counted."""
    torch.manual_seed(0)
    do_sample = not p.greedy if do_sample is None else do_sample
    eos = bb.tokenizer.eos_token_id
    t0, toks, rows = time.perf_counter(), 0, []
    for start in range(0, n, batch_size):
        B = min(batch_size, n - start)
        kw = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None) if do_sample \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = bb.model.generate(inputs_embeds=D[None].expand(B, -1, -1), attention_mask=torch.ones(B, D.shape[0],
                                dtype=torch.long), use_cache=True, max_new_tokens=p.max_new_tokens,
                                min_new_tokens=p.min_new_tokens, pad_token_id=bb.tokenizer.pad_token_id,
                                eos_token_id=eos, **kw)
        for row in out.tolist():
            kept = row[:row.index(eos)] if eos in row else row
            rows.append(kept)
            toks += len(kept)
    return time.perf_counter() - t0, toks, rows


def greedy_agreement(bb, D, n, max_new_tokens, batch_size):
    p = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    e = HFEngine(bb.model, bb.tokenizer, p, batch_size=batch_size)
    prefix = e.prefill(D)
    ours = [g.token_ids for g in e.generate_shared(prefix, [sample_seed(0, i) for i in range(n)])]
    _, _, theirs = run_batched_generate(bb, D, n, p, batch_size, do_sample=False)
    return sum(a == b for a, b in zip(ours, theirs))


@torch.no_grad()
def run_naive(bb, D, n, p: SamplingParams, budget_s: float | None):
    """(seconds, tokens, samples measured): stops after the sample that crosses budget_s."""
    torch.manual_seed(0)
    t0, toks, done = time.perf_counter(), 0, 0
    for _ in range(n):
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
        out = bb.model.generate(inputs_embeds=D[None], use_cache=False, do_sample=True,
                                temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or None,
                                max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                                pad_token_id=bb.tokenizer.pad_token_id)
        toks += out.shape[1]  # inputs_embeds only: generate returns just the new tokens
        done += 1
    return time.perf_counter() - t0, toks, done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--naive-budget-s", type=float, default=None,
                    help="stop the naive loop after this many seconds; its tokens/s is then measured on "
                         "the samples it finished (reported, never hidden)")
    ap.add_argument("--natural-stop", action="store_true",
                    help="samples end at EOS (min_new_tokens=0) instead of all running to max_new_tokens")
    ap.add_argument("--check-greedy", type=int, default=0, help="greedy samples compared token by token")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bb = load_backbone(path="embedded")
    D = domain_tokens(bb, a.k, a.ckpt)
    p = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
                       min_new_tokens=0 if a.natural_stop else a.max_new_tokens)
    run_engine(bb, D, min(4, a.n), p, a.batch_size)  # warm-up (allocator, kernels)
    run_batched_generate(bb, D, min(4, a.n), p, a.batch_size)
    engine_runs, batched_runs, naive = [], [], None
    in_forward = {"engine": [], "batched_generate": []}
    for r in range(a.repeats):  # interleaved: the machine is shared, drift hits both sides alike
        timer = ForwardTimer(bb.model)
        engine_runs.append(run_engine(bb, D, a.n, p, a.batch_size))
        timer.close()
        in_forward["engine"].append(timer.seconds / engine_runs[-1][0])
        print(f"engine run {r + 1}: {engine_runs[-1][1]} tokens in {engine_runs[-1][0]:.1f}s "
              f"({100 * in_forward['engine'][-1]:.1f}% inside model.forward)", flush=True)
        timer = ForwardTimer(bb.model)
        batched_runs.append(run_batched_generate(bb, D, a.n, p, a.batch_size)[:2])
        timer.close()
        in_forward["batched_generate"].append(timer.seconds / batched_runs[-1][0])
        print(f"batched generate run {r + 1}: {batched_runs[-1][1]} tokens in {batched_runs[-1][0]:.1f}s "
              f"({100 * in_forward['batched_generate'][-1]:.1f}% inside model.forward)", flush=True)
        if r == 0 and not a.skip_naive:
            naive = run_naive(bb, D, a.n, p, a.naive_budget_s)
            print(f"naive: {naive[2]} samples, {naive[1]} tokens in {naive[0]:.1f}s", flush=True)
    e_s = statistics.median(s for s, _ in engine_runs)
    e_tok = statistics.median(t for _, t in engine_runs)
    g_s = statistics.median(s for s, _ in batched_runs)
    g_tok = statistics.median(t for _, t in batched_runs)
    agree = greedy_agreement(bb, D, a.check_greedy, a.max_new_tokens, a.batch_size) if a.check_greedy else None
    res = {
        "command": "python bench/synthesize.py " + " ".join(
            (f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}")
            for k, v in vars(a).items() if v not in (None, False) and k != "out"),
        "model": bb.id, "device": "cpu", "torch_threads": a.threads,
        "cpu": platform.processor() or platform.machine(),
        "n": a.n, "k": int(D.shape[0]), "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size,
        "sampling": p.to_dict(),
        "natural_stop": a.natural_stop,
        "engine": {"seconds_runs": [round(s, 2) for s, _ in engine_runs], "seconds_median": round(e_s, 2),
                   "tokens": e_tok, "tokens_per_s": round(e_tok / e_s, 1),
                   "samples_per_s": round(a.n / e_s, 3)},
        "batched_generate": {"seconds_runs": [round(s, 2) for s, _ in batched_runs], "seconds_median": round(g_s, 2),
                             "tokens": g_tok, "tokens_per_s": round(g_tok / g_s, 1),
                             "samples_per_s": round(a.n / g_s, 3)},
        "share_of_time_in_model_forward": {k: round(statistics.median(v), 3) for k, v in in_forward.items()},
        "greedy_identical": None if agree is None else f"{agree}/{a.check_greedy}",
        "naive": None if naive is None else {
            "seconds": round(naive[0], 2), "tokens": naive[1],
            "tokens_per_s": round(naive[1] / naive[0], 1), "samples_per_s": round(naive[2] / naive[0], 3),
            "measured_samples": naive[2],
            # every sample has exactly max_new_tokens tokens, so tokens/s over a subset is the
            # rate; only the time for all n is extrapolated
            "extrapolated": naive[2] < a.n,
            "seconds_for_n_extrapolated": round(naive[0] * a.n / naive[2], 1) if naive[2] < a.n else None},
    }
    ratio = res["engine"]["tokens_per_s"] / res["batched_generate"]["tokens_per_s"]
    res["engine_vs_batched_generate"] = round(ratio, 2)
    if naive is not None:
        res["speedup_tokens_per_s"] = round(res["engine"]["tokens_per_s"] / res["naive"]["tokens_per_s"], 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"| engine (prefix cache, batch {a.batch_size}) | {e_tok} | {e_s:.1f} | {e_tok / e_s:.1f} |")
    print(f"| batched generate, use_cache=True, batch {a.batch_size} | {g_tok} | {g_s:.1f} | {g_tok / g_s:.1f} |")
    if naive is not None:
        print(f"| naive generate, use_cache=False, 1 sample per call ({naive[2]}/{a.n} samples measured) | "
              f"{naive[1]} | {naive[0]:.1f} | {naive[1] / naive[0]:.1f} |")
        print(f"speed-up vs naive (tokens/s): {res['speedup_tokens_per_s']}x")
    print(f"engine vs batched generate (tokens/s): {res['engine_vs_batched_generate']}x; greedy identical: {agree}")


if __name__ == "__main__":
    main()
