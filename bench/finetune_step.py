"""One LoRA SFT step (`LoRAModule.nll_sum` forward + backward) with the LM head fused to its
cross-entropy (`fused`, the default since this bench: `objective_cached.token_nll`) against the
head's logits then `F.cross_entropy` (`plain`, what nll_sum did before), or against `masked`:
nll_sum with the batch's attention mask and position ids always passed to the model (what it did
before `module.attention_inputs` dropped them for right-padded rows), or against `whole`: one
decoder forward over the whole padded batch (`forward_cost=None`, what nll_sum did on a CPU before
`module.forward_groups`; `fused` runs the CPU default, `sft.forward_cost=auto`; `plain` and
`masked` never group), or against `bernoulli`: `fused` with LoRA dropout drawn by nn.Dropout
(`lora.dropout_draws=bernoulli`, what every variant drew before `finetune/dropout.py`; the
others draw by gaps, the default).

    cd bench && PYTHONPATH=../src ../.venv/bin/python finetune_step.py [--shape 4x530] [--labelled 0.68]
        [--steps 3] [--reps 2] [--backbone embedded:qwen2.5-coder-0.5b-instruct] [--dtype auto]
        [--variants fused,plain] [--lengths 530,470,420,300] [--dropout 0.05]
        [--out results/x.json]

A shape BxT is B rows of T random tokens, no padding; the last `labelled` fraction of each row
carries labels (make demo's SFT data: 33 records, 17,529 tokens, 11,840 labelled: 531 tokens a
record, 68% labelled; batch 4). `--lengths`: rows of these lengths instead, right-padded to the
longest by finetune's own Collate (attention mask, position ids), as a real batch is. LoRA as the
demo trains it (r=16, q/k/v/o, dropout 0.05; `--dropout 0` for exact comparisons between variants
that draw their masks per forward differently: `fused` and `whole`). Every (variant, repetition) runs `--steps` steps in
a fresh subprocess, interleaved (rep 0: the two `--variants` in order; rep 1: reversed), and
reports each step's seconds, the median of the steps after the first (warm), the peak RSS over
the steps minus the RSS before them (MiB) and the loss; the first subprocess's LoRA gradients
(after its last step) are compared with the other variant's, as one vector (same seed, same
inputs).
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

VARIANTS = ("fused", "plain", "masked", "whole", "bernoulli")


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


def sft_batch(lora, lengths: list[int], labelled: float) -> dict:
    """One batch of rows of random tokens of these lengths (seed 0), the last `labelled` fraction of
    each carrying labels, right-padded by finetune's own Collate (attention mask, position ids)."""
    import torch

    from domino.finetune.data import IGNORE, Collate, Row
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(0, lora.tokenizer.vocab_size, (n,), generator=g).tolist()
        cut = n - int(round(labelled * n))
        rows.append(Row(ids, [IGNORE] * cut + ids[cut:], list(range(n))))
    return Collate(lora.tokenizer.pad_token_id, False)(rows)


def child(a) -> dict:
    import torch

    from domino.finetune import module
    from domino.finetune.module import LoRAModule
    B, T = (int(x) for x in a.shape.lower().split("x"))
    lora = LoRAModule({"path": a.backbone, "dtype": a.dtype}, r=16, alpha=32, dropout=a.dropout, seed=0,
                      forward_cost="auto" if a.variant in ("fused", "bernoulli") else None,
                      dropout_draws="bernoulli" if a.variant == "bernoulli" else "gaps")
    lora.train()
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else [T] * B
    batch = sft_batch(lora, lengths, a.labelled)
    params = [p for p in lora.parameters() if p.requires_grad]
    if a.variant == "masked":
        module.attention_inputs = lambda b: (b.get("attention_mask"), b.get("position_ids"))
    nll_sum = (lambda b: plain_nll_sum(lora, b)) if a.variant == "plain" else lora.nll_sum
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
    ap.add_argument("--variants", default="fused,plain", help="the two variants compared: fused, plain, masked")
    ap.add_argument("--dropout", type=float, default=0.05,
                    help="LoRA dropout (0: variants that draw their masks differently compare exactly)")
    ap.add_argument("--lengths", default=None, help="comma-separated row lengths (right-padded): a padded batch")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child run
    ap.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(child(a)))
        return
    import torch
    pair = tuple(a.variants.split(","))
    if len(pair) != 2 or not set(pair) <= set(VARIANTS):
        ap.error(f"--variants: two of {VARIANTS}, comma-separated")
    rows, grads = [], {}
    for r in range(a.reps):
        for v in (pair if r % 2 == 0 else pair[::-1]):
            cmd = [sys.executable, __file__, "--variant", v, "--shape", a.shape, "--labelled", str(a.labelled),
                   "--steps", str(a.steps), "--backbone", a.backbone, "--dtype", a.dtype, "--dropout", str(a.dropout)]
            if a.lengths:
                cmd += ["--lengths", a.lengths]
            if v not in grads:
                grads[v] = f"/tmp/finetune_step_grads_{v}.pt"
                cmd += ["--grads", grads[v]]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
            row = json.loads(out.stdout.strip().splitlines()[-1]) | {"rep": r}
            rows.append(row)
            steps = ", ".join(f"{s:.2f}" for s in row["steps_s"])
            print(f"{v}: steps {steps} s, peak RSS +{row['peak_rss_delta_mib']:.0f} MiB, loss {row['loss']:.6f}",
                  flush=True)
    g0, g1 = (torch.load(grads[v]) for v in pair)
    g0, g1 = (torch.cat([x.flatten().float() for x in g]) for g in (g0, g1))
    rel = ((g0 - g1).norm() / g1.norm()).item()  # all LoRA tensors as one vector (a fresh B's A gets 0)
    med = {v: statistics.median(x["warm_s"] for x in rows if x["variant"] == v) for v in pair}
    print(f"warm medians: {pair[0]} {med[pair[0]]:.2f} s, {pair[1]} {med[pair[1]]:.2f} s: {pair[1]} / {pair[0]} "
          f"{med[pair[1]] / med[pair[0]]:.2f}x; LoRA gradients' relative difference {rel:.2e}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"shape": a.shape, "lengths": a.lengths, "labelled": a.labelled, "backbone": a.backbone,
                       "dtype": a.dtype, "variants": pair, "runs": rows, "warm_median_s": med,
                       "lora_grad_rel_diff": rel}, fh, indent=2)


if __name__ == "__main__":
    main()
