"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

For a task with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the probability that
at least one of k samples drawn without replacement passes. Computed as the product
1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if not (0 <= c <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got n={n}: "
                         f"raise n_samples or drop k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_ks(ks: Sequence[int], n_samples: int) -> list[int]:
    """Refuse impossible k up front (before any generation is spent)."""
    ks = sorted({int(k) for k in ks})
    bad = [k for k in ks if k < 1 or k > n_samples]
    if bad:
        raise ValueError(f"k={bad} impossible with n_samples={n_samples}: every k must be in 1..n_samples")
    return ks


def aggregate(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean over tasks of per-task pass@k; `counts` maps task_id -> (n, c)."""
    out = {}
    for k in ks:
        if not counts:
            out[f"pass@{k}"] = 0.0
            continue
        short = {t: n for t, (n, _) in counts.items() if n < k}
        if short:
            t, n = next(iter(short.items()))
            raise ValueError(f"pass@{k}: {len(short)} task(s) have fewer than {k} samples (e.g. {t}: n={n})")
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for n, c in counts.values()]))
    return out
