"""Packed against plain bf16 linear weights by row count: the rate of `rows` x in @ in x out products
over every linear layer of the embedded Qwen2.5-Coder-0.5B-Instruct (decoder and head, in order:
`decode_batch.batch_matmul_rate`), plain `F.linear` and packed for oneDNN
(domino.core.generation.packed, packed for `--hint` rows), alternated `--reps` times.

    cd bench && PYTHONPATH=../src ../.venv/bin/python packed_rows.py [--rows 16 64 256 1024 4096] [--hint 64]

The packed path is measured at every row count (`max_rows` unbounded); the engine packs for its
batch size and sends calls of more rows (prefills) to plain F.linear.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch
from decode_batch import batch_matmul_rate

from domino.core.backbone import load_backbone


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--hint", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packed_rows.json"))
    a = ap.parse_args()
    model = load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct").model
    rows = []
    for n in a.rows:
        runs = {"plain": [], "packed": []}
        for _ in range(a.reps):
            runs["plain"].append(batch_matmul_rate(model, n, pack=False))
            runs["packed"].append(batch_matmul_rate(model, n, pack=True, hint=a.hint, max_rows=1 << 30))
        row = {"rows": n, **{k: round(statistics.median(v), 1) for k, v in runs.items()}}
        row["packed_over_plain"] = round(row["packed"] / row["plain"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"hint": a.hint, "reps": a.reps, "gflops": rows,
                                       "threads": torch.get_num_threads()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
