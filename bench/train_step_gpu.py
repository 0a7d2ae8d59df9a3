"""Training-step speed, memory and loss agreement on a CUDA GPU, bf16: domino's default path
(`efficient`), the same with the paper config's chunking + gradient checkpointing (`efficient_ckpt`),
the straightforward oracle (`straightforward`) and the released code's computation (`released`).

    python bench/train_step_gpu.py --models 0.5b,1.5b --shapes 3x256x1024,3x64x256 --out results.json

Models: randomly initialised Qwen2 decoders with the published Qwen2.5 shapes (no weights are
downloaded; speed and memory do not depend on the values of the weights):
  0.5b: h 896, 24 layers, 14 heads, 2 kv heads, MLP 4864, vocab 151936, tied embeddings
  1.5b: h 1536, 28 layers, 12 heads, 2 kv heads, MLP 8960, vocab 151936, tied embeddings
A shape BxKxL is B references, k = l = K soft tokens, texts of L random tokens (every text full
length). One step = forward + backward of `combine(dom, mat, form="paper")["loss"]` w.r.t. D and S.

The four computations of the same loss:
- efficient: `domino.training.objective_cached.cached_nll` (the default `objective.impl`): D once, [D, S_i] once,
  every text continues a prefix K/V cache, LM head only at text positions, fused fp32 CE.
- efficient_ckpt: the same with `chunk_size=3` and gradient checkpointing on (conf/backbone/qwen.yaml
  and the README's paper-scale command).
- straightforward: `domino.training.objective.straightforward_nll`, the test oracle: 2 + B batched forwards
  of B sequences each ([D,x] for all x; [D,S_i,x_j] for each row i; [D,S_i,x_i] positives),
  full-vocabulary logits, fp32 cross-entropy on the text positions.
- released: the computation of the authors' released code as issue #15 describes it: one full
  forward per sequence, B^2 + 2B forwards of batch 1, each through the HF model with `labels`
  (soft positions labelled -100), so transformers forms full-vocabulary logits at every position
  and its own fp32 cross-entropy (`outputs.loss`, the per-sequence mean NLL). The authors' source
  was not available to this benchmark; this follows the issue's description of it.

Timing: CUDA events around each step after `--warmup` untimed steps, median of `--reps`.
Peak memory: torch.cuda.max_memory_allocated during the step minus the memory allocated before it
(model weights, inputs and soft tokens excluded). MFU = the computation's own model FLOPs (formula
in bench/train_step.py: frozen weights, backward = activation gradients) / step time / the card's
dense bf16 peak (`--peak-tflops`, 989 for an H100 SXM). `useful MFU` divides the efficient path's
FLOPs (the work the loss needs) by each computation's time instead, so it compares computations.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from released import released_nll  # noqa: E402  bench/released.py
from train_step import model_flops  # noqa: E402

from domino.core.backbone import freeze  # noqa: E402
from domino.training.objective import combine, straightforward_nll  # noqa: E402
from domino.training.objective_cached import cached_nll  # noqa: E402

SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    # CPU smoke test of this script only
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, tie_word_embeddings=True),
}
IMPLS = ("efficient", "efficient_ckpt", "straightforward", "released")


def build_model(name: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(**SHAPES[name], max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                      attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    freeze(model)
    return model


def set_ckpt(model, on: bool):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.eval()


def run_impl(model, impl, D, S, ids, am):
    if impl == "efficient":
        return cached_nll(model, D, S, ids, am)
    if impl == "efficient_ckpt":
        return cached_nll(model, D, S, ids, am, chunk_size=3)
    if impl == "straightforward":
        return straightforward_nll(model, D, S, ids, am)
    return released_nll(model, D, S, ids, am)


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(model, impl, D, S, ids, am, dev):
    D.grad = S.grad = None
    if dev.startswith("cuda"):
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        dom, mat = run_impl(model, impl, D, S, ids, am)
        loss = combine(dom, mat, form="paper")["loss"]
        mid.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return loss.item(), start.elapsed_time(end) / 1e3, start.elapsed_time(mid) / 1e3
    t0 = time.perf_counter()
    dom, mat = run_impl(model, impl, D, S, ids, am)
    loss = combine(dom, mat, form="paper")["loss"]
    t1 = time.perf_counter()
    loss.backward()
    return loss.item(), time.perf_counter() - t0, t1 - t0


def bench_shape(model, name, B, k, L, impls, reps, warmup, dev, peak_tflops, profile_dir):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g).to(dev)
    am = torch.ones_like(ids)
    W = model.get_input_embeddings().weight.detach().float().cpu()
    D = W[torch.randint(0, W.shape[0], (k,), generator=g)].clone().to(dev).requires_grad_()
    S = W[torch.randint(0, W.shape[0], (B * k,), generator=g)].view(B, k, -1).clone().to(dev).requires_grad_()
    layer_params = sum(p.numel() for p in model.get_decoder().layers.parameters())
    fl_eff = model_flops(cfg, layer_params, "efficient", B, k, L)["step"]
    text_tokens = (B * B + 2 * B) * L  # text tokens scored per step (what the loss reads)
    rows, grads = {}, {}
    for impl in impls:
        set_ckpt(model, impl == "efficient_ckpt")
        fl = model_flops(cfg, layer_params, "efficient" if impl.startswith("efficient") else "straightforward",
                         B, k, L)["step"]
        r = {"impl": impl, "model": name, "B": B, "k": k, "l": k, "L": L, "model_tflop_step": fl / 1e12}
        try:
            for _ in range(warmup):
                one_step(model, impl, D, S, ids, am, dev)
            times, fwds, peaks = [], [], []
            for _ in range(reps):
                if dev.startswith("cuda"):
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                loss, t, tf = one_step(model, impl, D, S, ids, am, dev)
                times.append(t)
                fwds.append(tf)
                if dev.startswith("cuda"):
                    peaks.append((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
            st = statistics.median(times)
            r.update(loss=loss, step_s=st, step_s_all=times, fwd_s=statistics.median(fwds),
                     peak_mib=max(peaks) if peaks else None, text_tokens_per_s=text_tokens / st,
                     mfu=fl / st / (peak_tflops * 1e12), useful_mfu=fl_eff / st / (peak_tflops * 1e12))
            grads[impl] = (D.grad.detach().float().cpu().clone(), S.grad.detach().float().cpu().clone())
            if profile_dir and impl == "efficient":
                r["profile"] = profile(model, impl, D, S, ids, am, dev, profile_dir / f"profile_{name}_{B}x{k}x{L}.txt")
        except torch.OutOfMemoryError as e:
            r["error"] = "CUDA out of memory: " + str(e).split("\n")[0][:300]
        except Exception as e:  # record and go on: one broken computation must not hide the others
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        finally:
            D.grad = S.grad = None
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        rows[impl] = r
        print(json.dumps({k_: v for k_, v in r.items() if k_ not in ("profile", "step_s_all")}), flush=True)
    set_ckpt(model, False)
    ref = "straightforward" if "straightforward" in grads else next(iter(grads), None)
    for impl, (gD, gS) in grads.items():
        if ref and impl != ref:
            rD, rS = grads[ref]
            rows[impl]["grad_rel_diff_vs_" + ref] = {
                "D": ((gD - rD).norm() / rD.norm().clamp_min(1e-30)).item(),
                "S": ((gS - rS).norm() / rS.norm().clamp_min(1e-30)).item()}
        if ref and "loss" in rows[impl] and "loss" in rows[ref]:
            rows[impl]["loss_abs_diff_vs_" + ref] = abs(rows[impl]["loss"] - rows[ref]["loss"])
    return rows


def profile(model, impl, D, S, ids, am, dev, path: Path):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with prof(activities=acts) as p:
        one_step(model, impl, D, S, ids, am, dev)
    key = "cuda_time_total" if dev.startswith("cuda") else "cpu_time_total"
    table = p.key_averages().table(sort_by=key, row_limit=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    total = sum(e.device_time_total for e in p.key_averages() if e.device_type.name == "CUDA") \
        if dev.startswith("cuda") else None
    top = []
    for e in sorted(p.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:15]:
        top.append({"name": e.key[:120], "device_ms": getattr(e, "device_time_total", 0) / 1e3,
                    "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3, "calls": e.count})
    return {"table_file": path.name, "kernel_total_ms": None if total is None else total / 1e3, "top": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="0.5b,1.5b")
    ap.add_argument("--shapes", default="3x256x1024,3x64x256", help="comma list of BxKxL")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one efficient step per shape")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_step_gpu.json"))
    a = ap.parse_args()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    out = Path(a.out)
    machine = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": a.device,
               "dtype": a.dtype, "attn": a.attn, "peak_tflops": a.peak_tflops}
    try:
        import transformers
        machine["transformers"] = transformers.__version__
    except ImportError:
        pass
    if a.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        machine.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2 ** 30, sms=p.multi_processor_count)
    results = {"command": "python bench/train_step_gpu.py " + " ".join(sys.argv[1:]), "machine": machine,
               "rows": []}
    for name in a.models.split(","):
        model = build_model(name, a.device, dtype, a.attn)
        for shape in a.shapes.split(","):
            B, k, L = (int(x) for x in shape.lower().split("x"))
            rows = bench_shape(model, name, B, k, L, a.impls.split(","), a.reps, a.warmup, a.device,
                               a.peak_tflops, out.parent if a.profile else None)
            results["rows"].append({"model": name, "B": B, "k": k, "L": L, "impls": rows})
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
        del model
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\nwrote {out}\n")
    print("| model | B | k=l | L | impl | step ms | text tok/s | peak GiB | MFU | useful MFU | loss | Δloss | "
          "grad rel. diff D / S |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        for impl, r in row["impls"].items():
            if "error" in r:
                print(f"| {row['model']} | {row['B']} | {row['k']} | {row['L']} | {impl} | {r['error'][:60]} |")
                continue
            gd = next((v for k_, v in r.items() if k_.startswith("grad_rel_diff")), None)
            dl = next((v for k_, v in r.items() if k_.startswith("loss_abs_diff")), None)
            pk = f"{r['peak_mib'] / 1024:.2f}" if r["peak_mib"] is not None else "-"
            print(f"| {row['model']} | {row['B']} | {row['k']} | {row['L']} | {impl} | {1e3 * r['step_s']:.1f} "
                  f"| {r['text_tokens_per_s']:,.0f} | {pk} | {100 * r['mfu']:.1f}% | {100 * r['useful_mfu']:.1f}% "
                  f"| {r['loss']:.5f} | {'-' if dl is None else f'{dl:.1e}'} "
                  f"| {'-' if gd is None else '%.1e / %.1e' % (gd['D'], gd['S'])} |")
    if os.environ.get("BENCH_PRINT_JSON"):
        print(json.dumps(results))


if __name__ == "__main__":
    main()
