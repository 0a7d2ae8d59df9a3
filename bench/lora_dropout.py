"""LoRA dropout drawn by gaps (`lora.dropout_draws=gaps`, finetune/dropout.py) against nn.Dropout's
Bernoulli draws (`bernoulli`): the dropout alone (forward + backward of one (rows x h) input, the
fastest of `--reps`), then LoRA steps (`LoRAModule.nll_sum` forward + backward) on one module whose
adapters' dropout modules are swapped between the two before each step, alternating (b, g, g, b,
...) after one warm-up step of each, in one process.

    cd bench && PYTHONPATH=../src ../.venv/bin/python lora_dropout.py [--backbone embedded:qwen2.5-coder-0.5b-instruct]
        [--dtype auto] [--lengths 606,546,471,366] [--dropout 0.05] [--steps 6] [--out results/x.json]
        [--profile bernoulli|gaps]

`--profile SIDE`: instead of the steps, the torch profiler's top operators over one warm step of SIDE.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def dropout_alone(rows: int, h: int, p: float, reps: int) -> dict:
    import torch
    from torch import nn

    from domino.finetune.dropout import GapDropout
    out = {}
    for name, d in (("bernoulli", nn.Dropout(p)), ("gaps", GapDropout(p))):
        x = torch.randn(rows, h, requires_grad=True)
        best = float("inf")
        for _ in range(reps + 1):
            t = time.perf_counter()
            d.train()(x).sum().backward()
            best = min(best, time.perf_counter() - t)
        out[name] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", default="606,546,471,366")
    ap.add_argument("--labelled", type=float, default=0.68)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each side")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", choices=("bernoulli", "gaps"), default=None)
    a = ap.parse_args()

    import torch
    from finetune_step import sft_batch  # bench/finetune_step.py
    from torch import nn

    from domino.finetune.dropout import GapDropout
    from domino.finetune.module import LoRAModule

    lora = LoRAModule({"path": a.backbone, "dtype": a.dtype}, r=16, alpha=32, dropout=a.dropout, seed=0)
    lora.train()
    hidden = lora.model.get_base_model().config.hidden_size
    lengths = [int(x) for x in a.lengths.split(",")]
    alone = dropout_alone(sum(lengths) // 2, hidden, a.dropout, 5)
    print(f"dropout alone, {sum(lengths) // 2} x {hidden} fp32, forward + backward: bernoulli "
          f"{alone['bernoulli'] * 1e3:.2f} ms, gaps {alone['gaps'] * 1e3:.2f} ms", flush=True)
    batch = sft_batch(lora, lengths, a.labelled)
    slots = [(md, key) for name, md in lora.model.named_modules() if name.endswith("lora_dropout") for key in md]
    params = [p for p in lora.parameters() if p.requires_grad]

    def step(side: str, s: int) -> float:
        for md, key in slots:
            md[key] = (GapDropout(a.dropout) if side == "gaps" else nn.Dropout(a.dropout)).train()
        for p in params:
            p.grad = None
        torch.manual_seed(s)
        t = time.perf_counter()
        total, count = lora.nll_sum(batch)
        (total / count).backward()
        return time.perf_counter() - t

    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        step(a.profile, 0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            s = step(a.profile, 1)
        print(f"{a.profile}, one warm step {s:.2f} s (profiler overhead included)\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))
        return
    step("bernoulli", 0)
    step("gaps", 0)  # warm-up of both
    res = {"bernoulli": [], "gaps": []}
    for i in range(a.steps):
        for side in (("bernoulli", "gaps") if i % 2 == 0 else ("gaps", "bernoulli")):
            res[side].append(step(side, i + 1))
            print(f"{side}: {res[side][-1]:.2f} s", flush=True)
    med = {s: statistics.median(v) for s, v in res.items()}
    print(f"{len(slots)} adapters, dropout {a.dropout}, rows {lengths}: bernoulli {med['bernoulli']:.2f} s, "
          f"gaps {med['gaps']:.2f} s (medians of {a.steps}), bernoulli / gaps {med['bernoulli'] / med['gaps']:.3f}x",
          flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "backbone": a.backbone, "dtype": str(lora.model.dtype), "lengths": lengths, "dropout": a.dropout,
            "adapters": len(slots), "threads": torch.get_num_threads(), "dropout_alone_s": alone,
            "steps_s": res, "median_s": med}, indent=1))


if __name__ == "__main__":
    main()
