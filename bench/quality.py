"""Time of each data-quality metric on synthetic data (no model): n samples per set against an
n_target-point target and n_train training references, embeddings of width d, texts of L tokens.

    .venv/bin/python bench/quality.py --n 500 1000 2000 --d 576

Embedding cost is separate (one backbone forward per text, O(n·L)); see docs/data_quality.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from domino.data_quality import metrics as Q


def timed(fn, *a, **kw):
    t = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - t


def run(n: int, d: int, n_target: int, n_train: int, L: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x, target, train = rng.normal(size=(n, d)), rng.normal(size=(n_target, d)), rng.normal(size=(n_train, d))
    vocab = np.array([f"w{i}" for i in range(5000)])
    toks = [list(vocab[rng.zipf(1.3, L) % 5000]) for _ in range(n)]
    train_toks = [list(vocab[rng.zipf(1.3, L) % 5000]) for _ in range(n_train)]
    bw = Q.median_bandwidth(target)
    t = {"distinct_1_2_3": timed(lambda: [Q.distinct_n(toks, k) for k in (1, 2, 3)]),
         "self_bleu_200": timed(Q.self_bleu, toks, subsample=200),
         "vendi": timed(Q.vendi_score, x),
         "frechet": timed(Q.frechet_distance, x, target),
         "frechet_vs_self_size": timed(Q.frechet_distance, x, x[::-1]),
         "mmd2": timed(Q.mmd2, x, target, bw),
         "prdc": timed(Q.prdc, target, x, 5),
         "ngram_overlap_8": timed(Q.ngram_overlap, toks, train_toks, 8),
         "nn_cosine": timed(Q.nn_cosine, x, train)}
    t["total"] = sum(t.values())
    return {"n": n, "d": d, "n_target": n_target, "n_train": n_train, "L": L,
            "seconds": {k: round(v, 3) for k, v in t.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--d", type=int, default=576)  # SmolLM2-135M hidden size
    ap.add_argument("--n-target", type=int, default=82)  # half of HumanEval's 164
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=150)
    args = ap.parse_args()
    rows = [run(n, args.d, args.n_target, args.n_train, args.tokens) for n in args.n]
    keys = list(rows[0]["seconds"])
    print("| n | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['n']} | " + " | ".join(f"{r['seconds'][k]:.2f}" for k in keys) + " |")
    out = Path(__file__).parent / "results" / "quality.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "machine": platform.platform(), "cpus": os.cpu_count(),
                               "load_avg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
