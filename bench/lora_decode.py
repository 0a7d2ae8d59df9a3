"""What an unmerged LoRA adapter costs a decoding step, and how much of it is peft's Python: the
embedded Qwen2.5-Coder-0.5B-Instruct (bf16 on a CPU with bf16 kernels) plain, with an adapter
attached as evaluate.py attaches one to a bf16 backbone (unmerged, fp32 A and B) through peft's
`lora.Linear.forward`, and the same adapter through `lean`: the same ops in the same order
(base layer, x.float(), A, B, * scaling, + base output, cast back) without peft's checks, lookups
and module calls around them, so the same bits (the tokens are compared).

    .venv/bin/python bench/lora_decode.py [--adapter <finetune run>/adapter] [--batch 32 --steps 64 --rounds 8]
    .venv/bin/python bench/lora_decode.py --ops [--batch 32]

Each round decodes `--steps` greedy tokens for `--batch` rows from the same prefilled random
prefix on each side in turn, the order rotated each round (HFEngine.generate_shared, packed
weights as the engine packs them), so a slow spell of the machine falls on all three sides of a
round; reports each side's seconds a step per round, the per-round ratios and their medians, and
whether the tokens are the same. `--ops`: the pieces alone (torch.utils.benchmark, random tensors
of the 0.5B's 896 -> 896 and 896 -> 128 projections, `--batch` rows, r 16, scaling 2 as alpha 32
gives): the bf16 base product (plain F.linear, unpacked),
the fp32 update's six ops, and a bf16 update (A, then an addmm of B into the output).
Without `--adapter`, a random adapter of the demo's shape (conf/lora/default.yaml: r 16, alpha 32,
q/k/v/o) with nonzero B.
"""
import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from domino.core.backbone import load_backbone
from domino.core.generation.hf import HFEngine
from domino.core.generation.params import SamplingParams
from domino.evaluation.generation import load_adapter

MODEL = "embedded:qwen2.5-coder-0.5b-instruct"


def random_adapter(where: Path) -> str:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    get_peft_model(load_backbone(path=MODEL, dtype="float32").model, cfg).save_pretrained(str(where))
    return str(where)


def add_update(result, x, a, b, scaling):
    """peft's `result + lora_B(lora_A(x)) * scaling` (in the promoted dtype, cast back to result's),
    as the same ops in the same order: the same bits."""
    update = F.linear(F.linear(x.to(a.dtype), a), b)
    update.mul_(scaling)
    update.add_(result)  # the same sum (addition commutes), without the promoted copy
    return update.to(result.dtype)


@contextlib.contextmanager
def lean(model):
    """Each LoRA layer (one active adapter, no dropout in eval) on the lean forward in the block."""
    from peft.tuners.lora.layer import Linear
    layers = [m for m in model.modules() if type(m) is Linear]

    def forward_of(m):
        name = m.active_adapters[0]
        base, a, b, s = m.base_layer, m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name]
        return lambda x: add_update(base(x), x, a, b, s)
    try:
        for m in layers:
            assert len(m.active_adapters) == 1 and not m.merged and not m.lora_dropout[m.active_adapters[0]].training
            m.forward = forward_of(m)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def time_ops(rows: int) -> None:
    from torch.utils import benchmark
    torch.manual_seed(0)
    x = torch.randn(rows, 1, 896).bfloat16()
    for out in (896, 128):
        w, a, b = torch.randn(out, 896).bfloat16(), torch.randn(16, 896) * 0.01, torch.randn(out, 16) * 0.01
        a16, b16t, r = a.bfloat16(), b.t().contiguous().bfloat16(), F.linear(x, w)
        cases = {"base product": lambda: F.linear(x, w), "fp32 update (6 ops)": lambda: add_update(r, x, a, b, 2.0),
                 "bf16 update (mm, addmm)": lambda: torch.addmm(r.view(rows, out), F.linear(x.view(rows, 896), a16),
                                                                b16t)}
        for name, fn in cases.items():
            t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            print(f"896 -> {out}, {rows} rows, {name}: {t.blocked_autorange(min_run_time=1.0).median * 1e6:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--ops", action="store_true", help="time the pieces of one projection alone")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_decode.json"))
    a = ap.parse_args()
    if a.ops:
        return time_ops(a.batch)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = a.adapter or random_adapter(Path(tmp) / "adapter")
        base = load_backbone(path=MODEL)
        tuned = load_adapter(load_backbone(path=MODEL).model, adapter)[0]
    ids = torch.randint(0, 1000, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    p = SamplingParams(temperature=0.0, max_new_tokens=a.steps, min_new_tokens=a.steps)
    engines = {"base": HFEngine(base.model, base.tokenizer, p, batch_size=a.batch),
               "tuned": HFEngine(tuned, base.tokenizer, p, batch_size=a.batch)}
    prefixes = {k: e.prefill(e.embed_ids(ids)) for k, e in engines.items()}
    sides = {"base": "base", "peft": "tuned", "lean": "tuned"}
    step: dict[str, list[float]] = {k: [] for k in sides}
    tokens, n_lean = {}, 0
    for r in range(a.rounds + 1):  # round 0 warms up (packing, allocator) and is not kept
        order = list(sides)[r % 3:] + list(sides)[:r % 3]
        for name in order:
            e = engines[sides[name]]
            d0 = e.decode_s
            with lean(tuned) if name == "lean" else contextlib.nullcontext() as n:
                gens = e.generate_shared(prefixes[sides[name]], list(range(a.batch)))
            n_lean = n or n_lean
            if r:
                step[name].append((e.decode_s - d0) / a.steps)
                tokens[name] = [g.token_ids for g in gens]
                print(f"round {r} {name}: {step[name][-1]:.4f} s a step", flush=True)
    ratio = {"peft/base": [p / b for p, b in zip(step["peft"], step["base"])],
             "lean/base": [s / b for s, b in zip(step["lean"], step["base"])],
             "peft/lean": [p / s for p, s in zip(step["peft"], step["lean"])]}
    res = {"model": base.id, "dtype": base.dtype, "threads": torch.get_num_threads(), "batch": a.batch,
           "prompt": a.prompt, "steps": a.steps, "rounds": a.rounds, "adapter": a.adapter or "random r16 q/k/v/o",
           "lean_layers": n_lean, "step_s": step,
           "median_step_s": {k: round(statistics.median(v), 4) for k, v in step.items()},
           "ratios": {k: [round(x, 3) for x in v] for k, v in ratio.items()},
           "median_ratios": {k: round(statistics.median(v), 3) for k, v in ratio.items()},
           "lean_tokens_equal_peft": tokens["lean"] == tokens["peft"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("median_step_s", "median_ratios", "lean_tokens_equal_peft", "lean_layers")}))


if __name__ == "__main__":
    main()
