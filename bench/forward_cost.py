"""What one LoRA forward + backward costs on this machine against its tokens: the figure behind
`sft.forward_cost` (finetune's length groups, `module.forward_groups`).

    cd bench && PYTHONPATH=../src ../.venv/bin/python forward_cost.py [--backbone embedded:qwen2.5-coder-0.5b-instruct]
        [--dtype auto] [--lengths 8,64,128,256,512] [--rows 4] [--reps 3] [--out results/x.json]

For each length T: the median of `--reps` steps (after one unmeasured warm-up step) of one row of T
random tokens and of `--rows` rows of T, through the decoder and the fused head + cross-entropy
that nll_sum runs (LoRA r=16 on q/k/v/o, no dropout), all positions labelled. Printed: both times
and `rows x T` / (`--rows` x one row), below 1 where a batch beats its rows run one by one. The
fixed cost of a forward, in tokens, is the shortest length's one-row time over the slope between
the two longest one-row times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def step_s(lora, B: int, T: int, reps: int) -> float:
    import torch

    from domino.training.objective_cached import token_nll
    base = lora.model.get_base_model()
    ids = torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(T))
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        token_nll(base.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]),
                  ids[:, 1:].reshape(-1)).sum().backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="embedded:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", default="8,64,128,256,512")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    from domino.finetune.module import LoRAModule
    lora = LoRAModule({"path": a.backbone, "dtype": a.dtype}, r=16, alpha=32, dropout=0.0, seed=0)
    lora.train()
    lengths = sorted(int(x) for x in a.lengths.split(","))
    rows = []
    for T in lengths:
        one, many = step_s(lora, 1, T, a.reps), step_s(lora, a.rows, T, a.reps)
        rows.append({"T": T, "one_row_s": one, "rows_s": many, "ratio": many / (a.rows * one)})
        print(f"T={T}: 1 row {one:.3f} s, {a.rows} rows {many:.3f} s, {a.rows} rows / ({a.rows} x 1 row) "
              f"{many / (a.rows * one):.2f}", flush=True)
    fixed = None
    if len(rows) >= 3:
        slope = (rows[-1]["one_row_s"] - rows[-2]["one_row_s"]) / (rows[-1]["T"] - rows[-2]["T"])
        fixed = rows[0]["one_row_s"] / slope
        print(f"one row: {1000 * slope:.2f} ms a token between T={rows[-2]['T']} and {rows[-1]['T']}; "
              f"a forward at T={rows[0]['T']} costs {fixed:.0f} tokens' worth")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"backbone": a.backbone, "dtype": str(lora.model.dtype), "rows": a.rows, "reps": a.reps,
                       "threads": torch.get_num_threads(), "results": rows, "fixed_cost_tokens": fixed}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
