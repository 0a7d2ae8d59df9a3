"""Training-step speed and memory on the CPU: the default objective path (`efficient`) against the
straightforward oracle (`straightforward`), its two layouts (`efficient_joint`, `efficient_split`; `efficient` is the
CPU default, `objective.layout=auto`) and the released code's computation (`released`,
bench/released.py: B^2 + 2B batch-1 forwards through the HF model with labels).

    python bench/train_step.py [--shapes 4x64x256,3x256x512] [--reps 3] [--impls straightforward,efficient,released]
                               [--backbone embedded|embedded:qwen2.5-coder-0.5b-instruct] [--dtype float32|bfloat16]

A shape BxKxL is B references, k = l = K soft tokens, texts of L random tokens (uniform over the
vocabulary, every text full length: no padding). One step = forward + backward of
`combine(...)["loss"]` (paper form) on an embedded backbone (default SmolLM2-135M, fp32), CPU.
Each subprocess runs `--steps` steps (default 2): the first (cold: first touch of its memory) and
the rest (warm: what every later step of a training run costs; with more than one, the warm
figures are those of the median warm step, and every step's time is kept). Later steps can still
get faster (0.5B bf16, 4x64x128, AMD, `--steps 4`: warm steps 21.4, 19.9, 18.8 s; the released
computation 56.9, 50.7, 51.0 s), so more steps read nearer the steady state.

Every (shape, impl, repetition) runs in a fresh subprocess, interleaved (rep 0: s,e; rep 1: e,s;
...), so that each step's peak memory can be read from the kernel: peak RSS of the process
(ru_maxrss) after the step minus its RSS just before the step (model loaded, inputs built); the
allocator's caching does not hide anything from RSS, and torch's CPU allocations are invisible
to tracemalloc. The step is therefore a cold one (first touch of its memory is included) for both
paths alike. Medians over repetitions; the JSON keeps every sample.

Right before its step each subprocess measures fp32 GEMM throughput on the model's matmul shapes,
so the achieved fraction uses the rate the machine gave at that moment (it is shared and noisy;
the step's CPU time, user+sys of the process, is reported beside wall time as the less
contention-sensitive figure).
Model FLOPs of a step, per path (what that algorithm must compute, no recomputation counted):
  fwd = 2*P_layers*tokens + 2*h*V*head_positions + 4*n_layers*H*d*attn_pairs
  bwd = 2*P_layers*tokens + 2*h*V*head_positions + 2*(4*n_layers*H*d*attn_pairs)
(frozen weights: backward forms activation gradients only, one GEMM per linear; attention
backward is two of its forward's matmuls each twice) where tokens go through the decoder,
head_positions get logits, attn_pairs = causal (query, key) pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = "4x64x256,3x256x512"


def rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def gemm_rate(h: int, inter: int, vocab: int, M: int = 2048, dtype=None) -> float:
    """GFLOP/s in `dtype` (default fp32) over the model's GEMM shapes (q/o, mlp up/down, lm head),
    flop-weighted."""
    import torch
    shapes = [(M, h, h), (M, h, inter), (M, inter, h), (M // 4, h, vocab)]
    flops = secs = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        secs += time.perf_counter() - t
        flops += 3 * 2 * m * k * n
    return flops / secs / 1e9


def model_flops(cfg, n_layer_params: int, impl: str, B: int, k: int, L: int) -> dict:
    h, V, nl = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    Hd = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    l = k

    def causal(past, n):  # (query, key) pairs of n queries after `past` cached keys
        return n * past + n * (n + 1) // 2

    if impl in ("straightforward", "released"):  # the same sequences, batched or one by one
        tokens = B * (k + L) + (B * B + B) * (k + l + L)
        head = tokens
        pairs = B * causal(0, k + L) + (B * B + B) * causal(0, k + l + L)
    elif impl == "efficient_split":  # D once, then [S_i] after D, then the continuations of each
        tokens = k + B * l + (B + B * B) * L
        head = (B + B * B) * L
        pairs = causal(0, k) + B * causal(k, l) + B * causal(k, L) + B * B * causal(k + l, L)
    elif impl == "efficient_joint":  # [D, S_i] for every row in one forward, then every continuation after a k+l cache
        # (l(x|D) rows mask the S positions out; the kernels still compute those pairs: counted)
        tokens = B * (k + l) + (B + B * B) * L
        head = (B + B * B) * L
        pairs = B * causal(0, k + l) + (B + B * B) * causal(k + l, L)
    else:
        raise ValueError(impl)
    lin = 2 * n_layer_params * tokens + 2 * h * V * head
    attn = 4 * nl * Hd * pairs
    return {"tokens": tokens, "head_positions": head, "attn_pairs": pairs,
            "fwd": lin + attn, "bwd": lin + 2 * attn, "step": 2 * lin + 3 * attn}


def step_inputs(model, B: int, k: int, L: int, seed: int = 0):
    """(ids, attention mask, D, S) of a step at shape BxKxL: B texts of L random tokens (full length),
    D and S_i random vocabulary rows (trainable: fp32), drawn in that order from `seed`."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=g)
    W = model.get_input_embeddings().weight.detach().float()
    D = W[torch.randint(0, W.shape[0], (k,), generator=g)].clone().requires_grad_()
    S = W[torch.randint(0, W.shape[0], (B * k,), generator=g)].view(B, k, -1).clone().requires_grad_()
    return ids, torch.ones_like(ids), D, S


def timed_step(fn, model, D, S, ids, am) -> tuple[float, float]:
    """(seconds, loss) of one forward + backward of the paper-form loss through `fn` (grads reset)."""
    from domino.training.objective import combine
    D.grad = S.grad = None
    t = time.perf_counter()
    dom, mat = fn(model, D, S, ids, am)
    loss = combine(dom, mat, form="paper")["loss"]
    loss.backward()
    return time.perf_counter() - t, loss.item()


def layout_of(impl: str, B: int, k: int, itemsize: int) -> str:
    """The `objective.layout` an efficient* impl runs: efficient is the default (auto) on a CPU."""
    from domino.training.objective_cached import resolve_layout
    return resolve_layout(impl.partition("_")[2] or "auto", "cpu", B, k, itemsize)


def child(impl: str, B: int, k: int, L: int, seed: int, backbone: str = "embedded", dtype: str = "float32",
          n_steps: int = 2) -> dict:
    import functools

    import torch
    from released import released_nll  # bench/released.py

    from domino.core.backbone import load_backbone
    from domino.training.objective import combine, straightforward_nll
    from domino.training.objective_cached import cached_nll

    bb = load_backbone(path=backbone, dtype=dtype)
    model, cfg = bb.model, bb.model.config
    ids, am, D, S = step_inputs(model, B, k, L, seed)
    name = impl
    if impl.startswith("efficient"):
        layout = layout_of(impl, B, k, model.dtype.itemsize)
        impl, fn = f"efficient_{layout}", functools.partial(cached_nll, layout=layout)
    else:
        fn = {"straightforward": straightforward_nll, "released": released_nll}[impl]
    layer_params = sum(p.numel() for p in model.get_decoder().layers.parameters())
    rate = gemm_rate(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, dtype=model.dtype)
    rss0, max0 = rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps = []
    for _ in range(max(2, n_steps)):  # cold, then warm
        D.grad = S.grad = None
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        dom, mat = fn(model, D, S, ids, am)
        loss = combine(dom, mat, form="paper")["loss"]
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        steps.append({"step_s": t2 - t0, "fwd_s": t1 - t0, "bwd_s": t2 - t1,
                      "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)})
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fl = model_flops(cfg, layer_params, impl, B, k, L)
    cold, rest = steps[0], steps[1:]
    warm = sorted(rest, key=lambda s: s["step_s"])[(len(rest) - 1) // 2]  # the median warm step (lower middle)
    return {"impl": name, "computed_as": impl, "B": B, "k": k, "l": k, "L": L, "backbone": backbone,
            "dtype": str(model.dtype), "loss": loss.item(), **cold, "warm": warm,
            "warm_steps_s": [s["step_s"] for s in rest],
            "peak_rss_delta_mib": (max1 - rss0) / 1024, "peak_before_step_exceeded": max1 > max0,
            "gemm_gflops": rate, "flops": fl,
            "achieved_fraction": fl["step"] / warm["step_s"] / (rate * 1e9),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "grad_norm": {"D": D.grad.norm().item(), "S": S.grad.norm().item()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of BxKxL")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impls", default="straightforward,efficient,released")
    ap.add_argument("--backbone", default="embedded", help="backbone.path (an embedded model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=2, help="steps per subprocess: one cold, the rest warm")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"))
    ap.add_argument("--_child", nargs=5, metavar=("IMPL", "B", "K", "L", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        impl, B, k, L, seed = a._child
        r = child(impl, int(B), int(k), int(L), int(seed), a.backbone, a.dtype, a.steps)
        print("RESULT " + json.dumps(r), flush=True)
        return

    impls = a.impls.split(",")
    samples = []
    for shape in a.shapes.split(","):
        B, k, L = (int(x) for x in shape.lower().split("x"))
        for rep in range(a.reps):
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                cmd = [sys.executable, __file__, "--_child", impl, str(B), str(k), str(L), "0",
                       "--backbone", a.backbone, "--dtype", a.dtype, "--steps", str(a.steps)]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                   env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    sys.stderr.write(p.stderr[-3000:])
                    samples.append({"impl": impl, "B": B, "k": k, "l": k, "L": L, "error": p.returncode})
                    print(f"{shape} {impl} rep {rep}: FAILED rc={p.returncode}", flush=True)
                    continue
                r = json.loads(line[0][len("RESULT "):])
                samples.append(r)
                print(f"{shape} {impl} rep {rep}: {r['step_s']:.1f} s cold, {r['warm']['step_s']:.1f} s warm "
                      f"({', '.join(f'{x:.1f}' for x in r['warm_steps_s'])}), "
                      f"peak +{r['peak_rss_delta_mib']:.0f} MiB, "
                      f"loss {r['loss']:.6f}, gemm {r['gemm_gflops']:.1f} GFLOP/s", flush=True)

    rows = []
    for shape in a.shapes.split(","):
        B, k, L = (int(x) for x in shape.lower().split("x"))
        row = {"shape": shape, "B": B, "k": k, "l": k, "L": L}
        for impl in impls:
            ok = [s for s in samples if s["impl"] == impl and (s["B"], s["k"], s["L"]) == (B, k, L)
                  and "error" not in s]
            if not ok:
                continue
            med = lambda f: statistics.median(f(s) for s in ok)  # noqa: E731
            row[impl] = {"n": len(ok), "step_s": med(lambda s: s["step_s"]),
                         "warm_step_s": med(lambda s: s["warm"]["step_s"]),
                         "warm_cpu_s": med(lambda s: s["warm"]["cpu_s"]),
                         "peak_rss_delta_mib": med(lambda s: s["peak_rss_delta_mib"]), "loss": ok[0]["loss"],
                         "gemm_gflops": med(lambda s: s["gemm_gflops"]),
                         "achieved_fraction": med(lambda s: s["achieved_fraction"]),
                         "model_tflop_step": ok[0]["flops"]["step"] / 1e12}
        if "efficient" in row:  # how many times faster the default path is than each other computation
            e = row["efficient"]
            row["vs"] = {other: {"cold": row[other]["step_s"] / e["step_s"],
                                 "warm": row[other]["warm_step_s"] / e["warm_step_s"],
                                 "warm_cpu_time": row[other]["warm_cpu_s"] / e["warm_cpu_s"],
                                 "model_flops": row[other]["model_tflop_step"] / e["model_tflop_step"],
                                 "memory": e["peak_rss_delta_mib"] / row[other]["peak_rss_delta_mib"],
                                 "loss_abs_diff": abs(row[other]["loss"] - e["loss"])}
                         for other in impls if other != "efficient" and other in row}
        rows.append(row)

    out = {"command": "python bench/train_step.py " + " ".join(sys.argv[1:]), "machine": {
        "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}, "rows": rows, "samples": samples}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {a.out}\n")
    print(f"{a.backbone}, {a.dtype}\n")
    print("| B | k=l | L | impl | cold step s | warm step s | warm CPU s | peak RSS Δ MiB | model TFLOP/step "
          "| GEMM GFLOP/s | achieved (warm) | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for impl in impls:
            if impl in row:
                r = row[impl]
                print(f"| {row['B']} | {row['k']} | {row['L']} | {impl} (n={r['n']}) | {r['step_s']:.1f} "
                      f"| {r['warm_step_s']:.1f} | {r['warm_cpu_s']:.1f} | {r['peak_rss_delta_mib']:.0f} "
                      f"| {r['model_tflop_step']:.2f} | {r['gemm_gflops']:.1f} | {100 * r['achieved_fraction']:.0f}% "
                      f"| {r['loss']:.6f} |")
        for other, v in row.get("vs", {}).items():
            print(f"|  |  |  | **efficient vs {other}** | **{v['cold']:.2f}×** | **{v['warm']:.2f}×** "
                  f"| {v['warm_cpu_time']:.2f}× | {v['memory']:.2f}× memory | {v['model_flops']:.2f}× fewer |  |  "
                  f"| Δ {v['loss_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
