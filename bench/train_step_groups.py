"""The objective's continuations in length groups (`objective.forward_cost`) against every
continuation padded to the longest text, in one process: warm steps alternating (whole, grouped,
grouped, whole, ...), medians, every sample kept, and how far apart the two steps' gradients are.

    cd bench && PYTHONPATH=../src ../.venv/bin/python train_step_groups.py
        [--backbone embedded:qwen2.5-coder-0.5b-instruct] [--dtype auto] [--k 16] [--lengths 128,118,94,76]
        [--reps 3] [--cost auto] [--out results/x.json]
    cd bench && PYTHONPATH=../src ../.venv/bin/python train_step_groups.py --pool <demo>/train/references.jsonl
        [--steps 12]

B = len(--lengths) texts of random tokens, right-padded to the longest (the demo's references run
43-128 tokens at max_len 128: random batches of 4 are 18% padding, and 128/118/94/76 is such a
batch), k = l = `--k` soft tokens (random vocabulary rows), paper form, the default layout; one step
= forward + backward of the loss. `--pool`: no steps; the continuation tokens of 2,000 random
batches of B texts from a references.jsonl (its `prompt` field, tokenized as training does, EOS and
`--max-len` included), whole against grouped, joint layout's count. `--pool` with `--steps N`: N
such random batches (their lengths, random tokens), each stepped whole and grouped back to back
(the order alternating from batch to batch), every step's time kept: the gain on a training
run's mix of lengths, paired step by step so that the machine's drift cancels.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path


def continuation_tokens(lengths: list[int], cost) -> tuple[int, int, int]:
    """(whole, grouped, groups): the joint layout's continuations, l(x|D)'s and B pairs per text."""
    from domino.core.batching import length_groups, resolve_forward_cost
    cont = [n for n in lengths for _ in range(len(lengths) + 1)]
    groups = length_groups(cont, resolve_forward_cost(cost, "cpu"))
    return len(cont) * max(lengths), sum(len(g) * max(cont[i] for i in g) for g in groups), len(groups)


def pool_lengths(a) -> list[int]:
    """The token count of every text of the --pool file, as training tokenizes it."""
    from transformers import AutoTokenizer

    from domino.core import embedded
    from domino.core.batching import tokenize_texts
    texts = [json.loads(line)[a.field] for line in Path(a.pool).read_text().splitlines() if line.strip()]
    m = embedded.lookup(a.backbone)
    tok = AutoTokenizer.from_pretrained(str(embedded.tokenizer_dir(m)) if m else a.backbone)
    return [len(ids) for ids in tokenize_texts(tok, texts, a.max_len)]


def pool_padding(a) -> None:
    import random
    lengths = pool_lengths(a)
    rng = random.Random(0)
    batches = [rng.sample(lengths, a.batch) for _ in range(2000)]
    whole, grouped, groups = (statistics.mean(x) for x in zip(*(continuation_tokens(b, a.cost) for b in batches)))
    real, padded = statistics.mean(sum(b) for b in batches), statistics.mean(a.batch * max(b) for b in batches)
    print(f"{len(lengths)} texts of {min(lengths)}-{max(lengths)} tokens; random batches of {a.batch}: {real:.0f} text "
          f"tokens of {padded:.0f} padded ({1 - real / padded:.0%} padding); continuation tokens {whole:.0f} whole, "
          f"{grouped:.0f} grouped ({groups:.1f} groups)")


def pool_steps(a, model, sides: dict) -> None:
    """--pool with --steps: random batches of the pool's lengths, each stepped by both sides."""
    import random

    import torch
    from train_step import step_inputs, timed_step  # bench/train_step.py

    from domino.training.objective_cached import cached_nll
    pool = pool_lengths(a)
    rng = random.Random(0)
    batches = [rng.sample(pool, a.batch) for _ in range(a.steps)]
    rows = []
    for i, lengths in enumerate(batches):
        ids, am, D, S = step_inputs(model, a.batch, a.k, max(lengths), seed=i)
        am[:] = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
        whole, grouped, n_groups = continuation_tokens(lengths, sides["grouped"])
        row = {"lengths": lengths, "tokens": {"whole": whole, "grouped": grouped}, "groups": n_groups}
        for side in (("whole", "grouped") if i % 2 == 0 else ("grouped", "whole")):
            row[side] = timed_step(functools.partial(cached_nll, forward_cost=sides[side]), model, D, S, ids, am)[0]
        rows.append(row)
        print(f"batch {i + 1}/{a.steps} {lengths}: whole {row['whole']:.2f} s, grouped {row['grouped']:.2f} s; "
              f"continuation tokens {whole} / {grouped} ({n_groups} groups)", flush=True)
    warm = rows[1:]  # the first batch is each side's cold step
    tot = {side: sum(r[side] for r in warm) for side in sides}
    tok = {side: sum(r["tokens"][side] for r in warm) for side in sides}
    print(f"batches 2-{a.steps}: whole {tot['whole']:.1f} s, grouped {tot['grouped']:.1f} s, "
          f"whole/grouped {tot['whole'] / tot['grouped']:.3f}x; continuation tokens {tok['whole']} / {tok['grouped']} "
          f"({tok['whole'] / tok['grouped']:.3f}x)", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "backbone": a.backbone, "dtype": str(model.dtype), "k": a.k, "pool": a.pool, "cost": a.cost,
            "threads": torch.get_num_threads(), "batches": rows, "warm_seconds": tot, "warm_tokens": tok}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--lengths", default="128,118,94,76")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cost", default="auto", help="the grouped side's objective.forward_cost")
    ap.add_argument("--out", default=None)
    ap.add_argument("--pool", default=None, help="references.jsonl: the padding of random batches from it")
    ap.add_argument("--field", default="prompt")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=0, help="with --pool: step this many random batches of it")
    a = ap.parse_args()
    if a.pool and not a.steps:
        return pool_padding(a)
    import torch
    from train_step import step_inputs, timed_step  # bench/train_step.py

    from domino.core.backbone import load_backbone
    from domino.training.objective_cached import cached_nll

    model = load_backbone(path=a.backbone, dtype=a.dtype).model
    cost = a.cost if a.cost == "auto" else float(a.cost)
    sides = {"whole": None, "grouped": cost}
    if a.pool:
        return pool_steps(a, model, sides)
    lengths = [int(x) for x in a.lengths.split(",")]
    ids, am, D, S = step_inputs(model, len(lengths), a.k, max(lengths))
    for i, n in enumerate(lengths):
        am[i, n:] = 0
    grads, res, losses = {}, {s: [] for s in sides}, {}

    def step(side: str) -> float:
        t, losses[side] = timed_step(functools.partial(cached_nll, forward_cost=sides[side]), model, D, S, ids, am)
        grads.setdefault(side, (D.grad.clone(), S.grad.clone()))
        return t

    step("whole")
    step("grouped")  # warm-up of both (their gradients are the ones compared)
    for r in range(a.reps):
        for side in (("whole", "grouped") if r % 2 == 0 else ("grouped", "whole")):
            res[side].append(step(side))
    med = {s: statistics.median(v) for s, v in res.items()}
    rel = {name: ((g - r).norm() / r.norm()).item()
           for name, g, r in zip(("D", "S"), grads["grouped"], grads["whole"])}
    whole, grouped, n_groups = continuation_tokens(lengths, cost)
    padded = {"whole": whole, "grouped": grouped}
    print(f"{a.lengths}, k = l = {a.k}: whole {med['whole']:.3f} s, grouped {med['grouped']:.3f} s, "
          f"whole/grouped {med['whole'] / med['grouped']:.2f}x; continuation tokens {padded['whole']} against "
          f"{padded['grouped']} ({n_groups} groups, joint layout's count); losses {losses['whole']:.6f} / "
          f"{losses['grouped']:.6f}; gradients apart D {rel['D']:.2e}, S {rel['S']:.2e}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "backbone": a.backbone, "dtype": str(model.dtype), "k": a.k, "lengths": lengths, "cost": a.cost,
            "reps": a.reps, "threads": torch.get_num_threads(), "samples": res, "median": med, "losses": losses,
            "grad_rel_diff": rel, "continuation_tokens": padded, "groups": n_groups}, indent=1))


if __name__ == "__main__":
    main()
