"""One LoRA SFT step (`LoRAModule.nll_sum` forward + backward) with the LM head fused to its
cross-entropy (`fused`, the default since this bench: `objective_cached.token_nll`) against the
head's logits then `F.cross_entropy` (`plain`, what nll_sum did before).

    cd bench && PYTHONPATH=../src ../.venv/bin/python finetune_step.py [--shape 4x530] [--labelled 0.68]
        [--steps 3] [--reps 2] [--backbone embedded:qwen2.5-coder-0.5b-instruct] [--dtype auto]
        [--out results/x.json]

A shape BxT is B rows of T random tokens, no padding; the last `labelled` fraction of each row
carries labels (make demo's SFT data: 33 records, 17,529 tokens, 11,840 labelled: 531 tokens a
record, 68% labelled; batch 4). LoRA as the demo trains it (r=16, q/k/v/o, dropout 0.05). Every
(variant, repetition) runs `--steps` steps in a fresh subprocess, interleaved (rep 0: fused, plain;
rep 1: plain, fused), and reports each step's seconds, the median of the steps after the first
(warm), the peak RSS over the steps minus the RSS before them (MiB) and the loss; the first
subprocess's LoRA gradients (after its last step) are compared with the other variant's, as one
vector (same seed, same inputs, same dropout masks).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train_step import rss_kb

VARIANTS = ("fused", "plain")


def plain_nll_sum(lora, batch):
    """nll_sum as it was: the head's logits on the labelled positions, then fp32 cross-entropy."""
    import torch.nn.functional as F

    from domino.finetune.data import IGNORE
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    base = lora.model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    logits = base.get_output_embeddings()(hidden[:, :-1][sel])
    return F.cross_entropy(logits.float(), targets[sel], reduction="sum"), sel.sum()


def child(a) -> dict:
    import torch

    from domino.finetune.module import LoRAModule
    B, T = (int(x) for x in a.shape.lower().split("x"))
    lora = LoRAModule({"path": a.backbone, "dtype": a.dtype}, r=16, alpha=32, dropout=0.05, seed=0)
    lora.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lora.tokenizer.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T - int(round(a.labelled * T))] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    params = [p for p in lora.parameters() if p.requires_grad]
    nll_sum = lora.nll_sum if a.variant == "fused" else (lambda b: plain_nll_sum(lora, b))
    before, times, loss = rss_kb(), [], None
    for s in range(a.steps):
        for p in params:
            p.grad = None
        torch.manual_seed(s)  # LoRA dropout masks: the same in both variants
        t = time.perf_counter()
        total, count = nll_sum(batch)
        (total / count).backward()
        times.append(time.perf_counter() - t)
        loss = (total / count).item()
    if a.grads:
        torch.save([p.grad for p in params], a.grads)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": a.variant, "steps_s": times, "warm_s": statistics.median(times[1:] or times),
            "peak_rss_delta_mib": (peak - before) / 1024, "loss": loss, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4x530")
    ap.add_argument("--labelled", type=float, default=0.68)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto", help="the backbone's (auto: bf16 where the CPU has bf16 kernels)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child run
    ap.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(child(a)))
        return
    import torch
    rows, grads = [], {}
    for r in range(a.reps):
        for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            cmd = [sys.executable, __file__, "--variant", v, "--shape", a.shape, "--labelled", str(a.labelled),
                   "--steps", str(a.steps), "--backbone", a.backbone, "--dtype", a.dtype]
            if v not in grads:
                grads[v] = f"/tmp/finetune_step_grads_{v}.pt"
                cmd += ["--grads", grads[v]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"rep": r}
            rows.append(row)
            steps = ", ".join(f"{s:.2f}" for s in row["steps_s"])
            print(f"{v}: steps {steps} s, peak RSS +{row['peak_rss_delta_mib']:.0f} MiB, loss {row['loss']:.6f}",
                  flush=True)
    gf, gp = (torch.load(grads[v]) for v in VARIANTS)
    gf, gp = (torch.cat([x.flatten().float() for x in g]) for g in (gf, gp))
    rel = ((gf - gp).norm() / gp.norm()).item()  # all LoRA tensors as one vector (a fresh B's A gets 0)
    med = {v: statistics.median(x["warm_s"] for x in rows if x["variant"] == v) for v in VARIANTS}
    print(f"warm medians: fused {med['fused']:.2f} s, plain {med['plain']:.2f} s: plain / fused "
          f"{med['plain'] / med['fused']:.2f}x; LoRA gradients' relative difference {rel:.2e}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"shape": a.shape, "labelled": a.labelled, "backbone": a.backbone, "dtype": a.dtype, "runs": rows,
                       "warm_median_s": med, "lora_grad_rel_diff": rel}, fh, indent=2)


if __name__ == "__main__":
    main()
