"""Where a warm training step of the default objective path goes on the CPU: the torch profiler over
one step (after a warm-up step) of `cached_nll` + the paper-form loss + backward, at B x k x L on an
embedded backbone; prints the top operators by self CPU time and writes the table.

    PYTHONPATH=src .venv/bin/python bench/profile_train_step.py [--backbone embedded:qwen2.5-coder-0.5b-instruct]
        [--dtype bfloat16] [--shape 4x64x128] [--rows 25] [--out bench/results/profile_train_step.txt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shape", default="4x64x128")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_train_step.txt"))
    a = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from train_step import step_inputs, timed_step  # bench/train_step.py

    from domino.core.backbone import load_backbone
    from domino.training.objective_cached import cached_nll

    model = load_backbone(path=a.backbone, dtype=a.dtype).model
    B, k, L = (int(x) for x in a.shape.lower().split("x"))
    ids, am, D, S = step_inputs(model, B, k, L)
    warm = timed_step(cached_nll, model, D, S, ids, am)[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s = timed_step(cached_nll, model, D, S, ids, am)[0]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
    head = (f"{a.backbone} {a.dtype} {a.shape}: warm-up step {warm:.2f} s, profiled step {s:.2f} s "
            f"(profiler overhead included), {torch.get_num_threads()} threads\n")
    print(head + table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(head + table)


if __name__ == "__main__":
    main()
